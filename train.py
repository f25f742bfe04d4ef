"""Step 3: LoRA fine-tune Qwen2-VL-2B-Instruct on the conversation JSON, with SwanLab watching.

    python train.py                                    # recipe defaults: 2 epochs, batch 4 x 4, lr 1e-4
    python train.py --model=path/to/Qwen2-VL-2B-Instruct --swanlab_mode=disabled

Holds out the last test_size distinct images (data_vl_test.json), trains on the rest (data_vl_train.json), saves
checkpoints and the final adapter with the processor files and run_config.json in output_dir, then captions the
held-out images and logs them to SwanLab.
"""
import dataclasses
import importlib.util
import json
import os
import shutil
from collections import Counter

import psutil
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
    generate_captions,
    load_image,
    load_images,
    load_model_and_processor,
    parse_settings,
    pin_image_size,
    read_conversations,
    readable_by_all,
    resolve_model,
    run_script,
    save_processor,
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
gradient_accumulation_steps = 4  # an optimizer step takes 4 x 4 = 16 samples on each GPU, as in the recipe
micro_batch_size = "auto"  # samples per forward pass; auto: as many of a step's samples as fit in GPU memory | a number
learning_rate = 1e-4
lora_r = 64
lora_alpha = 16
lora_dropout = 0.05
image_size = 280  # images are resized to image_size x image_size (a multiple of 28) in training and inference
max_length = 8192  # samples with more tokens are skipped, never cut through their image tokens
logging_steps = 10
save_steps = 100
max_new_tokens = 128  # for the held-out captions generated after training
gradient_checkpointing = "auto"  # auto: only when memory needs it (it costs ~1/3 more compute) | true | false
cache_image_features = "auto"  # auto: when training shows an image more than once (epochs, several captions) | true | false
group_by_length = True  # batch samples of similar length together, so less compute goes to padding
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
IMAGE_KEYS = ("pixel_values", "image_grid_thw", "image_features")  # per image: joined across a batch, never padded


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


def encode_sample(processor, image, prompt, answer_ids):
    """Token ids, labels and image tensors for one sample: only the answer (caption and END_OF_TURN) is supervised."""
    return with_answer(prompt_inputs(processor, image, prompt), answer_ids)


def with_answer(inputs, answer_ids):
    """The prompt's tensors with the answer appended to each per-token row; labels supervise only the answer."""
    answer = torch.tensor(answer_ids)
    # per-token rows get the answer appended: its ids, mask 1, and 0 in extras such as mm_token_type_ids (text)
    answer_rows = {"input_ids": answer, "attention_mask": torch.ones_like(answer)}
    sample = {
        key: value if key in IMAGE_KEYS else torch.cat([value[0], answer_rows.get(key, torch.zeros_like(answer))])
        for key, value in inputs.items()
    }
    sample["labels"] = torch.cat([torch.full_like(inputs["input_ids"][0], IGNORE_INDEX), answer])
    return sample


class CaptionDataset(Dataset):
    """Samples encoded on the fly, after dropping those whose image is missing or that are too long. Images are
    preprocessed in every step that uses them, unless image_features holds their vision features (encode_images)."""

    def __init__(self, samples, processor, image_size, max_length):
        self.processor, self.image_size = processor, image_size
        blank = Image.new("RGB", (image_size, image_size))  # all images share this size, so a prompt's tokens
        self.prompt_tensors = {}  # ... depend only on its text
        self.samples, self.answers, self.lengths, self.skipped = [], [], [], []
        for sample in samples:
            if not os.path.isfile(sample["image_path"]):
                self.skipped.append(f"image not found: {sample['image_path']}")
                continue
            prompt = sample["prompt"]
            if prompt not in self.prompt_tensors:
                self.prompt_tensors[prompt] = prompt_inputs(processor, blank, prompt)
            answer = answer_token_ids(processor, prompt, sample["caption"])
            length = self.prompt_tensors[prompt]["input_ids"].shape[1] + len(answer)
            if length > max_length:
                self.skipped.append(f"{length} tokens > max_length={max_length}: {sample['image_path']}")
                continue
            self.samples.append(sample)
            self.answers.append(answer)
            self.lengths.append(length)
        self.image_features = None  # image path -> the vision tower's output, once cached

    def image_paths(self):
        return list(dict.fromkeys(sample["image_path"] for sample in self.samples))

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index):
        sample = self.samples[index]
        if self.image_features is None:
            image = load_image(sample["image_path"], self.image_size)
            return encode_sample(self.processor, image, sample["prompt"], self.answers[index])
        inputs = {key: value for key, value in self.prompt_tensors[sample["prompt"]].items() if key != "pixel_values"}
        inputs["image_features"] = self.image_features[sample["image_path"]]
        return with_answer(inputs, self.answers[index])


class CaptionCollator:
    """Pads token sequences on the right and joins the images: pixel_values (or cached image_features) are
    concatenated rows and image_grid_thw is stacked, so images of different sizes each keep their own row count.
    Marks the positions whose logits the loss needs (logits_to_keep) with their targets (shift_labels)."""

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
        if "image_features" in batch:  # the model's own way to take precomputed vision features
            from transformers.modeling_outputs import BaseModelOutputWithPooling

            batch["mm_encoder_outputs"] = {"image": BaseModelOutputWithPooling(pooler_output=(batch.pop("image_features"),))}
        # logits only where the next token is supervised: elsewhere the vocabulary-wide projection is thrown away
        next_labels = torch.nn.functional.pad(batch["labels"][:, 1:], (0, 1), value=IGNORE_INDEX)
        batch["logits_to_keep"] = next_labels != IGNORE_INDEX
        batch["shift_labels"] = next_labels[batch["logits_to_keep"]]
        return batch


def encode_images(model, processor, paths, image_size, batch_size, process_index=0, num_processes=1):
    """The frozen vision tower's features for each image, computed once instead of in every step that shows the
    image. With several processes each encodes its share and all receive the whole set."""
    from tqdm import tqdm

    base_model = model.get_base_model()
    device = next(base_model.parameters()).device
    features = {}
    mine = paths[process_index::num_processes]
    with torch.no_grad(), tqdm(total=len(mine), desc="encoding images", unit="image",
                               disable=process_index != 0) as progress:
        for start in range(0, len(mine), batch_size):
            chunk = mine[start:start + batch_size]
            pixels = processor.image_processor(images=[load_image(path, image_size) for path in chunk],
                                               return_tensors="pt")
            encoded = base_model.get_image_features(pixels["pixel_values"].to(device),
                                                    pixels["image_grid_thw"].to(device))
            features.update(zip(chunk, (feature.cpu() for feature in encoded.pooler_output)))
            progress.update(len(chunk))
    if num_processes > 1:
        shares = [None] * num_processes
        torch.distributed.all_gather_object(shares, features)
        features = {path: feature for share in shares for path, feature in share.items()}
    return features


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


def step_plan(cfg, fits):
    """(micro-batch size, gradient checkpointing) for optimizer steps of per_device_train_batch_size x
    gradient_accumulation_steps samples. Where a setting is auto, the first candidate for which fits(size,
    checkpointing) holds wins: the largest micro-batches without checkpointing, down to the recipe's size, then
    with checkpointing, which recomputes the forward pass but keeps the GPU busy with large micro-batches."""
    step_samples = cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps
    sizes = [size for size in range(step_samples, 0, -1) if step_samples % size == 0]
    if cfg.micro_batch_size != "auto":
        if not str(cfg.micro_batch_size).isdigit() or int(cfg.micro_batch_size) not in sizes:
            raise PipelineError(f"--micro_batch_size={cfg.micro_batch_size}: use auto or a number that divides the "
                                f"{step_samples} samples of a step ({', '.join(map(str, sizes))})")
        sizes = [int(cfg.micro_batch_size)]
    if cfg.gradient_checkpointing not in ("auto", "true", "false"):
        raise PipelineError(f"--gradient_checkpointing={cfg.gradient_checkpointing}: use auto, true or false")
    if cfg.gradient_checkpointing == "auto":
        unchecked = [size for size in sizes if size >= cfg.per_device_train_batch_size] or sizes
        candidates = [(size, False) for size in unchecked] + [(size, True) for size in sizes]
    else:
        candidates = [(size, cfg.gradient_checkpointing == "true") for size in sizes]
    for candidate in candidates[:-1]:
        if fits(*candidate):
            return candidate
    return candidates[-1]  # the most frugal choice is taken untried: if even it is too big, training says so


def memory_probe(model, dataset, collator, num_processes):
    """fits(size, checkpointing): whether one forward and backward pass over the size longest samples fits in the
    memory of every process's GPU, tried on the model itself."""
    from accelerate.utils import send_to_device

    longest = sorted(range(len(dataset)), key=dataset.lengths.__getitem__, reverse=True)
    device = next(model.parameters()).device

    def fits_here(size, checkpointing):
        set_gradient_checkpointing(model, checkpointing)
        model.train()  # checkpointing acts only in training mode
        try:
            batch = send_to_device(collator([dataset[index] for index in longest[:size]]), device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                model(**batch).loss.backward()
            return True
        except torch.cuda.OutOfMemoryError:
            return False
        finally:
            model.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()

    def fits(size, checkpointing):
        everywhere = torch.tensor([int(fits_here(size, checkpointing))], device=device)
        if num_processes > 1:  # every process must choose the same plan
            torch.distributed.all_reduce(everywhere, op=torch.distributed.ReduceOp.MIN)
        return bool(everywhere.item())

    return fits


def plan_steps(cfg, model, dataset, collator, num_processes):
    """step_plan with the memory probe on a GPU, or the whole step in one micro-batch on a CPU, whose memory is the
    machine's; the model is left with the planned gradient checkpointing."""
    on_gpu = next(model.parameters()).device.type == "cuda"
    fits = memory_probe(model, dataset, collator, num_processes) if on_gpu else lambda size, checkpointing: True
    micro_batch, checkpointing = step_plan(cfg, fits)
    set_gradient_checkpointing(model, checkpointing)
    return micro_batch, checkpointing


def set_gradient_checkpointing(model, enabled):
    base_model = model.get_base_model()
    if enabled == base_model.is_gradient_checkpointing:
        return
    if enabled:
        base_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        base_model.enable_input_require_grads()  # lets the recomputed layers pass gradients on to the LoRA weights
    else:
        base_model.gradient_checkpointing_disable()
        base_model.disable_input_require_grads()


def use_feature_cache(cfg, dataset, model, deepspeed_config, num_processes):
    """Whether to compute each image's vision features once: exact, because LoRA leaves the vision tower frozen,
    and faster whenever training shows an image more than once."""
    if cfg.cache_image_features not in ("auto", "true", "false"):
        raise PipelineError(f"--cache_image_features={cfg.cache_image_features}: use auto, true or false")
    if cfg.cache_image_features == "false":
        return False
    zero3 = False
    if deepspeed_config:
        with open(deepspeed_config, encoding="utf-8") as file:
            zero3 = json.load(file).get("zero_optimization", {}).get("stage") == 3
    vision_tower = model.get_base_model().model.visual
    obstacle = ("the adapter trains part of the vision tower" if any(p.requires_grad for p in vision_tower.parameters())
                else "DeepSpeed ZeRO-3 splits the vision tower across GPUs" if zero3 else None)
    if obstacle:
        if cfg.cache_image_features == "true":
            raise PipelineError(f"--cache_image_features=true cannot be used: {obstacle}. Use auto or false")
        return False
    if cfg.cache_image_features == "true":
        return True
    images = len(dataset.image_paths())
    step_samples = cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps * num_processes
    shown = cfg.max_steps * step_samples if cfg.max_steps > 0 else len(dataset) * cfg.num_train_epochs
    size = images * (cfg.image_size // 28) ** 2 * model.config.text_config.hidden_size * model.dtype.itemsize
    if size > psutil.virtual_memory().available / 2:
        print(f"not caching image features: they would take {size / 2**30:.1f} GiB of memory")
        return False
    return shown > images


class LengthGroupedSampler(torch.utils.data.Sampler):
    """Shuffles the samples each epoch, then sorts them by length within groups of steps, so that a step's samples
    have similar lengths and little compute goes to padding. The same order on every process, and after a resume."""

    def __init__(self, lengths, step_samples, seed):
        self.lengths, self.step_samples, self.seed, self.epoch = lengths, step_samples, seed, 0

    def set_epoch(self, epoch):  # Trainer calls it at the start of every epoch
        self.epoch = epoch

    def __len__(self):
        return len(self.lengths)

    def __iter__(self):
        from transformers.trainer_pt_utils import get_length_grouped_indices

        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(get_length_grouped_indices(self.lengths, self.step_samples, generator=generator))


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
                     "gradient_checkpointing", "dataloader_num_workers", "micro_batch_size", "cache_image_features"}


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


def save_final_adapter(trainer, processor, output_dir, image_size, base_model):
    """Save the adapter and processor files so that an interruption never leaves a half-written adapter behind:
    everything is written to a staging folder, then moved in with adapter_config.json last."""
    staging = os.path.join(output_dir, "final-adapter.part")
    if trainer.is_world_process_zero():
        shutil.rmtree(staging, ignore_errors=True)
    trainer.save_model(staging)  # on every process: DeepSpeed ZeRO-3 gathers the weights from all of them
    if trainer.is_world_process_zero():
        save_processor(processor, staging, image_size, base_model)
        readable_by_all(staging)
        for name in sorted(os.listdir(staging), key=lambda name: name == ADAPTER_CONFIG):
            os.replace(os.path.join(staging, name), os.path.join(output_dir, name))
        os.rmdir(staging)


def warn_if_launched_alone(distributed):
    """`accelerate launch --cpu --num_processes=N` without an MPI hostfile starts one process and says nothing."""
    if "MASTER_ADDR" in os.environ and not distributed and "OMPI_COMM_WORLD_SIZE" not in os.environ \
            and "PMI_SIZE" not in os.environ:
        print("warning: the launcher set MASTER_ADDR for several processes, but this process runs alone (no "
              "WORLD_SIZE). `accelerate launch --cpu` starts one process unless given an MPI hostfile: use "
              "`torchrun --nproc_per_node=N train.py`, or `accelerate launch --multi_gpu --num_processes=N train.py`")


def main(argv=()):
    distributed = "WORLD_SIZE" in os.environ  # launched by torchrun or accelerate: one process per GPU
    warn_if_launched_alone(distributed)
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
    from transformers import Trainer, TrainerCallback, TrainingArguments, set_seed
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

    if torch.cuda.device_count() > 1 and not distributed:
        raise PipelineError(
            f"CUDA_VISIBLE_DEVICES={os.environ['CUDA_VISIBLE_DEVICES']} shows several GPUs to one process: "
            "set it to one GPU, e.g. CUDA_VISIBLE_DEVICES=0, or launch one process per GPU with torchrun"
        )
    set_seed(cfg.seed)
    model_folder = resolve_model(cfg.model)
    base_model, processor = load_model_and_processor(model_folder)
    pin_image_size(processor, cfg.image_size)  # so each checkpoint's processor files carry training's image size
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
    lora_model = get_peft_model(base_model, lora_config)
    lora_model.print_trainable_parameters()

    args = TrainingArguments(  # also joins this process to the others under torchrun and picks its device
        output_dir=cfg.output_dir,
        per_device_train_batch_size=cfg.per_device_train_batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        num_train_epochs=cfg.num_train_epochs,
        max_steps=cfg.max_steps,
        learning_rate=cfg.learning_rate,
        logging_steps=cfg.logging_steps,
        logging_first_step=True,
        save_steps=cfg.save_steps,
        activation_checkpointing_kwargs={"use_reentrant": False},
        dataloader_num_workers=cfg.dataloader_num_workers,
        dataloader_persistent_workers=cfg.dataloader_num_workers > 0,
        bf16=torch.cuda.is_available(),
        use_cpu=not torch.cuda.is_available(),
        seed=cfg.seed,
        report_to="none",  # SwanLab is attached below as a callback
        remove_unused_columns=False,  # the collator needs pixel_values and image_grid_thw
        deepspeed=deepspeed_config,
        ddp_find_unused_parameters=False,  # LoRA uses every adapter weight in each step
    )
    lora_model.to(args.device)
    step_samples = cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps
    cached = use_feature_cache(cfg, dataset, lora_model, deepspeed_config, args.world_size)
    if cached:
        dataset.image_features = encode_images(lora_model, processor, dataset.image_paths(), cfg.image_size,
                                               step_samples, args.process_index, args.world_size)
    collator = CaptionCollator(processor.tokenizer.pad_token_id)
    micro_batch, checkpointing = plan_steps(cfg, lora_model, dataset, collator, args.world_size)
    args = dataclasses.replace(args, per_device_train_batch_size=micro_batch, activation_checkpointing=checkpointing,
                               gradient_accumulation_steps=step_samples // micro_batch,
                               # pinning copies each mapping in a batch with update(), which the model's output class
                               # that carries cached features refuses; their few MB a step need no pinning
                               dataloader_pin_memory=not cached)
    if is_main_process:
        print(f"each step: {step_samples // micro_batch} micro-batch(es) of {micro_batch} samples, gradient "
              f"checkpointing {'on' if checkpointing else 'off'}, image features "
              f"{'computed once' if cached else 'computed in every step'}")

    model_path = os.path.abspath(cfg.model) if os.path.isdir(cfg.model) else cfg.model  # usable from any folder
    run_config = {**vars(cfg), "model": model_path, "prompt": prompt, "train_json": os.path.abspath(train_json),
                  "test_json": os.path.abspath(test_json), "swanlab_mode_used": mode,
                  "world_size": args.world_size, "micro_batch_size_used": micro_batch,
                  "gradient_checkpointing_used": checkpointing, "image_features_cached": cached}
    if is_main_process:
        os.makedirs(cfg.output_dir, exist_ok=True)
        write_json(os.path.join(cfg.output_dir, RUN_CONFIG), run_config)
    swanlab.init(project=cfg.swanlab_project, experiment_name=os.path.basename(os.path.normpath(cfg.output_dir)),
                 config=run_config, mode=mode)

    class CaptionTrainer(Trainer):
        def _get_train_sampler(self, train_dataset=None):  # the dataset knows its lengths: none need encoding
            if not cfg.group_by_length:
                return super()._get_train_sampler(train_dataset)
            return LengthGroupedSampler(dataset.lengths, step_samples * args.world_size, cfg.seed)

    class EpochsAndCheckpoints(TrainerCallback):
        """Gives the sampler each epoch's number itself: accelerate does not pass it on when several processes resume
        in the middle of an epoch, and the sampler then repeated epoch 0's order there. Makes checkpoints readable."""

        def on_epoch_begin(self, args, state, control, train_dataloader=None, **kwargs):
            sampler = train_dataloader.batch_sampler  # wrapped in accelerate's shards, then torch's batches
            while not hasattr(sampler, "set_epoch"):
                sampler = getattr(sampler, "batch_sampler", None) or sampler.sampler
            sampler.set_epoch(int(state.epoch))  # a resumed run's state.epoch is fractional, like 1.5

        def on_save(self, args, state, control, **kwargs):  # safetensors writes the adapter readable by us alone
            if state.is_world_process_zero:
                readable_by_all(os.path.join(args.output_dir, f"checkpoint-{state.global_step}"))

    trainer = CaptionTrainer(
        model=lora_model,
        args=args,
        train_dataset=dataset,
        data_collator=collator,
        processing_class=processor,  # so every checkpoint folder also holds the processor files
        callbacks=[SwanLabCallback(), EpochsAndCheckpoints()],
    )
    try:
        trainer.train(resume_from_checkpoint=resume_from)
    except torch.cuda.OutOfMemoryError as error:
        raise PipelineError(
            f"the GPU ran out of memory in training (micro-batches of {micro_batch}, gradient checkpointing "
            f"{'on' if checkpointing else 'off'}). Run again to continue from the last checkpoint with a smaller "
            "--micro_batch_size, --gradient_checkpointing=true or a smaller --image_size"
        ) from error
    save_final_adapter(trainer, processor, cfg.output_dir, cfg.image_size, model_folder)
    # under ZeRO-3 each process holds a slice of every weight: all of them generate together (transformers then
    # passes synced_gpus=True), else the others would leave rank 0 waiting for slices that never come
    partitioned = is_deepspeed_zero3_enabled()
    if not (is_main_process or partitioned):
        return
    if is_main_process:
        print(f"saved the adapter, processor and {RUN_CONFIG} to {cfg.output_dir}")

    test_images = load_images(dict.fromkeys(sample["image_path"] for sample in test_samples), cfg.image_size)
    lora_model.eval()
    captions = generate_captions(lora_model, processor, [image for _, image in test_images], prompt,
                                 cfg.max_new_tokens, batch_size=cfg.per_device_train_batch_size,
                                 show_progress=is_main_process)
    if not is_main_process:
        return
    for (path, _), caption in zip(test_images, captions):
        print(f"{path}: {caption}")
    swanlab.log({"Prediction": [swanlab.Image(path, caption=caption) for (path, _), caption in zip(test_images, captions)]})
    swanlab.finish()


if __name__ == "__main__":
    run_script(main)
