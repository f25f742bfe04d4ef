"""A write that finds the disk full, turned into one message that says how much space it needs and what to do."""

import errno
import os
import shutil
from contextlib import contextmanager

from captioning.errors import PipelineError

DISK_FULL = (errno.ENOSPC, errno.EDQUOT)  # no space left on the device; the user's quota used up


def is_disk_full(error):
    """Whether an error, or one it came from, is a write that found no space: an OSError's errno, or the words that
    libraries writing from native code put in their own errors (safetensors: "No space left on device (os error 28)")."""
    while error is not None:
        if getattr(error, "errno", None) in DISK_FULL or any(os.strerror(code) in str(error) for code in DISK_FULL):
            return True
        error = error.__cause__ or error.__context__
    return False


def free_space(path):
    """Bytes free on the disk that holds path, or would hold it once created."""
    path = os.path.abspath(path)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    return shutil.disk_usage(path).free


@contextmanager
def stop_if_disk_full(folder, what, needed, partial=(), setting="", then="it continues where this one stopped"):
    """Turn a write that finds the disk full into one message: the folder, about how many bytes it needs (a number,
    or a function that estimates it), where else to write and what the next run does. The partial outputs named (or
    a function listing them) are removed first, so nothing half-written stays to take space or be read.

    torch.save says only "unexpected pos" when the disk fills up, so its writer's errors count when the disk has
    less space free than needed."""
    try:
        yield
    except Exception as error:
        from_torch_writer = isinstance(error, RuntimeError) and "inline_container" in str(error)
        if not (is_disk_full(error) or from_torch_writer):
            raise
        needed = needed() if callable(needed) else needed
        if from_torch_writer and free_space(folder) >= needed:
            raise
        for path in partial() if callable(partial) else partial:
            if os.path.isdir(path):
                shutil.rmtree(path)
            elif os.path.exists(path):
                os.remove(path)
        elsewhere = f" (or give --{setting} a folder on another disk)" if setting else ""
        raise PipelineError(
            f"the disk holding {folder} is full: writing {what} failed with \"No space left on device\". It needs "
            f"about {size_text(needed)} and {size_text(free_space(folder))} is free. Nothing half-written was kept. "
            f"Free some space{elsewhere} and run the same command again: {then}"
        ) from error


def size_text(size):
    """A byte count as people read it: 0 bytes, 340.2 KB, 4.4 GB."""
    size, unit = float(size), "bytes"
    for larger in ("KB", "MB", "GB", "TB"):
        if size < 1000:
            break
        size, unit = size / 1000, larger
    return f"{size:.0f} {unit}" if unit == "bytes" else f"{size:.1f} {unit}"
