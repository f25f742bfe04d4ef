"""Each optimizer step's plan, decided before training: the largest micro-batches that fit in GPU memory (the memory
probe tries them on the model), checkpointing only where even the recipe's size does not, the feature cache or not.

Neither changes what is learnt (tests/test_speed.py)."""
import dataclasses

import torch

from captioning.deepspeed_configs import ZERO3_SPLITS_THE_VISION_TOWER, is_zero3
from captioning.errors import PipelineError
from captioning.feature_cache import encode_images, use_feature_cache
from captioning.processes import print_once
from captioning.quantization import describe

SPEED_CHOICES = ("auto", "true", "false")


def micro_batch_sizes(cfg):
    """(samples in a step on each process, the micro-batch sizes that divide it, largest first)."""
    step_samples = cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps
    return step_samples, [size for size in range(step_samples, 0, -1) if step_samples % size == 0]


def check_step_settings(cfg, deepspeed_config):
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


def plan_training(cfg, lora_model, processor, dataset, collator, args, deepspeed_config, compute):
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
    print_once(f"each step: {step_samples // micro_batch} micro-batch(es) of {micro_batch} samples, {compute}, "
               f"{describe(lora_model.get_base_model(), cfg.quantization)}, "
               f"gradient checkpointing {'on' if checkpointing else 'off'}, image features "
               f"{f'computed once, {cache}' if cache else 'computed in every step'}" + (f"; {memory}" if memory else ""))
    return args, {"micro_batch_size_used": micro_batch, "gradient_checkpointing_used": checkpointing,
                  "image_features_cached": bool(cache), "precision_used": compute.precision,
                  "attention_used": compute.attention}
