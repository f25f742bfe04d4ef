"""A training run's folder and launch, for train.py: resuming an interrupted run, saving the final adapter so that
no interruption leaves half of one, checkpoints readable by all, DeepSpeed configs and launcher mistakes."""
import importlib.util
import json
import os
import secrets
import shutil
import socket

import torch
from transformers import TrainerCallback

from captioning.adapters import ADAPTER_CONFIG, RUN_CONFIG, checkpoint_folders
from captioning.disk_full import stop_if_disk_full
from captioning.errors import PipelineError
from captioning.files import readable_by_all
from captioning.model_files import save_processor

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


def check_shared_output_dir(output_dir, args):
    """Stop every process at once unless all of them see the main process's output_dir: only the main process writes
    the checkpoints there, and every process resumes from them (a node resuming alone from its own folder would
    start from step 0 while the others continue)."""
    if args.world_size == 1:
        return
    token = [secrets.token_hex(8)]
    torch.distributed.broadcast_object_list(token, src=0)
    marker = os.path.join(output_dir, f".shared-by-all-processes-{token[0]}")
    if args.process_index == 0:
        os.makedirs(output_dir, exist_ok=True)
        with open(marker, "w", encoding="utf-8") as file:
            file.write(token[0])
    torch.distributed.barrier()
    seen = os.path.isfile(marker)
    everywhere = torch.tensor([int(seen)], device=args.device)
    torch.distributed.all_reduce(everywhere, op=torch.distributed.ReduceOp.MIN)
    if args.process_index == 0:
        os.remove(marker)
    if not everywhere.item():
        raise PipelineError(
            f"--output_dir={output_dir} is not one folder shared by every process: a file the main process wrote "
            f"there is not seen on every node (this one, {socket.gethostname()}, {'sees' if seen else 'does not see'} "
            "it). Checkpoints are written by the main process alone and every node resumes from them, so output_dir "
            "must be on storage all nodes share (NFS, Lustre, a mounted bucket): give "
            "--output_dir such a folder"
        )


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


def prepare_launch():
    """Whether a launcher (torchrun, accelerate) started one process per GPU. A process started alone trains on one
    GPU: with several visible, Trainer would wrap the model in DataParallel, which splits the concatenated
    pixel_values of a batch across GPUs out of step with their images."""
    distributed = "WORLD_SIZE" in os.environ
    # `accelerate launch --cpu --num_processes=N` without an MPI hostfile starts one process and says nothing
    if "MASTER_ADDR" in os.environ and not distributed and "OMPI_COMM_WORLD_SIZE" not in os.environ \
            and "PMI_SIZE" not in os.environ:
        print("warning: the launcher set MASTER_ADDR for several processes, but this process runs alone (no "
              "WORLD_SIZE). `accelerate launch --cpu` starts one process unless given an MPI hostfile: use "
              "`torchrun --nproc_per_node=N train.py`, or `accelerate launch --multi_gpu --num_processes=N train.py`")
    if not distributed:
        os.environ.setdefault("CUDA_VISIBLE_DEVICES", "0")
        if torch.cuda.device_count() > 1:
            raise PipelineError(
                f"CUDA_VISIBLE_DEVICES={os.environ['CUDA_VISIBLE_DEVICES']} shows several GPUs to one process: "
                "set it to one GPU, e.g. CUDA_VISIBLE_DEVICES=0, or launch one process per GPU with torchrun"
            )
    return distributed


class ReadableCheckpoints(TrainerCallback):
    def on_save(self, args, state, control, **kwargs):  # safetensors writes the adapter readable by us alone
        if state.is_world_process_zero:
            readable_by_all(os.path.join(args.output_dir, f"checkpoint-{state.global_step}"))


DEEPSPEED_CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "deepspeed")  # beside train.py


def resolve_deepspeed(choice):
    """The DeepSpeed config file for the deepspeed setting, or None."""
    if not choice:
        return None
    shipped = os.path.join(DEEPSPEED_CONFIGS, f"{choice}.json")
    path = shipped if choice in ("zero2", "zero3") else choice
    if not os.path.isfile(path):
        raise PipelineError(f"--deepspeed={choice}: use zero2, zero3 or the path of a DeepSpeed JSON config")
    if importlib.util.find_spec("deepspeed") is None:
        raise PipelineError(f"--deepspeed={choice} needs DeepSpeed, which is not installed: pip install deepspeed")
    return path
