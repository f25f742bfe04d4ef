"""How train.py trains fast without changing what it learns, kept out of the recipe's way.

- step_plan / plan_steps: each optimizer step's samples split into the largest micro-batches that fit in GPU
  memory (tried on the model itself), with gradient checkpointing only when even the recipe's size does not fit;
- use_feature_cache / encode_images: the frozen vision tower's features computed once per image, not every epoch;
- LengthGroupedSampler (with CaptionTrainer and SamplerEpochs): samples of similar length batched together, so
  little compute goes to padding;
- keep_caption_logits_only: logits computed only where a caption token is predicted, not over the whole prompt.
Each is exact: the loss and gradients equal those of the plain path (tests/test_speed.py).
"""
import dataclasses
import json

import psutil
import torch
from transformers import Trainer, TrainerCallback

from captioning import IGNORE_INDEX, PipelineError, load_image

SPEED_CHOICES = ("auto", "true", "false")
ZERO3_SPLITS_THE_VISION_TOWER = "DeepSpeed ZeRO-3 splits the vision tower across GPUs"


def is_zero3(deepspeed_config):
    if not deepspeed_config:
        return False
    with open(deepspeed_config, encoding="utf-8") as file:
        return json.load(file).get("zero_optimization", {}).get("stage") == 3


def micro_batch_sizes(cfg):
    """(samples in a step on each process, the micro-batch sizes that divide it, largest first)."""
    step_samples = cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps
    return step_samples, [size for size in range(step_samples, 0, -1) if step_samples % size == 0]


def check_speed_settings(cfg, deepspeed_config):
    """Refuse a speed setting that cannot be used, before anything loads."""
    for name in ("gradient_checkpointing", "cache_image_features"):
        if getattr(cfg, name) not in SPEED_CHOICES:
            raise PipelineError(f"--{name}={getattr(cfg, name)}: use auto, true or false")
    step_samples, sizes = micro_batch_sizes(cfg)
    if cfg.micro_batch_size != "auto" and (not cfg.micro_batch_size.isdigit() or int(cfg.micro_batch_size) not in sizes):
        raise PipelineError(f"--micro_batch_size={cfg.micro_batch_size}: use auto or a number that divides the "
                            f"{step_samples} samples of a step ({', '.join(map(str, sizes))})")
    if cfg.cache_image_features == "true" and is_zero3(deepspeed_config):
        raise PipelineError(f"--cache_image_features=true cannot be used: {ZERO3_SPLITS_THE_VISION_TOWER}. Use auto "
                            "or false")


def keep_caption_logits_only(batch):
    """Mark the positions whose logits the loss needs (logits_to_keep) with their targets (shift_labels): elsewhere
    the vocabulary-wide projection would be computed and thrown away."""
    next_labels = torch.nn.functional.pad(batch["labels"][:, 1:], (0, 1), value=IGNORE_INDEX)
    batch["logits_to_keep"] = next_labels != IGNORE_INDEX
    batch["shift_labels"] = next_labels[batch["logits_to_keep"]]
    return batch


def pass_cached_image_features(batch):
    """A batch's cached vision features in the model's own argument for precomputed ones (mm_encoder_outputs), with
    Qwen3-VL's deepstack features, which it adds into its first language layers."""
    from transformers.modeling_outputs import BaseModelOutputWithPooling
    from transformers.models.qwen3_vl.modeling_qwen3_vl import BaseModelOutputWithDeepstackFeatures

    if "image_features" in batch:
        pooled = (batch.pop("image_features"),)
        deepstack = batch.pop("image_deepstack_features", None)  # image tokens x vision layers x width
        batch["mm_encoder_outputs"] = {"image": BaseModelOutputWithPooling(pooler_output=pooled) if deepstack is None
                                       else BaseModelOutputWithDeepstackFeatures(
                                           pooler_output=pooled, deepstack_features=[(layer,) for layer in deepstack.unbind(1)])}
    return batch


def step_plan(cfg, fits):
    """(micro-batch size, gradient checkpointing) for optimizer steps of per_device_train_batch_size x
    gradient_accumulation_steps samples. Where a setting is auto, the first candidate for which fits(size,
    checkpointing) holds wins: the largest micro-batches without checkpointing, down to the recipe's size, then
    with checkpointing, which recomputes the forward pass but keeps the GPU busy with large micro-batches."""
    _, sizes = micro_batch_sizes(cfg)
    if cfg.micro_batch_size != "auto":
        sizes = [int(cfg.micro_batch_size)]
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
    if cfg.cache_image_features == "false":
        return False
    vision_tower = model.get_base_model().model.visual
    obstacle = ("the adapter trains part of the vision tower" if any(p.requires_grad for p in vision_tower.parameters())
                else ZERO3_SPLITS_THE_VISION_TOWER if is_zero3(deepspeed_config) else None)
    if obstacle:
        if cfg.cache_image_features == "true":
            raise PipelineError(f"--cache_image_features=true cannot be used: {obstacle}. Use auto or false")
        return False
    if cfg.cache_image_features == "true":
        return True
    images = len(dataset.image_paths())
    step_samples = cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps * num_processes
    shown = cfg.max_steps * step_samples if cfg.max_steps > 0 else len(dataset) * cfg.num_train_epochs
    vision = model.config.vision_config
    tokens = (cfg.image_size // (vision.patch_size * vision.spatial_merge_size)) ** 2
    layers = 1 + len(getattr(vision, "deepstack_visual_indexes", []))
    size = images * tokens * layers * model.config.text_config.hidden_size * model.dtype.itemsize
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
            deepstack = getattr(encoded, "deepstack_features", None)  # Qwen3-VL: [layer][image]
            for number, path in enumerate(chunk):
                features[path] = {"image_features": encoded.pooler_output[number].cpu()}
                if deepstack:
                    features[path]["image_deepstack_features"] = torch.stack(
                        [layer[number] for layer in deepstack], dim=1).cpu()
            progress.update(len(chunk))
    if num_processes > 1:
        shares = [None] * num_processes
        torch.distributed.all_gather_object(shares, features)
        features = {path: feature for share in shares for path, feature in share.items()}
    return features


class CaptionTrainer(Trainer):
    """Trainer that takes its training sampler ready-made (the dataset knows its lengths: none need encoding)."""

    def __init__(self, *args, train_sampler=None, **kwargs):
        self.length_grouped_sampler = train_sampler
        super().__init__(*args, **kwargs)

    def _get_train_sampler(self, train_dataset=None):
        return self.length_grouped_sampler or super()._get_train_sampler(train_dataset)


class SamplerEpochs(TrainerCallback):
    """Gives the sampler each epoch's number itself: accelerate does not pass it on when several processes resume in
    the middle of an epoch, and the sampler then repeated epoch 0's order there."""

    def on_epoch_begin(self, args, state, control, train_dataloader=None, **kwargs):
        sampler = train_dataloader.batch_sampler  # wrapped in accelerate's shards, then torch's batches
        while not hasattr(sampler, "set_epoch"):
            sampler = getattr(sampler, "batch_sampler", None) or sampler.sampler
        sampler.set_epoch(int(state.epoch))  # a resumed run's state.epoch is fractional, like 1.5


def plan_speed(cfg, lora_model, processor, dataset, collator, args, deepspeed_config):
    """Decide the image-feature cache and each step's micro-batches: the training arguments that carry them, and
    what run_config.json records of them."""
    step_samples, _ = micro_batch_sizes(cfg)
    cached = use_feature_cache(cfg, dataset, lora_model, deepspeed_config, args.world_size)
    if cached:
        dataset.image_features = encode_images(lora_model, processor, dataset.image_paths(), cfg.image_size,
                                               step_samples, args.process_index, args.world_size)
    micro_batch, checkpointing = plan_steps(cfg, lora_model, dataset, collator, args.world_size)
    args = dataclasses.replace(args, per_device_train_batch_size=micro_batch, activation_checkpointing=checkpointing,
                               gradient_accumulation_steps=step_samples // micro_batch,
                               # pinning copies each mapping in a batch with update(), which the model's output class
                               # that carries cached features refuses; their few MB a step need no pinning
                               dataloader_pin_memory=not cached)
    if args.process_index == 0:
        print(f"each step: {step_samples // micro_batch} micro-batch(es) of {micro_batch} samples, gradient "
              f"checkpointing {'on' if checkpointing else 'off'}, image features "
              f"{'computed once' if cached else 'computed in every step'}")
    return args, {"micro_batch_size_used": micro_batch, "gradient_checkpointing_used": checkpointing,
                            "image_features_cached": cached}
