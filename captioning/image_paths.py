"""The images infer.py is given, read one path at a time so that a collection of any size fits: folders (searched
recursively), globs, text files of paths, and the CSV and JSON of the earlier steps."""

import csv
import glob
import os

from captioning.data import read_conversations
from captioning.errors import PipelineError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
LIST_EXTENSIONS = (".txt", ".lst")  # one image path a line


def image_paths(spec, warn=print):
    """Each image path that spec names, in a fixed order: a comma-separated list of image files, folders (their
    images, recursively, sorted), globs (sorted), text files of paths (one a line, as given), data2csv's CSV (its
    image_path column) or csv2json's JSON (its images), each image of a CSV or JSON once. A path that does not
    exist is yielded as it is, so that it is named when it fails to load; warn is told of a glob matching nothing."""
    for part in filter(None, (part.strip() for part in spec.split(","))):
        extension = os.path.splitext(part)[1].lower()
        if glob.has_magic(part):
            matches = sorted(glob.iglob(part, recursive=True))
            if not matches:
                warn(f"warning: no file matches {part}")
            yield from matches
        elif os.path.isdir(part):
            yield from images_in_folder(part)
        elif extension in LIST_EXTENSIONS and os.path.isfile(part):
            yield from listed_paths(part)
        elif extension == ".csv" and os.path.isfile(part):
            yield from once_each(csv_image_paths(part))
        elif extension == ".json" and os.path.isfile(part):
            yield from once_each(sample["image_path"] for sample in read_conversations(part))
        else:
            yield part


def images_in_folder(folder):
    for parent, folders, files in os.walk(folder):
        folders.sort()  # os.walk descends in this order
        for name in sorted(files):
            if name.lower().endswith(IMAGE_EXTENSIONS):
                yield os.path.join(parent, name)


def listed_paths(path):
    with open(path, encoding="utf-8") as file:
        for line in file:
            if line.strip():
                yield line.strip()


def csv_image_paths(path):
    with open(path, newline="", encoding="utf-8") as file:
        reader = csv.DictReader(file)
        if "image_path" not in (reader.fieldnames or []):
            raise PipelineError(f"{path} has no image_path column (its columns: {', '.join(reader.fieldnames or [])}): "
                                "give a CSV written by data2csv.py, or a text file with one image path a line")
        for row in reader:
            yield row["image_path"]


def once_each(paths):
    """paths without repeats (a CSV or JSON names an image once a caption): only these paths are held in memory."""
    seen = set()
    for path in paths:
        if path not in seen:
            seen.add(path)
            yield path
