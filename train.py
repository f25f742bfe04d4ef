"""Step 3: LoRA fine-tune Qwen2-VL-2B-Instruct (or a Qwen2.5-VL, Qwen3-VL or Qwen3.5 model) on the conversation
JSON, with SwanLab watching.

    python train.py                                    # recipe defaults: 2 epochs, batch 4 x 4, lr 1e-4
    python train.py --model path/to/Qwen2-VL-2B-Instruct --swanlab_mode disabled --warmup_steps 0.03
    python train.py --config output/Qwen2-VL-2B/run_config.json --output_dir output/again   # repeat a run

Holds out the last test_size distinct images (data_vl_test.json), trains on the rest (data_vl_train.json), saves
checkpoints and the final adapter with the processor files and run_config.json in output_dir, then captions the
held-out images and logs them to SwanLab.
"""
import os
from collections import Counter
from contextlib import nullcontext

from captioning.checkpoints import RUN_CONFIG, resume_point, save_final_adapter, train_until_done
from captioning.data import read_conversations, report_skipped
from captioning.deepspeed_configs import resolve_deepspeed
from captioning.errors import PipelineError
from captioning.files import write_json
from captioning.generation import caption_files
from captioning.images import ASPECT_RATIOS, ImageGeometry
from captioning.locks import hold
from captioning.models import checked_image_size, load_model_and_processor, model_family, resolve_model
from captioning.precision import compute_choice
from captioning.processes import (check_shared_output_dir, decided_by_the_main_process, prepare_launch, print_once,
                                  this_process)
from captioning.quantization import check_quantization
from captioning.scripts import run_script
from captioning.served_files import pin_image_size
from captioning.settings import parse_dataclass_settings, parse_settings, require_positive
from captioning.tracking import start_swanlab, swanlab_run_mode
from captioning.training_samples import CaptionCollator, CaptionDataset

# torch, transformers and the modules built on them (captioning.step_plan, captioning.trainer) are imported where
# they are used, so that --help answers at once

# ----------------------------------------------------------------------------- settings
model = "Qwen/Qwen2-VL-2B-Instruct"  # a Qwen2-VL, Qwen2.5-VL, Qwen3-VL or Qwen3.5: hub id (ModelScope, into ./Qwen/...) or folder
json_path = "data_vl.json"  # written by csv2json.py
output_dir = "output/Qwen2-VL-2B"  # the same in every script: --help
test_size = 4  # distinct images held out for testing, taken from the end of the data
num_train_epochs = 2.0
max_steps = -1  # > 0 overrides num_train_epochs
per_device_train_batch_size = 4
gradient_accumulation_steps = 4  # an optimizer step takes 4 x 4 = 16 samples on each GPU, as in the recipe
micro_batch_size = "auto"  # samples per forward pass; auto: as many of a step's samples as fit in GPU memory | a number
learning_rate = 1e-4
lora_r = 64
lora_alpha = 16
lora_dropout = 0.05
use_dora = False  # DoRA (peft's weight-decomposed LoRA) instead of plain LoRA: merges alike, each step costs more
quantization = "none"  # the same in every script: --help
image_size = 0  # images are resized to at most this squared in pixels, in training and inference; 0: 280 (Qwen2-VL, Qwen2.5-VL), 288 (Qwen3-VL, Qwen3.5)
aspect_ratio = "keep"  # keep: each photo keeps its shape, as serving engines resize it | square: squashed to image_size x image_size, as the recipe
max_length = 8192  # samples with more tokens are skipped, never cut through their image tokens
logging_steps = 10
save_steps = 100
max_new_tokens = 128  # for the held-out captions generated after training
precision = "auto"  # the same in every script: --help
attention = "auto"  # the same in every script: --help
gradient_checkpointing = "auto"  # auto: only when memory needs it (it costs ~1/3 more compute) | true | false
cache_image_features = "auto"  # auto: when training shows an image more than once (epochs, several captions) | true | false
group_by_length = True  # batch samples of similar length together, so less compute goes to padding
dataloader_num_workers = 2  # processes that load and preprocess images while the GPU trains
deepspeed = ""  # the same in every script: --help
resume = "auto"  # the same in every script: --help
swanlab_mode = "auto"  # the same in every script: --help
swanlab_project = "Qwen2-VL-finetune"  # the same in every script: --help
swanlab_run_name = ""  # the same in every script: --help
seed = 42
debug = False  # show the full traceback of a failure
# -----------------------------------------------------------------------------

PASSED_TO_TRAINING_ARGUMENTS = ("output_dir", "per_device_train_batch_size", "gradient_accumulation_steps",
                                "num_train_epochs", "max_steps", "learning_rate", "logging_steps", "save_steps",
                                "dataloader_num_workers", "seed")  # as they are


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


# ----------------------------------------------------------------------------- settings checked before anything loads

def training_arguments(from_file, from_argv, block):
    """Any transformers.TrainingArguments field that the settings above do not name can be given too, e.g.
--lr_scheduler_type cosine --warmup_steps 0.03 --weight_decay 0.01 --save_total_limit 3 --max_grad_norm 1.0"""
    if not (from_file or from_argv):
        return {}
    from transformers import TrainingArguments

    given = parse_dataclass_settings(TrainingArguments, from_file, from_argv, block)
    given.pop("local_rank", None)  # the deepspeed launcher passes it; LOCAL_RANK in the environment says the same
    return given


def check_settings(cfg):
    """Refuse what train.py cannot use before the model or data load; returns the DeepSpeed config file, if any, and
    the Compute (precision and attention) to train with. Sets image_size to the model family's default when it is 0,
    so that run_config.json records the size used."""
    from captioning.step_plan import check_step_settings

    cfg.image_size = checked_image_size(cfg.image_size, model_family(cfg.model))
    require_positive(cfg, "per_device_train_batch_size", "gradient_accumulation_steps", "lora_r", "max_new_tokens")
    if cfg.resume not in ("auto", "never"):
        raise PipelineError(f"--resume={cfg.resume}: use auto or never")
    if cfg.aspect_ratio not in ASPECT_RATIOS:
        raise PipelineError(f"--aspect_ratio={cfg.aspect_ratio}: use {' or '.join(ASPECT_RATIOS)}")
    deepspeed_config = resolve_deepspeed(cfg.deepspeed)
    check_step_settings(cfg, deepspeed_config)
    check_quantization(cfg.quantization, deepspeed_config)
    return deepspeed_config, compute_choice(cfg.precision, cfg.attention)


# ----------------------------------------------------------------------------- the run, phase by phase

def split_data(cfg, is_main_process):
    """Training and held-out samples, split by image (the same on every process), and what run_config.json records
    of them: the prompt they share and the two files written."""
    samples = read_conversations(cfg.json_path)
    train_samples, test_samples = split_by_image(samples, cfg.test_size)
    stem, extension = os.path.splitext(cfg.json_path)
    train_json, test_json = (f"{stem}_{part}{extension or '.json'}" for part in ("train", "test"))  # data_vl_train.json
    if is_main_process:
        write_json(train_json, [sample["entry"] for sample in train_samples])
        write_json(test_json, [sample["entry"] for sample in test_samples])
        print(f"{len(train_samples)} training samples -> {train_json}; {len(test_samples)} held out -> {test_json}")
    data = {"prompt": Counter(sample["prompt"] for sample in samples).most_common(1)[0][0],
            "train_json": os.path.abspath(train_json), "test_json": os.path.abspath(test_json)}
    return train_samples, test_samples, data


def lora_model_and_processor(cfg, model_folder, compute, geometry):
    """The base model in compute's precision (its language model quantized, if asked) with LoRA or DoRA on its
    language model's projections (their weights in fp32, as mixed precision needs), and its processor pinned to the
    image geometry (so each checkpoint's processor files carry training's image size). A quantized base takes no
    k-bit preparation: peft's would upcast the frozen vision tower to fp32 (1.3 GB more on the 2B model), and what
    else it does, freezing the base and checkpointing without input gradients, happens here anyway."""
    from peft import LoraConfig, TaskType, get_peft_model

    base_model, processor = load_model_and_processor(model_folder, compute, quantization=cfg.quantization)
    pin_image_size(processor, geometry)
    target_modules = model_family(model_folder).lora_target_modules
    lora_config = LoraConfig(task_type=TaskType.CAUSAL_LM, target_modules=target_modules, r=cfg.lora_r,
                             lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, use_dora=cfg.use_dora)
    lora_model = get_peft_model(base_model, lora_config)
    lora_model.print_trainable_parameters()
    return lora_model, processor


def trainer_arguments(cfg, deepspeed_config, compute):
    """TrainingArguments from the settings, then any TrainingArguments field given beside them. Creating them also
    joins this process to the others under torchrun and picks its device."""
    from transformers import TrainingArguments

    given_beside_the_block = {name: value for name, value in vars(cfg).items() if name not in globals()}
    return TrainingArguments(**{
        **{name: getattr(cfg, name) for name in PASSED_TO_TRAINING_ARGUMENTS},
        "logging_first_step": True,
        "activation_checkpointing_kwargs": {"use_reentrant": False},
        "dataloader_persistent_workers": cfg.dataloader_num_workers > 0,
        "bf16": compute.precision == "bf16",
        "fp16": compute.precision == "fp16",  # with loss scaling
        "use_cpu": compute.device == "cpu",
        "report_to": "none",  # SwanLab is attached as a callback
        "deepspeed": deepspeed_config,
        "ddp_find_unused_parameters": False,  # LoRA uses every adapter weight in each step
        **given_beside_the_block,
        "remove_unused_columns": False,  # the collator needs pixel_values and image_grid_thw
    })


def train(trainer, resume_from, plan):
    """Train, then save trainer_state.json and train_results.json at the top of output_dir, as the Hugging Face
    example scripts do."""
    import torch

    try:
        result = train_until_done(trainer, resume_from)
    except torch.cuda.OutOfMemoryError as error:
        raise PipelineError(
            f"the GPU ran out of memory in training (micro-batches of {plan['micro_batch_size_used']}, gradient "
            f"checkpointing {'on' if plan['gradient_checkpointing_used'] else 'off'}). Run again to continue from the "
            "last checkpoint with a smaller --micro_batch_size or --gradient_checkpointing=true, or start afresh "
            "(--resume=never) with a smaller --image_size or --quantization=4bit"
        ) from error
    trainer.save_metrics("train", result.metrics)
    trainer.save_state()


def caption_held_out(cfg, lora_model, processor, geometry, test_samples, prompt, is_main_process):
    """Caption the held-out images, print the captions and log them to SwanLab. Under ZeRO-3 each process holds a
    slice of every weight, so all of them generate together (transformers then passes synced_gpus=True); else the
    others would leave the main process waiting for slices that never come."""
    import swanlab
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

    if not (is_main_process or is_deepspeed_zero3_enabled()):
        return
    lora_model.eval()
    captioned = caption_files(lora_model, processor, dict.fromkeys(sample["image_path"] for sample in test_samples),
                              geometry, prompt, cfg.max_new_tokens, batch_size=cfg.per_device_train_batch_size,
                              description="captioning the held-out images", show_progress=is_main_process)
    if not is_main_process:
        return
    for path, caption in captioned:
        print(f"{path}: {caption}")
    swanlab.log({"Prediction": [swanlab.Image(path, caption=caption) for path, caption in captioned]})
    swanlab.finish()


def train_and_caption(cfg, deepspeed_config, compute, is_main_process):
    """The run, phase by phase: split the data, load the model with LoRA, build the dataset, plan the steps, train,
    save the adapter, caption the held-out images."""
    mode = swanlab_run_mode(cfg.swanlab_mode) if is_main_process else "disabled"
    alone = this_process().count == 1
    if alone:  # decided before the model loads, so that a finished run is refused at once
        resume_from, earlier_run = resume_point(cfg, is_main_process)

    train_samples, test_samples, data = split_data(cfg, is_main_process)
    # imported once the data is read (they take seconds), so that a missing or broken file is reported at once
    from swanlab.integration.transformers import SwanLabCallback
    from transformers import set_seed

    from captioning.step_plan import plan_training
    from captioning.trainer import CaptionTrainer, LengthGroupedSampler, ReadableCheckpoints, SamplerEpochs

    set_seed(cfg.seed)
    model_folder = resolve_model(cfg.model)
    family = model_family(model_folder)
    geometry = ImageGeometry(cfg.image_size, family.side_multiple, cfg.aspect_ratio == "square")
    if geometry.square:
        print_once(f"warning: aspect_ratio=square: every image is squashed to {cfg.image_size}x{cfg.image_size} as the "
                   "recipe does, but transformers, vLLM and llama.cpp keep a photo's aspect ratio when they resize it, so "
                   "served captions of photos that are not square can differ from infer.py's")
    lora_model, processor = lora_model_and_processor(cfg, model_folder, compute, geometry)

    dataset = CaptionDataset(train_samples, processor, geometry, cfg.max_length, show_progress=is_main_process)
    if is_main_process:
        report_skipped(dataset.skipped, "training samples")
    if not len(dataset):
        raise PipelineError(f"no training sample is left in {cfg.json_path} after skipping the ones listed above")

    collator = CaptionCollator(processor.tokenizer.pad_token_id, family)
    # created after the model loads, so that ZeRO-3 partitions it when DeepSpeed starts, as it always did
    args = trainer_arguments(cfg, deepspeed_config, compute)  # joins the processes, if several
    check_shared_output_dir(cfg.output_dir, args)
    if not alone:  # by the main process, once all have joined and seen output_dir
        resume_from, earlier_run = decided_by_the_main_process(lambda: resume_point(cfg, is_main_process),
                                                                args.process_index, args.world_size)
    lora_model.to(args.device)
    args, plan = plan_training(cfg, lora_model, processor, dataset, collator, args, deepspeed_config, compute)
    step_samples = cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps * args.world_size
    sampler = LengthGroupedSampler(dataset.lengths, step_samples, cfg.seed) if cfg.group_by_length else None
    trainer = CaptionTrainer(model=lora_model, args=args, train_dataset=dataset, data_collator=collator,
                             processing_class=processor,  # so every checkpoint folder also holds the processor files
                             train_sampler=sampler, callbacks=[SwanLabCallback(), SamplerEpochs(), ReadableCheckpoints()])

    model_path = os.path.abspath(cfg.model) if os.path.isdir(cfg.model) else cfg.model  # usable from any folder
    run_config = {**vars(cfg), "model": model_path, "family": family.name, **data,
                  "swanlab_mode_used": mode, "world_size": args.world_size, **plan}
    run = start_swanlab(mode, cfg.swanlab_project, swanlab_project, cfg.swanlab_run_name or
                        os.path.basename(os.path.normpath(cfg.output_dir)), run_config, earlier_run.get("swanlab_run_id"))
    if is_main_process:
        os.makedirs(cfg.output_dir, exist_ok=True)
        write_json(os.path.join(cfg.output_dir, RUN_CONFIG), {**run_config, "swanlab_run_id": run.id})

    train(trainer, resume_from, plan)
    save_final_adapter(trainer, processor, cfg.output_dir, geometry, model_folder)
    print_once(f"saved the adapter, processor and {RUN_CONFIG} to {cfg.output_dir}")
    caption_held_out(cfg, lora_model, processor, geometry, test_samples, data["prompt"], is_main_process)


def main(argv=()):
    is_main_process = this_process().is_main  # only it writes files, logs and prints captions
    cfg = parse_settings(globals(), argv, more_settings=training_arguments)
    prepare_launch()  # before any CUDA query: it may set CUDA_VISIBLE_DEVICES
    deepspeed_config, compute = check_settings(cfg)
    with hold(cfg.output_dir) if is_main_process else nullcontext():  # one run per output_dir at a time
        train_and_caption(cfg, deepspeed_config, compute, is_main_process)


if __name__ == "__main__":
    run_script(main)
