"""infer.py's predictions.jsonl written as captioning goes, so that an interruption loses nothing: each process
appends whole records to its own part as each batch ends, a re-run skips what is captioned, and the parts are
merged into the one file in input order at the end."""

import glob
import json
import os
import shutil
import zlib

from captioning.disk_full import stop_if_disk_full
from captioning.files import atomic_write

SKIPPED = "skipped"  # a part's record of an image that did not load: why, instead of a caption


def share_of(path, num_processes):
    """The process that captions path: the same in every run, whatever other images are given."""
    return zlib.crc32(path.encode("utf-8", "surrogateescape")) % num_processes


def whole_lines(path):
    """The lines of path that were written whole (a run killed while appending leaves the last one cut)."""
    if not os.path.isfile(path):
        return
    with open(path, encoding="utf-8") as file:
        for line in file:
            if line.endswith("\n"):
                yield line


class Predictions:
    """The output file and its parts (output_path.parts/part-RANK.jsonl) as seen by one of num_processes processes."""

    def __init__(self, output_path, rank=0, num_processes=1):
        self.output_path, self.rank, self.num_processes = output_path, rank, num_processes
        self.parts = f"{output_path}.parts"
        self.part = os.path.join(self.parts, f"part-{rank}.jsonl")
        self.earlier = {json.loads(line)["image_path"] for line in whole_lines(output_path)}
        # what is written, in the output or in any part (also in those of a run with another number of processes)
        self.done = self.earlier | {record["image_path"] for record in self.part_records()}
        self.cut_a_cut_line()

    def part_records(self):
        for part in sorted(glob.glob(os.path.join(self.parts, "part-*.jsonl"))):
            for line in whole_lines(part):
                yield json.loads(line)

    def cut_a_cut_line(self):
        """Remove the end of the part after its last whole line, so that appends start on a line of their own."""
        if not os.path.isfile(self.part):
            return
        with open(self.part, "rb+") as file:
            position = file.seek(0, os.SEEK_END)
            while position > 0:  # read back from the end, a block at a time, to the last line break
                start = max(0, position - 65536)
                file.seek(start)
                line_break = file.read(position - start).rfind(b"\n")
                if line_break >= 0:
                    file.truncate(start + line_break + 1)
                    return
                position = start
            file.truncate(0)

    def to_caption(self, paths, every_share=False):
        """This process's share of paths (or every process's), without the ones already captioned or repeated."""
        queued = set()
        for path in paths:
            if (every_share or share_of(path, self.num_processes) == self.rank) and path not in self.done \
                    and path not in queued:
                queued.add(path)
                yield path

    def append(self, records):
        """Add records (one per image: a caption, or why it was skipped) to this process's part, whole and on disk:
        a write that fails, the disk full or the run stopped, leaves the part as it was."""
        os.makedirs(self.parts, exist_ok=True)
        data = "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records).encode()
        size = os.path.getsize(self.part) if os.path.isfile(self.part) else 0
        with stop_if_disk_full(self.parts, "the captions", needed=len(data), setting="output_path",
                               then="it goes on after the captions already written"):
            try:
                with open(self.part, "ab") as file:
                    file.write(data)
                    file.flush()
                    os.fsync(file.fileno())
            except BaseException:
                os.truncate(self.part, size)
                raise

    def merge(self, paths):
        """Write the output once every process is done: the earlier output's records as they were, then the parts'
        captions in the order of paths (any for images no longer given after them), and remove the parts. Returns
        (captions added, [(path, why) of the images skipped]); with no caption at all, none is written."""
        new, skipped = {}, []
        for record in self.part_records():
            if SKIPPED in record:
                skipped.append((record["image_path"], record[SKIPPED]))
            else:
                new.setdefault(record["image_path"], json.dumps(record, ensure_ascii=False) + "\n")
        added = len(new)
        earlier = list(whole_lines(self.output_path))
        if not (new or earlier):
            shutil.rmtree(self.parts, ignore_errors=True)
            return 0, skipped
        needed = sum(map(len, earlier)) + sum(map(len, new.values()))
        with stop_if_disk_full(os.path.dirname(os.path.abspath(self.output_path)), self.output_path,
                               setting="output_path", needed=needed, then="it merges the captions again"), \
                atomic_write(self.output_path, encoding="utf-8") as file:
            file.writelines(earlier)
            for path in paths:
                if path in new:
                    file.write(new.pop(path))
            file.writelines(new.values())
        shutil.rmtree(self.parts, ignore_errors=True)
        return added, skipped
