"""How train.py trains fast without changing what it learns, kept out of the recipe's way.

- step_plan / plan_steps: each optimizer step's samples split into the largest micro-batches that fit in GPU
  memory (tried on the model itself), with gradient checkpointing only when even the recipe's size does not fit;
- use_feature_cache / encode_images: the frozen vision tower's features computed once per image, not every epoch,
  kept in one memory-mapped file per node;
- LengthGroupedSampler (with CaptionTrainer and SamplerEpochs): samples of similar length batched together, so
  little compute goes to padding;
- keep_caption_logits_only: logits computed only where a caption token is predicted, not over the whole prompt.
Each is exact: the loss and gradients equal those of the plain path (tests/test_speed.py).
"""
import dataclasses
import json
import math
import os
import secrets
import shutil
import tempfile
from typing import NamedTuple

import psutil
import torch
from transformers import Trainer, TrainerCallback

from captioning.chat import IGNORE_INDEX
from captioning.errors import PipelineError
from captioning.images import load_image
from captioning.quantization import describe

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


class GpuMemory:
    """The CUDA memory readings the memory probe takes, in one class so that tests can fake a GPU."""

    def __init__(self, device):
        self.device = device

    def total(self):
        return torch.cuda.get_device_properties(self.device).total_memory

    def start(self):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)

    def peak(self):  # reserved, not allocated: what the caching allocator took from the GPU, fragments included
        return torch.cuda.max_memory_reserved(self.device)


MEMORY_MARGIN = 0.10  # of the GPU's memory left free beyond what the probe counts: NCCL buffers, fragmentation


def memory_probe(model, dataset, collator, num_processes, compute, memory=None):
    """fits(size, checkpointing): whether training on micro-batches of the size longest samples fits in the memory
    of every process's GPU: one forward and backward pass tried on the model itself, its peak plus what the first
    optimizer step adds (AdamW's two fp32 moments, and DDP's gradient buckets with several processes) within the
    GPU's memory less MEMORY_MARGIN. fits.needed holds the bytes counted for each candidate tried here."""
    from accelerate.utils import send_to_device

    longest = sorted(range(len(dataset)), key=dataset.lengths.__getitem__, reverse=True)
    device = next(model.parameters()).device
    memory = memory or GpuMemory(device)
    trainable_bytes = sum(p.numel() * 4 for p in model.parameters() if p.requires_grad)  # fp32, as mixed precision keeps them
    after_the_step = trainable_bytes * (2 + (num_processes > 1))

    def fits_here(size, checkpointing):
        set_gradient_checkpointing(model, checkpointing)
        model.train()  # checkpointing acts only in training mode
        memory.start()
        try:
            batch = send_to_device(collator([dataset[index] for index in longest[:size]]), device)
            with torch.autocast(device.type, dtype=compute.dtype, enabled=compute.precision != "fp32"):
                model(**batch).loss.backward()
            fits.needed[size, checkpointing] = memory.peak() + after_the_step
        except torch.cuda.OutOfMemoryError:
            return False
        finally:
            model.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()
        return fits.needed[size, checkpointing] <= memory.total() * (1 - MEMORY_MARGIN)

    def fits(size, checkpointing):
        everywhere = torch.tensor([int(fits_here(size, checkpointing))], device=device)
        if num_processes > 1:  # every process must choose the same plan
            torch.distributed.all_reduce(everywhere, op=torch.distributed.ReduceOp.MIN)
        return bool(everywhere.item())

    fits.needed, fits.total = {}, memory.total
    return fits


def plan_steps(cfg, model, dataset, collator, num_processes, compute):
    """step_plan with the memory probe on a GPU, or the whole step in one micro-batch on a CPU, whose memory is the
    machine's; the model is left with the planned gradient checkpointing. Returns the micro-batch size, the
    checkpointing and, on a GPU, a line on the memory the plan needs."""
    on_gpu = next(model.parameters()).device.type == "cuda"
    fits = memory_probe(model, dataset, collator, num_processes, compute) if on_gpu else lambda size, checkpointing: True
    micro_batch, checkpointing = step_plan(cfg, fits)
    set_gradient_checkpointing(model, checkpointing)
    needed = getattr(fits, "needed", {}).get((micro_batch, checkpointing))
    memory = (f"GPU memory {needed / 2**30:.1f} of {fits.total() / 2**30:.1f} GiB measured with the optimizer's "
              f"states, {MEMORY_MARGIN:.0%} kept free" if needed else "")
    return micro_batch, checkpointing, memory


def set_gradient_checkpointing(model, enabled):
    base_model = model.get_base_model()
    if enabled == base_model.is_activation_checkpointing:
        return
    if enabled:
        base_model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        # transformers hooks every input embedding to require grad, the vision tower's too, which would then
        # backpropagate through the frozen tower: non-reentrant checkpointing needs no input gradient at all
        base_model.disable_input_require_grads()
    else:
        base_model.activation_checkpointing_disable()


class FeatureCachePlan(NamedTuple):
    """Where the cached image features go: one memory-mapped file per node in folder, which its processes share."""
    size: int  # bytes of one copy
    folder: str
    in_memory: bool  # whether the node's free memory holds it; else it is read from local disk as needed

    def __str__(self):
        held = "held in memory" if self.in_memory else "more than half the free memory: read from disk"
        return f"{self.size / 2**30:.2f} GiB in one memory-mapped file per node in {self.folder} ({held})"


def agreed_readings(readings, device, num_processes):
    """The smallest of each reading over all processes, so that every one takes the same decision from them."""
    agreed = torch.tensor(readings, dtype=torch.int64, device=device)
    if num_processes > 1:
        torch.distributed.all_reduce(agreed, op=torch.distributed.ReduceOp.MIN)
    return agreed.tolist()


def feature_layout(model):
    """(layers, width) of each image token's cached features: the last vision layer and Qwen3-VL's deepstack layers,
    at the language model's width."""
    vision = model.config.vision_config
    return 1 + len(getattr(vision, "deepstack_visual_indexes", [])), model.config.text_config.hidden_size


def image_token_offsets(dataset):
    """{path: (first row, rows)} of each image's features in the cache file, one row per image token."""
    offsets, start = {}, 0
    for path in dataset.image_paths():
        rows = dataset.geometry.tokens(dataset.image_sizes[path])
        offsets[path], start = (start, rows), start + rows
    return offsets


def use_feature_cache(cfg, dataset, model, deepspeed_config, num_processes):
    """A FeatureCachePlan when each image's vision features are to be computed once, else None: exact, because LoRA
    leaves the vision tower frozen, and faster whenever training shows an image more than once. Every process
    decides alike, from the smallest free memory and disk any of them reads: one copy of the features per node,
    kept in memory when less than half of that memory holds them, else read back from the local disk."""
    if cfg.cache_image_features == "false":
        return None
    vision_tower = model.get_base_model().model.visual
    obstacle = ("the adapter trains part of the vision tower" if any(p.requires_grad for p in vision_tower.parameters())
                else ZERO3_SPLITS_THE_VISION_TOWER if is_zero3(deepspeed_config) else None)
    if obstacle:
        if cfg.cache_image_features == "true":
            raise PipelineError(f"--cache_image_features=true cannot be used: {obstacle}. Use auto or false")
        return None
    images = len(dataset.image_paths())
    step_samples = cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps * num_processes
    shown = cfg.max_steps * step_samples if cfg.max_steps > 0 else len(dataset) * cfg.num_train_epochs
    if cfg.cache_image_features == "auto" and shown <= images:
        return None
    layers, width = feature_layout(model)
    tokens = sum(rows for _, rows in image_token_offsets(dataset).values())
    size = tokens * layers * width * model.dtype.itemsize
    folder = tempfile.gettempdir()
    free_memory, free_disk = agreed_readings([psutil.virtual_memory().available, shutil.disk_usage(folder).free],
                                             next(model.parameters()).device, num_processes)
    if size > free_disk * 0.9:
        message = (f"the image features ({size / 2**30:.1f} GiB) do not fit in the {free_disk / 2**30:.1f} GiB "
                   f"free in {folder}")
        if cfg.cache_image_features == "true":
            raise PipelineError(f"{message}: set TMPDIR to a folder on a local disk with room, or use "
                                "--cache_image_features=auto or false")
        print(f"not caching image features: {message} (TMPDIR sets the folder)")
        return None
    return FeatureCachePlan(size, folder, in_memory=size <= free_memory / 2)


def this_node(num_processes, device):
    """(this process's rank among its node's processes, how many they are, the node's first global rank): a node's
    processes are numbered one after another, so RANK - LOCAL_RANK names the node."""
    first = int(os.environ.get("RANK", "0")) - int(os.environ.get("LOCAL_RANK", "0"))
    if num_processes == 1:
        return 0, 1, first
    firsts = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(num_processes)]
    torch.distributed.all_gather(firsts, torch.tensor([first], device=device))
    firsts = [int(rank) for rank in firsts]
    return int(os.environ.get("LOCAL_RANK", "0")), firsts.count(first), first


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


def encode_images(model, processor, dataset, batch_size, folder, num_processes=1):
    """The frozen vision tower's features for each image of the dataset, computed once instead of in every step that
    shows the image, as {path: its tensors}. They are written into one memory-mapped file per node, each of the
    node's processes encoding its share; the file is unlinked once all have mapped it, so it goes when they end."""
    from tqdm import tqdm

    base_model = model.get_base_model()
    device = next(base_model.parameters()).device
    local_rank, local_processes, node = this_node(num_processes, device)
    run = [secrets.token_hex(6)]
    if num_processes > 1:
        torch.distributed.broadcast_object_list(run, src=0)
    cache_file = os.path.join(folder, f"train-image-features-{run[0]}-node{node}.bin")
    paths, offsets = dataset.image_paths(), image_token_offsets(dataset)
    shape = (sum(rows for _, rows in offsets.values()), *feature_layout(model))
    if local_rank == 0:
        with open(cache_file, "wb") as file:
            file.truncate(math.prod(shape) * model.dtype.itemsize)  # sparse: the disk fills as features are written
    if num_processes > 1:
        torch.distributed.barrier()
    features = torch.from_file(cache_file, shared=True, size=math.prod(shape), dtype=model.dtype).view(shape)
    if num_processes > 1:
        torch.distributed.barrier()
    if local_rank == 0:
        os.remove(cache_file)  # the processes' mappings keep it until they end, however they end
    mine = list(range(local_rank, len(paths), local_processes))
    with torch.no_grad(), tqdm(total=len(mine), desc="encoding images", unit="image",
                               disable=int(os.environ.get("RANK", "0")) != 0) as progress:
        for start in range(0, len(mine), batch_size):
            chunk = mine[start:start + batch_size]
            pixels = processor.image_processor(images=[load_image(paths[number], dataset.geometry)
                                                       for number in chunk], return_tensors="pt")
            encoded = base_model.get_image_features(pixels["pixel_values"].to(device),
                                                    pixels["image_grid_thw"].to(device))
            deepstack = getattr(encoded, "deepstack_features", None) or []  # Qwen3-VL: [layer][image]
            for position, number in enumerate(chunk):
                start, rows = offsets[paths[number]]
                features[start:start + rows] = torch.stack([encoded.pooler_output[position],
                                                            *(layer[position] for layer in deepstack)], dim=1).cpu()
            progress.update(len(chunk))
    if num_processes > 1:
        torch.distributed.barrier()  # every share written
    deepstack = features.shape[1] > 1
    return {path: {"image_features": features[start:start + rows, 0],
                   **({"image_deepstack_features": features[start:start + rows, 1:]} if deepstack else {})}
            for path, (start, rows) in offsets.items()}


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


def plan_speed(cfg, lora_model, processor, dataset, collator, args, deepspeed_config, compute):
    """Decide the image-feature cache and each step's micro-batches: the training arguments that carry them, and
    what run_config.json records of them. Prints the plan."""
    step_samples, _ = micro_batch_sizes(cfg)
    cache = use_feature_cache(cfg, dataset, lora_model, deepspeed_config, args.world_size)
    if cache:
        dataset.image_features = encode_images(lora_model, processor, dataset, step_samples, cache.folder,
                                               args.world_size)
    micro_batch, checkpointing, memory = plan_steps(cfg, lora_model, dataset, collator, args.world_size, compute)
    args = dataclasses.replace(args, per_device_train_batch_size=micro_batch,
                               gradient_accumulation_steps=step_samples // micro_batch,
                               # the model carries the planned checkpointing (set_gradient_checkpointing): Trainer's
                               # own would hook the vision tower's input to require grad again
                               activation_checkpointing=False,
                               # pinning copies each mapping in a batch with update(), which the model's output class
                               # that carries cached features refuses; their few MB a step need no pinning
                               dataloader_pin_memory=not cache)
    if args.process_index == 0:
        print(f"each step: {step_samples // micro_batch} micro-batch(es) of {micro_batch} samples, {compute}, "
              f"{describe(lora_model.get_base_model(), cfg.quantization)}, "
              f"gradient checkpointing {'on' if checkpointing else 'off'}, image features "
              f"{f'computed once, {cache}' if cache else 'computed in every step'}" + (f"; {memory}" if memory else ""))
    return args, {"micro_batch_size_used": micro_batch, "gradient_checkpointing_used": checkpointing,
                  "image_features_cached": bool(cache), "precision_used": compute.precision,
                  "attention_used": compute.attention}
