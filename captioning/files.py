"""Writes that leave no half-written file or folder, and files other users can read."""

import json
import os
import shutil
from contextlib import contextmanager


@contextmanager
def atomic_write(path, mode="w", **open_kwargs):
    """Open a temporary file next to `path` and rename it over `path` only once it is complete."""
    temp_path = f"{path}.part"
    try:
        with open(temp_path, mode, **open_kwargs) as file:
            yield file
        os.replace(temp_path, path)
    except BaseException:
        if os.path.exists(temp_path):
            os.remove(temp_path)
        raise


@contextmanager
def written_whole(folder):
    """atomic_write for a folder: a staging folder beside it, renamed over it once the block has written it all, and
    removed when the block fails, so that neither a half-written folder nor the space it took is left."""
    staging = folder.rstrip(os.sep) + ".part"
    shutil.rmtree(staging, ignore_errors=True)
    os.makedirs(staging)
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(staging, folder)


def folder_size(folder):
    return sum(os.path.getsize(os.path.join(folder, name)) for name in os.listdir(folder)
               if os.path.isfile(os.path.join(folder, name)))


def write_json(path, data):
    with atomic_write(path, encoding="utf-8") as file:
        json.dump(data, file, ensure_ascii=False, indent=2)


def readable_by_all(folder):
    """Files 0644 (safetensors writes its weights 0600): a server running as another user can read them."""
    for name in os.listdir(folder):
        if os.path.isfile(os.path.join(folder, name)):
            os.chmod(os.path.join(folder, name), 0o644)
