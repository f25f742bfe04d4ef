"""The processes a launcher (torchrun) starts, one per GPU: which one this is, joining them, and the decisions the
main process takes for all of them."""

import datetime
import os

from captioning.errors import PipelineError


def this_process():
    """(this process's rank, how many processes the launcher started): (0, 1) when run alone."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def join_processes():
    """Join the launcher's other processes (gloo: their messages are few and small, on a GPU or not) and put this
    one on its own GPU; nothing to do when run alone. Returns (rank, number of processes)."""
    import torch

    rank, num_processes = this_process()
    if num_processes > 1 and not torch.distributed.is_initialized():
        # a week: the processes meet again only when each has done its share, which can take the others hours
        torch.distributed.init_process_group("gloo", timeout=datetime.timedelta(days=7))
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return rank, num_processes


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
