"""One process at a time per output folder or file: the lock, and who holds it."""

import json
import os
import socket
import sys
import time
from contextlib import contextmanager, suppress

from captioning.errors import PipelineError
from captioning.files import write_json


@contextmanager
def hold(path):
    """Use path (a folder or file a step writes) alone: a second process that targets it stops at once with a message
    naming this one. The lock beside it is the kernel's (filelock's FileLock, fcntl), so it ends with its holder,
    however that ends: one left by a killed run is taken over."""
    from filelock import FileLock, Timeout

    parent, name = os.path.split(os.path.abspath(path).rstrip(os.sep))
    os.makedirs(parent, exist_ok=True)
    lock_path = os.path.join(parent, f".{name}.lock")
    owner_path = f"{lock_path}.json"  # who holds it: read by the process that is refused
    lock = FileLock(lock_path, timeout=0)
    try:
        lock.acquire()
    except Timeout as error:
        raise PipelineError(
            f"{path} is in use by {lock_owner(owner_path)}. Wait for that run to finish or stop it, or give this one "
            "another folder or file"
        ) from error
    try:
        if os.path.isfile(owner_path):
            print(f"taking over {path} from {lock_owner(owner_path)}, which ended without releasing it")
        write_json(owner_path, {"pid": os.getpid(), "host": socket.gethostname(), "command": " ".join(sys.argv),
                                "started": time.strftime("%Y-%m-%d %H:%M:%S")})
        yield
    finally:
        with suppress(FileNotFoundError):
            os.remove(owner_path)
        lock.release()


def lock_owner(owner_path):
    try:
        with open(owner_path, encoding="utf-8") as file:
            owner = json.load(file)
        return f"process {owner['pid']} on {owner['host']}, started {owner['started']} ({owner['command']})"
    except (OSError, ValueError, KeyError):
        return "another process (it has not written its name yet)"
