"""Step 3: LoRA fine-tune Qwen2-VL-2B-Instruct on the conversation JSON, with SwanLab watching.

    python train.py                                    # recipe defaults: 2 epochs, batch 4 x 4, lr 1e-4
    python train.py --model=path/to/Qwen2-VL-2B-Instruct --swanlab_mode=disabled

Holds out the last test_size distinct images (data_vl_test.json), trains on the rest (data_vl_train.json), saves
checkpoints and the final adapter with the processor files and run_config.json in output_dir, then captions the
held-out images and logs them to SwanLab.
"""
import importlib.util
import json
import os
import shutil
from collections import Counter

import torch
from PIL import Image
from torch.utils.data import Dataset

from captioning import (
    ADAPTER_CONFIG,
    END_OF_TURN,
    RUN_CONFIG,
    PipelineError,
    build_messages,
    checkpoint_folders,
    device_and_dtype,
    generate_captions,
    load_image,
    load_images,
    load_model_and_processor,
    parse_settings,
    read_conversations,
    run_script,
    swanlab_run_mode,
    write_json,
)

# ----------------------------------------------------------------------------- settings
model = "Qwen/Qwen2-VL-2B-Instruct"  # hub id (downloaded with ModelScope into ./Qwen/...) or a local folder
json_path = "data_vl.json"  # written by csv2json.py
output_dir = "output/Qwen2-VL-2B"
test_size = 4  # distinct images held out for testing, taken from the end of the data
num_train_epochs = 2
max_steps = -1  # > 0 overrides num_train_epochs
per_device_train_batch_size = 4
gradient_accumulation_steps = 4
learning_rate = 1e-4
lora_r = 64
lora_alpha = 16
lora_dropout = 0.05
image_size = 280  # images are resized to image_size x image_size (a multiple of 28) in training and inference
max_length = 8192  # samples with more tokens are skipped, never cut through their image tokens
logging_steps = 10
save_steps = 100
max_new_tokens = 128  # for the held-out captions generated after training
gradient_checkpointing = "auto"  # auto: only on GPUs under 32 GiB (saves memory, costs ~1/3 more compute) | true | false
dataloader_num_workers = 2  # processes that load and preprocess images while the GPU trains
deepspeed = ""  # empty: none | zero2 | zero3 (the configs in deepspeed/) | path to a DeepSpeed JSON config
resume = "auto"  # auto: continue an interrupted run from its newest checkpoint in output_dir | never: start afresh
swanlab_mode = "auto"  # auto (cloud when logged in, else local) | cloud | local | offline | disabled
swanlab_project = "Qwen2-VL-finetune"
seed = 42
debug = False  # show the full traceback of a failure
# -----------------------------------------------------------------------------

LORA_TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
IGNORE_INDEX = -100  # label value the loss skips
TRAINER_STATE = "trainer_state.json"  # Trainer writes it last into a checkpoint: its presence marks a complete one
IMAGE_KEYS = ("pixel_values", "image_grid_thw")  # per image, not per token: joined across a batch, never padded


# ----------------------------------------------------------------------------- data

def split_by_image(samples, test_size):
    """Hold out the last test_size distinct images with all their captions, so no image is in both parts."""
    images = list(dict.fromkeys(sample["image_path"] for sample in samples))
    if len(images) <= test_size:
        raise PipelineError(
            f"the data has {len(images)} distinct images, but test_size={test_size} of them are held out and at "
            "least one is needed for training: fetch more data or lower --test_size"
        )
    test_images = set(images[len(images) - test_size:])
    train = [sample for sample in samples if sample["image_path"] not in test_images]
    test = [sample for sample in samples if sample["image_path"] in test_images]
    return train, test


def answer_token_ids(processor, prompt, caption):
    """The tokens the model must produce: the caption as the chat template renders it, up to END_OF_TURN."""
    messages = build_messages(None, prompt, caption)
    prompt_text = processor.apply_chat_template(messages[:1], add_generation_prompt=True, tokenize=False)
    full_text = processor.apply_chat_template(messages, tokenize=False)
    if not full_text.startswith(prompt_text) or END_OF_TURN not in full_text[len(prompt_text):]:
        raise PipelineError("the processor's chat template does not render a Qwen2-VL assistant turn")
    answer = full_text[len(prompt_text):]
    answer = answer[: answer.index(END_OF_TURN) + len(END_OF_TURN)]
    return processor.tokenizer(answer, add_special_tokens=False)["input_ids"]


def prompt_inputs(processor, image, prompt):
    """The processor's tensors for the user turn and the opening of the assistant's answer."""
    prompt_text = processor.apply_chat_template(build_messages(image, prompt), add_generation_prompt=True, tokenize=False)
    return processor(text=[prompt_text], images=[image], return_tensors="pt")


def encode_sample(processor, image, prompt, caption):
    """Token ids, labels and image tensors for one sample: only the caption and END_OF_TURN are supervised."""
    inputs = prompt_inputs(processor, image, prompt)
    answer = torch.tensor(answer_token_ids(processor, prompt, caption))
    # per-token rows get the answer appended: its ids, mask 1, and 0 in extras such as mm_token_type_ids (text)
    answer_rows = {"input_ids": answer, "attention_mask": torch.ones_like(answer)}
    sample = {
        key: value if key in IMAGE_KEYS else torch.cat([value[0], answer_rows.get(key, torch.zeros_like(answer))])
        for key, value in inputs.items()
    }
    sample["labels"] = torch.cat([torch.full_like(inputs["input_ids"][0], IGNORE_INDEX), answer])
    return sample


class CaptionDataset(Dataset):
    """Samples encoded on the fly (nothing cached), after dropping those whose image is missing or that are too long."""

    def __init__(self, samples, processor, image_size, max_length):
        self.processor, self.image_size = processor, image_size
        blank = Image.new("RGB", (image_size, image_size))  # all images share this size, so a prompt's length
        prompt_lengths = {}
        self.samples, self.skipped = [], []
        for sample in samples:
            if not os.path.isfile(sample["image_path"]):
                self.skipped.append(f"image not found: {sample['image_path']}")
                continue
            prompt = sample["prompt"]
            if prompt not in prompt_lengths:  # ... depends only on its text
                prompt_lengths[prompt] = prompt_inputs(processor, blank, prompt)["input_ids"].shape[1]
            length = prompt_lengths[prompt] + len(answer_token_ids(processor, prompt, sample["caption"]))
            if length > max_length:
                self.skipped.append(f"{length} tokens > max_length={max_length}: {sample['image_path']}")
                continue
            self.samples.append(sample)

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index):
        sample = self.samples[index]
        image = load_image(sample["image_path"], self.image_size)
        return encode_sample(self.processor, image, sample["prompt"], sample["caption"])


class CaptionCollator:
    """Pads token sequences on the right and joins the images: pixel_values are concatenated patch rows and
    image_grid_thw is stacked, so images of different sizes each keep their own patch count."""

    def __init__(self, pad_token_id):
        self.pad_values = {"input_ids": pad_token_id, "labels": IGNORE_INDEX}

    def __call__(self, samples):
        batch = {}
        longest = max(len(sample["input_ids"]) for sample in samples)
        for key in samples[0]:
            values = [sample[key] for sample in samples]
            if key in IMAGE_KEYS:
                batch[key] = torch.cat(values)
            else:
                padded = torch.full((len(values), longest), self.pad_values.get(key, 0), dtype=values[0].dtype)
                for row, value in enumerate(values):
                    padded[row, : len(value)] = value
                batch[key] = padded
        return batch


# ----------------------------------------------------------------------------- main

def sibling_path(json_file, suffix):
    """data_vl.json -> data_vl_train.json, in the same folder."""
    stem, extension = os.path.splitext(json_file)
    return f"{stem}_{suffix}{extension or '.json'}"


def report_skipped(skipped, what):
    if skipped:
        print(f"skipped {len(skipped)} {what}:", *skipped[:5], sep="\n  ")
        if len(skipped) > 5:
            print(f"  ... and {len(skipped) - 5} more")


def use_gradient_checkpointing(choice):
    """Recompute activations in the backward pass only where memory is short. auto is a rule of thumb from our
    estimate (not a measurement) of ~1.5 GB of bf16 activations per 280x280 sample for Qwen2-VL-2B with LoRA."""
    if choice in ("true", "false"):
        return choice == "true"
    if choice != "auto":
        raise PipelineError(f"--gradient_checkpointing={choice}: use auto, true or false")
    return torch.cuda.is_available() and torch.cuda.get_device_properties(0).total_memory < 32 * 2**30


def resolve_deepspeed(choice):
    """The DeepSpeed config file for the deepspeed setting, or None."""
    if not choice:
        return None
    shipped = os.path.join(os.path.dirname(os.path.abspath(__file__)), "deepspeed", f"{choice}.json")
    path = shipped if choice in ("zero2", "zero3") else choice
    if not os.path.isfile(path):
        raise PipelineError(f"--deepspeed={choice}: use zero2, zero3 or the path of a DeepSpeed JSON config")
    if importlib.util.find_spec("deepspeed") is None:
        raise PipelineError(f"--deepspeed={choice} needs DeepSpeed, which is not installed: pip install deepspeed")
    return path


def newest_complete_checkpoint(output_dir):
    """The checkpoint-N with the highest step that Trainer finished writing, or None."""
    complete = {step: folder for step, folder in checkpoint_folders(output_dir).items()
                if os.path.isfile(os.path.join(folder, TRAINER_STATE))}
    return complete[max(complete)] if complete else None


# settings that may change when a run is resumed: they do not shape the training itself
RESUMABLE_CHANGES = {"resume", "debug", "swanlab_mode", "max_new_tokens", "logging_steps", "deepspeed",
                     "gradient_checkpointing", "dataloader_num_workers"}


def resume_point(cfg, is_main_process):
    """The checkpoint to continue from, or None to start afresh; a finished run is never silently replaced."""
    finished = os.path.isfile(os.path.join(cfg.output_dir, ADAPTER_CONFIG))
    checkpoint = newest_complete_checkpoint(cfg.output_dir)
    if cfg.resume == "never":
        if (finished or checkpoint) and is_main_process:
            print(f"resume=never: replacing the earlier run in {cfg.output_dir}")
            for folder in checkpoint_folders(cfg.output_dir).values():
                shutil.rmtree(folder)
            if finished:
                os.remove(os.path.join(cfg.output_dir, ADAPTER_CONFIG))
        return None
    if cfg.resume != "auto":
        raise PipelineError(f"--resume={cfg.resume}: use auto or never")
    if finished:
        raise PipelineError(
            f"{cfg.output_dir} already holds a finished training run. To keep it, choose another --output_dir; "
            "to train again and replace it, add --resume=never"
        )
    if checkpoint:
        earlier = {}
        if os.path.isfile(os.path.join(cfg.output_dir, RUN_CONFIG)):
            with open(os.path.join(cfg.output_dir, RUN_CONFIG), encoding="utf-8") as file:
                earlier = json.load(file)
        changed = sorted(name for name, value in vars(cfg).items()
                         if name not in RESUMABLE_CHANGES and name in earlier and earlier[name] != value
                         and not (name == "model" and earlier[name] == os.path.abspath(value)))
        if changed:
            raise PipelineError(
                f"{cfg.output_dir} holds an interrupted run with other settings ({', '.join(changed)} differ), "
                "so it cannot be continued: use the same settings, another --output_dir, or --resume=never"
            )
        if is_main_process:
            print(f"resuming the interrupted run from {checkpoint}")
    return checkpoint


def save_final_adapter(trainer, processor, output_dir):
    """Save the adapter and processor files so that an interruption never leaves a half-written adapter behind:
    everything is written to a staging folder, then moved in with adapter_config.json last."""
    staging = os.path.join(output_dir, "final-adapter.part")
    if trainer.is_world_process_zero():
        shutil.rmtree(staging, ignore_errors=True)
    trainer.save_model(staging)  # on every process: DeepSpeed ZeRO-3 gathers the weights from all of them
    if trainer.is_world_process_zero():
        processor.save_pretrained(staging)
        for name in sorted(os.listdir(staging), key=lambda name: name == ADAPTER_CONFIG):
            os.replace(os.path.join(staging, name), os.path.join(output_dir, name))
        os.rmdir(staging)


def main(argv=()):
    distributed = "WORLD_SIZE" in os.environ  # launched by torchrun or accelerate: one process per GPU
    if not distributed:
        # One process trains on one GPU: with several visible, Trainer would wrap the model in DataParallel,
        # which splits the concatenated pixel_values of a batch across GPUs out of step with their images.
        os.environ.setdefault("CUDA_VISIBLE_DEVICES", "0")
    is_main_process = int(os.environ.get("RANK", "0")) == 0  # only it writes files, logs and prints captions
    cfg = parse_settings(globals(), argv)
    if cfg.image_size <= 0 or cfg.image_size % 28:
        raise PipelineError(f"--image_size={cfg.image_size}: use a positive multiple of 28 (14-pixel patches, merged 2x2)")
    mode = swanlab_run_mode(cfg.swanlab_mode) if is_main_process else "disabled"
    deepspeed_config = resolve_deepspeed(cfg.deepspeed)
    resume_from = resume_point(cfg, is_main_process)

    samples = read_conversations(cfg.json_path)
    train_samples, test_samples = split_by_image(samples, cfg.test_size)  # the same on every process
    train_json, test_json = sibling_path(cfg.json_path, "train"), sibling_path(cfg.json_path, "test")
    prompt = Counter(sample["prompt"] for sample in samples).most_common(1)[0][0]
    if is_main_process:
        write_json(train_json, [sample["entry"] for sample in train_samples])
        write_json(test_json, [sample["entry"] for sample in test_samples])
        print(f"{len(train_samples)} training samples -> {train_json}; {len(test_samples)} held out -> {test_json}")

    import swanlab
    from peft import LoraConfig, TaskType, get_peft_model
    from swanlab.integration.transformers import SwanLabCallback
    from transformers import Trainer, TrainingArguments, set_seed

    if torch.cuda.device_count() > 1 and not distributed:
        raise PipelineError(
            f"CUDA_VISIBLE_DEVICES={os.environ['CUDA_VISIBLE_DEVICES']} shows several GPUs to one process: "
            "set it to one GPU, e.g. CUDA_VISIBLE_DEVICES=0, or launch one process per GPU with torchrun"
        )
    set_seed(cfg.seed)
    base_model, processor = load_model_and_processor(cfg.model)  # Trainer moves it to this process's device
    dataset = CaptionDataset(train_samples, processor, cfg.image_size, cfg.max_length)
    if is_main_process:
        report_skipped(dataset.skipped, "training samples")
    if not len(dataset):
        raise PipelineError(f"no training sample is left in {cfg.json_path} after skipping the ones listed above")

    lora_config = LoraConfig(
        task_type=TaskType.CAUSAL_LM,
        target_modules=LORA_TARGET_MODULES,
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
    )
    checkpointing = use_gradient_checkpointing(cfg.gradient_checkpointing)
    if checkpointing:
        base_model.enable_input_require_grads()  # lets gradient checkpointing reach the LoRA weights
    lora_model = get_peft_model(base_model, lora_config)
    lora_model.print_trainable_parameters()

    model_path = os.path.abspath(cfg.model) if os.path.isdir(cfg.model) else cfg.model  # usable from any folder
    run_config = {**vars(cfg), "model": model_path, "prompt": prompt, "train_json": os.path.abspath(train_json),
                  "test_json": os.path.abspath(test_json), "swanlab_mode_used": mode,
                  "world_size": int(os.environ.get("WORLD_SIZE", "1"))}
    if is_main_process:
        os.makedirs(cfg.output_dir, exist_ok=True)
        write_json(os.path.join(cfg.output_dir, RUN_CONFIG), run_config)
    swanlab.init(project=cfg.swanlab_project, experiment_name=os.path.basename(os.path.normpath(cfg.output_dir)),
                 config=run_config, mode=mode)

    device, _ = device_and_dtype()
    args = TrainingArguments(
        output_dir=cfg.output_dir,
        per_device_train_batch_size=cfg.per_device_train_batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        num_train_epochs=cfg.num_train_epochs,
        max_steps=cfg.max_steps,
        learning_rate=cfg.learning_rate,
        logging_steps=cfg.logging_steps,
        logging_first_step=True,
        save_steps=cfg.save_steps,
        activation_checkpointing=checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False},
        dataloader_num_workers=cfg.dataloader_num_workers,
        dataloader_persistent_workers=cfg.dataloader_num_workers > 0,
        bf16=device == "cuda",
        use_cpu=device == "cpu",
        seed=cfg.seed,
        report_to="none",  # SwanLab is attached below as a callback
        remove_unused_columns=False,  # the collator needs pixel_values and image_grid_thw
        deepspeed=deepspeed_config,
        ddp_find_unused_parameters=False,  # LoRA uses every adapter weight in each step
    )
    trainer = Trainer(
        model=lora_model,
        args=args,
        train_dataset=dataset,
        data_collator=CaptionCollator(processor.tokenizer.pad_token_id),
        processing_class=processor,  # so every checkpoint folder also holds the processor files
        callbacks=[SwanLabCallback()],
    )
    trainer.train(resume_from_checkpoint=resume_from)
    save_final_adapter(trainer, processor, cfg.output_dir)
    if not is_main_process:
        return
    print(f"saved the adapter, processor and {RUN_CONFIG} to {cfg.output_dir}")

    test_images = load_images(dict.fromkeys(sample["image_path"] for sample in test_samples), cfg.image_size)
    lora_model.eval()
    captions = generate_captions(lora_model, processor, [image for _, image in test_images], prompt,
                                 cfg.max_new_tokens, batch_size=cfg.per_device_train_batch_size)
    for (path, _), caption in zip(test_images, captions):
        print(f"{path}: {caption}")
    swanlab.log({"Prediction": [swanlab.Image(path, caption=caption) for (path, _), caption in zip(test_images, captions)]})
    swanlab.finish()


if __name__ == "__main__":
    run_script(main)
