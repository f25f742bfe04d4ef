"""Run a script on a disk that fills up:  python disk_fills_up.py PATTERN AFTER SCRIPT [SETTING ...]

The first AFTER files written whose absolute path matches PATTERN (fnmatch) are written whole; the next one fails
partway the way its real writer fails on a full disk (checked on a 1 MB tmpfs): Python's files with OSError ENOSPC
after half of the write, safetensors with its SafetensorError and no file, torch.save with its zip writer's
RuntimeError and a partial file. From then on the disk stays full: every write under the working folder fails, and
shutil.disk_usage says nothing is free.
"""
import builtins
import errno
import fnmatch
import io
import os
import runpy
import shutil
import sys

import safetensors.torch
import torch

pattern, after, script, *settings = sys.argv[1:]
matched, disk_full = 0, False
real_open, real_disk_usage = builtins.open, shutil.disk_usage


def fills_up(path):
    """Whether writing path finds the disk full; the first such write fills it."""
    global matched, disk_full
    path = os.path.abspath(os.fspath(path))
    if not disk_full and fnmatch.fnmatch(path, pattern):
        matched += 1
        disk_full = matched > int(after)
    return disk_full and path.startswith(os.getcwd())


def no_space():
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


class FullFile:
    def __init__(self, file):
        self.file = file

    def write(self, data):
        self.file.write(data[: len(data) // 2])
        self.file.flush()
        raise no_space()

    def writelines(self, lines):
        self.write(b"".join(lines) if self.file.mode.endswith("b") else "".join(lines))

    def fileno(self):  # PIL then writes through write() rather than to the descriptor
        raise io.UnsupportedOperation("fileno")

    def __getattr__(self, name):
        return getattr(self.file, name)

    def __enter__(self):
        return self

    def __exit__(self, *exception):
        self.file.close()


def open_on_full_disk(file, mode="r", *args, **kwargs):
    opened = real_open(file, mode, *args, **kwargs)
    writing = isinstance(file, (str, os.PathLike)) and any(flag in mode for flag in "wax+")
    return FullFile(opened) if writing and fills_up(file) else opened


def serialize_file(tensors, filename, *args, real=safetensors.torch.serialize_file, **kwargs):
    if fills_up(filename):
        raise safetensors.SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
    return real(tensors, filename, *args, **kwargs)


def save(obj, f, *args, real=torch.save, **kwargs):
    if isinstance(f, (str, os.PathLike)) and fills_up(f):
        with real_open(f, "wb") as file:
            file.write(b"PK\x03\x04")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")
    return real(obj, f, *args, **kwargs)


def disk_usage(path):
    usage = real_disk_usage(path)
    return usage._replace(free=0) if disk_full else usage


builtins.open = io.open = open_on_full_disk
safetensors.torch.serialize_file, torch.save, shutil.disk_usage = serialize_file, save, disk_usage
sys.argv = [script, *settings]
sys.path.insert(0, os.path.dirname(script))
runpy.run_path(script, run_name="__main__")
