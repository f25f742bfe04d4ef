"""Checkpoints and adapters on disk, every decision about them in one place: the checkpoint folders, which are
complete, where an interrupted run resumes, the final adapter written so that no interruption leaves half of one,
the newest adapter and the run_config.json beside it, merged models."""

import glob
import json
import os
import re
import shutil

from captioning.disk_full import stop_if_disk_full
from captioning.errors import PipelineError
from captioning.files import readable_by_all
from captioning.served_files import save_processor

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


# ----------------------------------------------------------------------------- a training run's checkpoints

TRAINER_STATE = "trainer_state.json"  # Trainer writes it last into a checkpoint: its presence marks a complete one
# what a checkpoint holds beside the adapter and processor files
TRAINING_STATE = ("optimizer.pt", "scheduler.pt", "rng_state", "training_args.bin", TRAINER_STATE)


def finished_writing(folder):
    """Whether Trainer wrote the checkpoint's trainer_state.json whole: a run killed while writing it leaves it cut."""
    try:
        with open(os.path.join(folder, TRAINER_STATE), encoding="utf-8") as file:
            json.load(file)
        return True
    except (OSError, ValueError):
        return False


def newest_complete_checkpoint(output_dir):
    """The checkpoint-N with the highest step that Trainer finished writing, or None."""
    complete = {step: folder for step, folder in checkpoint_folders(output_dir).items() if finished_writing(folder)}
    return complete[max(complete)] if complete else None


def unfinished_checkpoints(output_dir):
    return [folder for folder in checkpoint_folders(output_dir).values() if not finished_writing(folder)]


def space_for_a_save(model, output_dir, training_state):
    """About the bytes one save takes: the newest checkpoint's files (without the optimizer, scheduler and RNG state
    unless training_state), else the adapter's weights, three times over with Adam's two moments."""
    newest = newest_complete_checkpoint(output_dir)
    if newest:
        return sum(os.path.getsize(os.path.join(newest, name)) for name in os.listdir(newest)
                   if training_state or not name.startswith(TRAINING_STATE))
    adapter = sum(getattr(p, "ds_numel", p.numel()) * p.element_size() for p in model.parameters() if p.requires_grad)
    return adapter * 3 if training_state else adapter


def train_until_done(trainer, resume_from):
    """trainer.train, stopped with a message when a checkpoint finds the disk full; the checkpoint it was writing is
    removed, so the next run resumes from the one before."""
    output_dir = trainer.args.output_dir
    with stop_if_disk_full(output_dir, "a checkpoint", lambda: space_for_a_save(trainer.model, output_dir, True),
                           partial=lambda: unfinished_checkpoints(output_dir) if trainer.is_world_process_zero() else [],
                           setting="output_dir", then="it resumes from the newest complete checkpoint"):
        return trainer.train(resume_from_checkpoint=resume_from)


# settings that may change when a run is resumed: they do not shape the training itself
RESUMABLE_CHANGES = {"resume", "debug", "swanlab_mode", "swanlab_project", "swanlab_run_name", "max_new_tokens",
                     "logging_steps", "deepspeed", "gradient_checkpointing", "dataloader_num_workers",
                     "micro_batch_size", "cache_image_features", "precision", "attention"}  # another GPU may resume


def resume_point(cfg, is_main_process):
    """(checkpoint to continue from, the run_config.json it was started with), or (None, {}) to start afresh; a
    finished run is never silently replaced."""
    finished = os.path.isfile(os.path.join(cfg.output_dir, ADAPTER_CONFIG))
    checkpoint = newest_complete_checkpoint(cfg.output_dir)
    if cfg.resume == "never":
        if (finished or checkpoint) and is_main_process:
            print(f"resume=never: replacing the earlier run in {cfg.output_dir}")
            for folder in checkpoint_folders(cfg.output_dir).values():
                shutil.rmtree(folder)
            if finished:
                os.remove(os.path.join(cfg.output_dir, ADAPTER_CONFIG))
        return None, {}
    if finished:
        raise PipelineError(
            f"{cfg.output_dir} already holds a finished training run. To keep it, choose another --output_dir; "
            "to train again and replace it, add --resume=never"
        )
    earlier = {}
    if checkpoint:
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
    return checkpoint, earlier


def save_final_adapter(trainer, processor, output_dir, geometry, base_model):
    """Save the adapter and processor files so that an interruption never leaves a half-written adapter behind:
    everything is written to a staging folder, then moved in with adapter_config.json last."""
    staging = os.path.join(output_dir, "final-adapter.part")
    main_process = trainer.is_world_process_zero()
    if main_process:
        shutil.rmtree(staging, ignore_errors=True)
    with stop_if_disk_full(output_dir, "the final adapter", lambda: space_for_a_save(trainer.model, output_dir, False),
                           partial=[staging] if main_process else [], setting="output_dir",
                           then="training is done, so it saves the final adapter from the last checkpoint"):
        trainer.save_model(staging)  # on every process: DeepSpeed ZeRO-3 gathers the weights from all of them
        if main_process:
            save_processor(processor, staging, geometry, base_model)
    if main_process:
        readable_by_all(staging)
        for name in sorted(os.listdir(staging), key=lambda name: name == ADAPTER_CONFIG):
            os.replace(os.path.join(staging, name), os.path.join(output_dir, name))
        os.rmdir(staging)
