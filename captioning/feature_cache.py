"""The feature cache: the frozen vision tower's output computed once per image instead of in every step that shows the
image, kept in one memory-mapped file per node that its processes share, and handed back to the model in each batch.
Exact, because LoRA leaves the vision tower frozen."""
import math
import os
import secrets
import shutil
import tempfile
from typing import NamedTuple

import psutil
import torch

from captioning.deepspeed_configs import ZERO3_SPLITS_THE_VISION_TOWER, is_zero3
from captioning.errors import PipelineError
from captioning.images import load_image
from captioning.models import family_of
from captioning.processes import this_node, this_process


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
    vision_tower = model.get_base_model().get_submodule(family_of(model).vision_tower)
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


def encode_images(model, processor, dataset, batch_size, folder, num_processes=1):
    """The frozen vision tower's features for each image of the dataset, computed once instead of in every step that
    shows the image, as {path: its tensors}. They are written into one memory-mapped file per node, each of the
    node's processes encoding its share; the file is unlinked once all have mapped it, so it goes when they end."""
    from tqdm import tqdm

    base_model = model.get_base_model()
    device = next(base_model.parameters()).device
    local_rank, local_processes, node = this_node(device)
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
                               disable=not this_process().is_main) as progress:
        for start in range(0, len(mine), batch_size):
            chunk = mine[start:start + batch_size]
            pixels = processor.image_processor(images=[load_image(paths[number], dataset.geometry)
                                                       for number in chunk], return_tensors="pt")
            encoded = base_model.get_image_features(pixels["pixel_values"].to(device),
                                                    pixels["image_grid_thw"].to(device))
            for number, image_rows in zip(chunk, feature_rows(encoded)):
                start, rows = offsets[paths[number]]
                features[start:start + rows] = image_rows.cpu()
            progress.update(len(chunk))
    if num_processes > 1:
        torch.distributed.barrier()  # every share written
    return {path: sample_features(features[start:start + rows]) for path, (start, rows) in offsets.items()}


def feature_rows(encoded):
    """Each image's vision features from get_image_features as one (image tokens, layers, width) tensor: the last
    vision layer, then Qwen3-VL's deepstack layers."""
    deepstack = getattr(encoded, "deepstack_features", None) or []  # Qwen3-VL: [layer][image]
    return [torch.stack([pooled, *(layer[position] for layer in deepstack)], dim=1)
            for position, pooled in enumerate(encoded.pooler_output)]


def sample_features(rows):
    """One image's feature rows as a sample's image_features (and image_deepstack_features), as the collator takes
    them."""
    return {"image_features": rows[:, 0], **({"image_deepstack_features": rows[:, 1:]} if rows.shape[1] > 1 else {})}


def pass_cached_image_features(batch, family):
    """A batch's cached vision features in the model's own argument for precomputed ones (mm_encoder_outputs)."""
    if "image_features" in batch:
        batch["mm_encoder_outputs"] = {"image": family.cached_features_output(
            batch.pop("image_features"), batch.pop("image_deepstack_features", None))}
    return batch
