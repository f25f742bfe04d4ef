"""The processes a launcher (torchrun, accelerate, deepspeed) starts, one per GPU: which one this is (the one place
that reads it), launcher mistakes, joining them, one output_dir seen by all, and the decisions the main process takes
for all of them."""

import datetime
import os
import secrets
import socket
from typing import NamedTuple

from captioning.errors import PipelineError


class Process(NamedTuple):
    """Which of the launcher's processes this is."""
    rank: int  # among all of them; 0: the main process, which alone writes files, logs and prints
    local_rank: int  # among its node's, which is also the number of its GPU there
    count: int  # how many the launcher started

    @property
    def is_main(self):
        return self.rank == 0

    @property
    def node(self):
        """The rank of its node's first process: a node's processes are numbered one after another."""
        return self.rank - self.local_rank


def this_process():
    """This process as the launcher's environment describes it: Process(0, 0, 1) when run alone."""
    return Process(int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0")),
                   int(os.environ.get("WORLD_SIZE", "1")))


def print_once(*args, **kwargs):
    """print by the main process alone, for what every process would print alike."""
    if this_process().is_main:
        print(*args, **kwargs)


def prepare_launch():
    """Whether a launcher (torchrun, accelerate) started one process per GPU. A process started alone trains on one
    GPU: with several visible, Trainer would wrap the model in DataParallel, which splits the concatenated
    pixel_values of a batch across GPUs out of step with their images."""
    distributed = "WORLD_SIZE" in os.environ  # set by every launcher
    # `accelerate launch --cpu --num_processes=N` without an MPI hostfile starts one process and says nothing
    if "MASTER_ADDR" in os.environ and not distributed and "OMPI_COMM_WORLD_SIZE" not in os.environ \
            and "PMI_SIZE" not in os.environ:
        print("warning: the launcher set MASTER_ADDR for several processes, but this process runs alone (no "
              "WORLD_SIZE). `accelerate launch --cpu` starts one process unless given an MPI hostfile: use "
              "`torchrun --nproc_per_node=N train.py`, or `accelerate launch --multi_gpu --num_processes=N train.py`")
    if not distributed:
        import torch

        os.environ.setdefault("CUDA_VISIBLE_DEVICES", "0")
        if torch.cuda.device_count() > 1:
            raise PipelineError(
                f"CUDA_VISIBLE_DEVICES={os.environ['CUDA_VISIBLE_DEVICES']} shows several GPUs to one process: "
                "set it to one GPU, e.g. CUDA_VISIBLE_DEVICES=0, or launch one process per GPU with torchrun"
            )
    return distributed


def join_processes():
    """Join the launcher's other processes (gloo: their messages are few and small, on a GPU or not) and put this
    one on its own GPU; nothing to do when run alone. Returns (rank, number of processes)."""
    import torch

    process = this_process()
    if process.count > 1 and not torch.distributed.is_initialized():
        # a week: the processes meet again only when each has done its share, which can take the others hours
        torch.distributed.init_process_group("gloo", timeout=datetime.timedelta(days=7))
        if torch.cuda.is_available():
            torch.cuda.set_device(process.local_rank)
    return process.rank, process.count


def decided_by_the_main_process(decide, rank, num_processes):
    """decide() run by the main process alone and its result, or the PipelineError it raised, given to every
    process: all then take the same path, and none waits in a collective that the others never reach."""
    if num_processes == 1:
        return decide()
    import torch

    decision = [None]
    if rank == 0:
        try:
            decision = [decide()]
        except PipelineError as error:
            decision = [error]
    torch.distributed.broadcast_object_list(decision, src=0)
    if isinstance(decision[0], PipelineError):
        raise decision[0]
    return decision[0]


def wait_for_all(num_processes):
    """Return once every process has reached this point."""
    if num_processes > 1:
        import torch

        torch.distributed.barrier()


def check_shared_output_dir(output_dir, args):
    """Stop every process at once unless all of them see the main process's output_dir: only the main process writes
    the checkpoints there, and every process resumes from them (a node resuming alone from its own folder would
    start from step 0 while the others continue)."""
    if args.world_size == 1:
        return
    import torch

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


def this_node(device):
    """(this process's rank among its node's processes, how many they are, the node's first global rank)."""
    process = this_process()
    if process.count == 1:
        return 0, 1, process.node
    import torch

    firsts = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(process.count)]
    torch.distributed.all_gather(firsts, torch.tensor([process.node], device=device))
    return process.local_rank, [int(rank) for rank in firsts].count(process.node), process.node
