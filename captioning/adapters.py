"""Trained adapters on disk: checkpoint folders, the newest one, the run_config.json beside them, merged models."""

import glob
import json
import os
import re

from captioning.errors import PipelineError

RUN_CONFIG = "run_config.json"  # the settings a training run used, saved next to its adapter
ADAPTER_CONFIG = "adapter_config.json"  # peft writes it after the weights: its presence marks a complete adapter


def checkpoint_folders(output_dir):
    """{step: folder} of the checkpoint-N folders Trainer saved in output_dir."""
    folders = {}
    for folder in glob.glob(os.path.join(output_dir, "checkpoint-*")):
        step = re.search(r"checkpoint-(\d+)$", folder)
        if step and os.path.isdir(folder):
            folders[int(step.group(1))] = folder
    return folders


def newest_checkpoint(output_dir):
    """The most recently saved adapter under output_dir: the final one or a checkpoint-N, whichever is newer."""
    candidates = {float("inf"): output_dir, **checkpoint_folders(output_dir)}  # the final adapter wins a tie
    saved = [(os.path.getmtime(os.path.join(folder, ADAPTER_CONFIG)), step, folder)
             for step, folder in candidates.items() if os.path.isfile(os.path.join(folder, ADAPTER_CONFIG))]
    if not saved:
        raise PipelineError(f"no trained adapter in {output_dir}: run train.py first, or set --checkpoint or --output_dir")
    return max(saved)[2]


def read_run_config(folder):
    """The settings training used, saved next to its adapter, in the parent of a checkpoint-N, or in a merged model."""
    for candidate in (folder, os.path.dirname(os.path.normpath(folder))):
        path = os.path.join(candidate, RUN_CONFIG)
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as file:
                return json.load(file)
    raise PipelineError(
        f"no {RUN_CONFIG} in {folder} or its parent folder: it is needed to use training's prompt and image size; "
        "point --checkpoint at an adapter saved by train.py"
    )


def trained_adapter(checkpoint, output_dir):
    """The adapter folder to use (checkpoint, or the newest under output_dir), checked, with training's settings."""
    folder = checkpoint or newest_checkpoint(output_dir)
    if not os.path.isdir(folder):
        raise PipelineError(f"checkpoint folder not found: {folder}; set --checkpoint to a folder saved by train.py")
    for name in (ADAPTER_CONFIG, "adapter_model.safetensors"):  # safetensors only: a pickled .bin could run code
        if not os.path.isfile(os.path.join(folder, name)):
            raise PipelineError(f"{folder} has no {name}: set --checkpoint to an adapter saved by train.py")
    return folder, read_run_config(folder)


def trained_model(model, checkpoint, output_dir):
    """(adapter folder or None, training's settings, the model to load): a folder written by merge.py, given as
    model, needs no adapter; else the adapter (checkpoint, or the newest under output_dir) goes on model, or on the
    base model training used."""
    if model and not checkpoint and os.path.isfile(os.path.join(model, RUN_CONFIG)):
        return None, read_run_config(model), model
    checkpoint_dir, run_config = trained_adapter(checkpoint, output_dir)
    return checkpoint_dir, run_config, model or run_config["model"]
