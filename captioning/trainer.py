"""Trainer as train.py uses it: a length-grouped sampler (samples of similar length batched together, so little
compute goes to padding), given each epoch's number, and checkpoints readable by all."""
import os

import torch
from transformers import Trainer, TrainerCallback

from captioning.files import readable_by_all


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


class ReadableCheckpoints(TrainerCallback):
    def on_save(self, args, state, control, **kwargs):  # safetensors writes the adapter readable by us alone
        if state.is_world_process_zero:
            readable_by_all(os.path.join(args.output_dir, f"checkpoint-{state.global_step}"))
