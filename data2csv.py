"""Step 1: fetch COCO 2014 image/caption pairs into an image folder and a CSV.

    python data2csv.py                                  # ModelScope as the recipe does, else the COCO files
    python data2csv.py --source=modelscope              # ModelScope only
    python data2csv.py --source=coco                    # the official COCO 2014 files
    python data2csv.py --source=hf:<dataset id>         # a Hugging Face hub dataset
    python data2csv.py --source=path/to/imagefolder     # images + metadata.jsonl or metadata.csv

Writes image_dir/{image_id}.jpg (RGB JPEG, each image once; `workers` fetched at a time) and csv_path with columns
image_path, caption, image_id (one row per caption, in source order). Re-running resumes: images already on disk are
not fetched again.
"""
import csv
import glob
import io
import itertools
import json
import os
import re
import socket
import tempfile
import time
import urllib.error
import urllib.request
import zipfile
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from contextlib import contextmanager
from typing import Callable, NamedTuple

from PIL import Image
from tqdm import tqdm

from captioning.disk_full import is_disk_full, stop_if_disk_full
from captioning.errors import PipelineError
from captioning.files import atomic_write
from captioning.images import to_rgb
from captioning.locks import hold
from captioning.scripts import run_script
from captioning.settings import parse_settings, require_positive

# ----------------------------------------------------------------------------- settings
source = "auto"  # auto: modelscope, else coco where it fails (it does upstream) | modelscope | coco | hf:<id> | a folder
max_data_number = 500  # how many image/caption rows to take from the start of the source; -1: all of them
all_captions = False  # true: max_data_number counts images instead, each with all its captions (evaluation sets)
image_dir = "coco_2014_caption"  # images are saved here as {image_id}.jpg
csv_path = "coco-2024-dataset.csv"
max_image_side = 2048  # larger images are downscaled to fit (COCO's are at most 640); PIL refuses > 178 megapixels
split = "train"  # dataset split; for coco: train or val (COCO 2014)
modelscope_dataset = "modelscope/coco_2014_caption"
modelscope_subset = "coco_2014_caption"
coco_annotations = "http://images.cocodataset.org/annotations/annotations_trainval2014.zip"  # URL or local .zip/.json
download_dir = "downloads"  # where a downloaded COCO annotation file is kept for the next run
image_column = "image"  # column names of a hub dataset
caption_column = "caption"
image_id_column = "image_id"  # optional: the row number is used when a dataset has no such column
timeout = 30  # seconds before one HTTP request is given up
retries = 3  # further tries of a failed HTTP request, waiting 1 s, 2 s, 4 s, ... (or the server's Retry-After)
workers = 16  # images fetched at once (connections to the image host); 1: one at a time
debug = False  # show the full traceback of a failure
# -----------------------------------------------------------------------------

SOURCE_HELP = (
    "choose another source: --source=coco (official COCO 2014 annotations and images), "
    "--source=hf:<dataset id> (a Hugging Face hub dataset), or --source=<folder> "
    "(images plus metadata.jsonl or metadata.csv with columns file_name, caption)"
)


class Row(NamedTuple):
    image_id: str
    caption: str
    fetch_image: Callable[[], object]  # returns encoded bytes or a PIL image; called only when the image is missing


# ----------------------------------------------------------------------------- sources

def modelscope_rows(cfg):
    """The recipe's source: one row per caption, with the image decoded by ModelScope."""
    try:
        from modelscope.msdatasets import MsDataset

        with in_an_empty_folder():
            dataset = MsDataset.load(cfg.modelscope_dataset, subset_name=cfg.modelscope_subset, split=cfg.split)
        for index in range(len(dataset)):  # lazily: take() stops reading once it has enough
            item = dataset[index]
            yield Row(item["image_id"], item["caption"], lambda image=item["image"]: image)
    except PipelineError:
        raise
    except Exception as error:
        raise PipelineError(
            f"loading {cfg.modelscope_dataset} (subset {cfg.modelscope_subset}, split {cfg.split}) from ModelScope "
            f"failed: {type(error).__name__}: {error}. {why_modelscope_failed(error)}; {SOURCE_HELP}"
        ) from error


@contextmanager
def in_an_empty_folder():
    """Work in an empty folder meanwhile: MsDataset.load takes a folder in the working directory named like the
    dataset (image_dir, coco_2014_caption, is one) for a local copy, and then never asks the hub."""
    previous = os.getcwd()
    with tempfile.TemporaryDirectory() as empty:
        os.chdir(empty)
        try:
            yield
        finally:
            os.chdir(previous)


def why_modelscope_failed(error):
    """The reason behind a failed ModelScope load, where the error tells it: the network, or the dataset's known
    upstream breakage (its images missing, modelscope issue 1252; its loading script refused by datasets 4, 1769)."""
    causes = [error]
    while causes[-1].__cause__ or causes[-1].__context__:
        causes.append(causes[-1].__cause__ or causes[-1].__context__)
    if any(isinstance(cause, (ConnectionError, TimeoutError, socket.gaierror)) or
           type(cause).__name__ in ("ConnectionError", "ConnectTimeout", "ReadTimeout", "NewConnectionError",
                                    "MaxRetryError") for cause in causes):  # builtins', requests' and urllib3's
        return ("ModelScope could not be reached: check this machine's network (and HTTPS_PROXY, where a proxy is "
                "needed) and run again")
    if any(isinstance(cause, FileNotFoundError) and "2014" in str(cause) or
           "Dataset scripts are no longer supported" in str(cause) for cause in causes):
        return "This is the known upstream breakage of this dataset (modelscope issues 1252 and 1769)"
    return "If your network is fine, the dataset may be broken upstream (modelscope issues 1252 and 1769)"


def coco_rows(cfg):
    """Official COCO 2014 captions: the annotation JSON, and each needed image fetched from its URL."""
    annotations = read_coco_annotations(cfg)
    image_urls = {image["id"]: image.get("coco_url") or image.get("flickr_url") for image in annotations["images"]}
    rows = annotations["annotations"]
    if cfg.all_captions:  # each image's captions together, images in order of their first caption
        first_seen = {}
        for number, annotation in enumerate(rows):
            first_seen.setdefault(annotation["image_id"], number)
        rows = sorted(rows, key=lambda annotation: first_seen[annotation["image_id"]])
    for annotation in rows:
        url = image_urls[annotation["image_id"]]
        yield Row(annotation["image_id"], annotation["caption"], lambda url=url: http_get(url, cfg))


def read_coco_annotations(cfg):
    location = cfg.coco_annotations
    if re.match(r"https?://", location):
        location = download_file(location, cfg)
    member = f"annotations/captions_{cfg.split}2014.json"
    try:
        if location.endswith(".zip"):
            with zipfile.ZipFile(location) as archive:
                return json.loads(archive.read(member))
        with open(location, encoding="utf-8") as file:
            return json.load(file)
    except FileNotFoundError as error:
        raise PipelineError(f"COCO annotation file not found: {location}; set --coco_annotations") from error
    except KeyError as error:
        raise PipelineError(f"{location} has no {member}; use split train or val") from error
    except (zipfile.BadZipFile, json.JSONDecodeError) as error:
        raise PipelineError(f"cannot read COCO annotations {location}: {error}; delete it and run again") from error


def hub_rows(cfg, dataset_id):
    """A Hugging Face dataset, streamed so only the rows needed are read."""
    import datasets

    try:
        dataset = datasets.load_dataset(dataset_id, split=cfg.split, streaming=True)
        for index, item in enumerate(dataset):
            missing = {cfg.image_column, cfg.caption_column} - set(item)
            if missing:
                raise PipelineError(
                    f"dataset {dataset_id} has no column {', '.join(sorted(missing))}; its columns are "
                    f"{', '.join(item)}: set --image_column and --caption_column"
                )
            image_id = item.get(cfg.image_id_column, index)
            image = item[cfg.image_column]
            fetch_image = (lambda url=image: http_get(url, cfg)) if isinstance(image, str) else lambda image=image: image
            for caption in as_caption_list(item[cfg.caption_column]):
                yield Row(image_id, caption, fetch_image)
    except PipelineError:
        raise
    except Exception as error:
        raise PipelineError(
            f"loading the Hugging Face dataset {dataset_id!r} (split {cfg.split}) failed: "
            f"{type(error).__name__}: {error}"
        ) from error


def imagefolder_rows(cfg, folder):
    """A local folder in the Hugging Face imagefolder layout: images plus metadata.jsonl or metadata.csv."""
    jsonl_path, csv_metadata_path = os.path.join(folder, "metadata.jsonl"), os.path.join(folder, "metadata.csv")
    if os.path.exists(jsonl_path):
        with open(jsonl_path, encoding="utf-8") as file:
            records = [json.loads(line) for line in file if line.strip()]
    elif os.path.exists(csv_metadata_path):
        with open(csv_metadata_path, encoding="utf-8-sig", newline="") as file:
            records = list(csv.DictReader(file))
    else:
        raise PipelineError(f"{folder} has neither metadata.jsonl nor metadata.csv (columns file_name, caption)")
    for record in records:
        image_path = os.path.join(folder, record["file_name"])
        image_id = record.get("image_id") or os.path.splitext(os.path.basename(record["file_name"]))[0]
        for caption in as_caption_list(record["caption"]):
            yield Row(image_id, caption, lambda path=image_path: read_bytes(path))


def as_caption_list(value):
    return value if isinstance(value, list) else [value]


def read_bytes(path):
    with open(path, "rb") as file:
        return file.read()


def open_source(cfg):
    if cfg.source == "auto":
        return modelscope_else_coco_rows(cfg)
    if cfg.source == "modelscope":
        return modelscope_rows(cfg)
    if cfg.source == "coco":
        return coco_rows(cfg)
    if cfg.source.startswith("hf:"):
        return hub_rows(cfg, cfg.source[3:])
    if os.path.isdir(cfg.source):
        return imagefolder_rows(cfg, cfg.source)
    raise PipelineError(f"unknown source {cfg.source!r}: use auto, modelscope, or {SOURCE_HELP}")


def modelscope_else_coco_rows(cfg):
    """The recipe's ModelScope rows; where its first row cannot be had (upstream the dataset is broken), the official
    COCO files instead, saying so."""
    rows = modelscope_rows(cfg)
    try:
        first = next(rows)
    except StopIteration:
        return
    except PipelineError as error:
        cause = error.__cause__ or error
        print(f"source=auto: the recipe's ModelScope dataset failed ({type(cause).__name__}: {cause}). "
              f"{why_modelscope_failed(cause)}; using the official COCO 2014 files instead. Choose a source with "
              "--source=modelscope, coco, hf:<dataset id> or a folder")
        yield from coco_rows(cfg)
        return
    yield first
    yield from rows


# ----------------------------------------------------------------------------- downloads

class ImageUnavailable(Exception):
    """An image that cannot be had: its download failed, or its bytes do not decode."""


def http_get(url, cfg):
    """The body of url, retried with growing waits on network errors and HTTP 5xx/429."""
    for attempt in range(cfg.retries + 1):
        try:
            with urllib.request.urlopen(url, timeout=cfg.timeout) as response:
                return response.read()
        except urllib.error.HTTPError as error:
            if error.code < 500 and error.code != 429:
                raise ImageUnavailable(f"HTTP {error.code} for {url}") from error
            problem, asked = f"HTTP {error.code}", error.headers.get("Retry-After", "")
        except (urllib.error.URLError, OSError) as error:
            problem, asked = str(getattr(error, "reason", error)), ""
        if attempt < cfg.retries:  # as long as the server asks (in seconds), within a minute
            time.sleep(min(float(asked), 60) if asked.strip().isdigit() else 2**attempt)
    raise ImageUnavailable(f"{url} failed {cfg.retries + 1} times, last with {problem}")


def download_file(url, cfg):
    """A large file downloaded once into download_dir, with a progress bar; reused on later runs."""
    os.makedirs(cfg.download_dir, exist_ok=True)
    path = os.path.join(cfg.download_dir, os.path.basename(url))
    if os.path.exists(path):
        return path
    try:
        with urllib.request.urlopen(url, timeout=cfg.timeout) as response, atomic_write(path, "wb") as file:
            size = int(response.headers.get("Content-Length") or 0) or None
            with stop_if_disk_full(cfg.download_dir, url, size or 0, setting="download_dir", then="it downloads "
                                   "the file again"), \
                    tqdm(total=size, unit="B", unit_scale=True, desc=f"downloading {os.path.basename(url)}") as bar:
                while chunk := response.read(1 << 20):
                    file.write(chunk)
                    bar.update(len(chunk))
    except (urllib.error.URLError, OSError) as error:
        raise PipelineError(
            f"downloading {url} failed: {getattr(error, 'reason', error)}. Download it by hand and pass "
            f"--coco_annotations=<path to the .zip or captions_{cfg.split}2014.json>"
        ) from error
    return path


# ----------------------------------------------------------------------------- images

def save_rgb_jpeg(image_or_bytes, path, max_side):
    """Save an image as an RGB JPEG no larger than max_side, keeping a fitting RGB JPEG's bytes as they are.

    Raises ImageUnavailable for bytes that do not decode; nothing is saved then.
    """
    if isinstance(image_or_bytes, bytes):
        try:
            image = Image.open(io.BytesIO(image_or_bytes))
            image.load()  # decodes fully, so a truncated file fails here
        except (OSError, Image.DecompressionBombError) as error:
            raise ImageUnavailable(f"the image does not decode ({error}): a corrupt or incomplete file") from error
        if image.format == "JPEG" and image.mode == "RGB" and max(image.size) <= max_side:
            with atomic_write(path, "wb") as file:
                file.write(image_or_bytes)
            return
    else:
        image = image_or_bytes
    image = to_rgb(image)
    image.thumbnail((max_side, max_side), Image.LANCZOS)
    with atomic_write(path, "wb") as file:
        image.save(file, format="JPEG", quality=95)


def image_file_name(image_id):
    """{image_id}.jpg, with any character that could leave the folder replaced."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", str(image_id)).lstrip(".") + ".jpg"


# ----------------------------------------------------------------------------- main

def main(argv=()):
    cfg = parse_settings(globals(), argv)
    require_positive(cfg, "max_image_side", "workers")
    if cfg.max_data_number == 0 or cfg.max_data_number < -1:
        raise PipelineError(f"--max_data_number={cfg.max_data_number}: give a positive number, or -1 for every row")
    with hold(cfg.image_dir), hold(cfg.csv_path):  # one run per image folder and CSV at a time
        fetch_images_and_write_csv(cfg)


def fetch_images_and_write_csv(cfg):
    """Each row's image saved once into image_dir, up to `workers` at a time (resuming: the ones already there are
    kept), then the CSV with the rows in source order."""
    os.makedirs(cfg.image_dir, exist_ok=True)
    for leftover in glob.glob(os.path.join(cfg.image_dir, "*.part")):
        os.remove(leftover)  # a write that an earlier run did not finish

    rows, empty_captions = [], 0
    images = ImageFetches(cfg)
    progress = tqdm(take(open_source(cfg), cfg), total=cfg.max_data_number if cfg.max_data_number > 0 and not
                    cfg.all_captions else None, unit="row")
    with stop_if_disk_full(cfg.image_dir, "the images", lambda: space_for_the_rest(cfg, progress.n, images.saved()),
                           setting="image_dir", then="the images saved so far are kept and not fetched again"), images:
        for row in progress:
            caption = str(row.caption or "").strip()
            if not caption:
                empty_captions += 1
                continue
            image_path = images.fetch(row)
            rows.append({"image_path": image_path, "caption": caption, "image_id": row.image_id})
            progress.set_postfix(images=len(images.fetched) + len(images.reused), fetched=len(images.fetched),
                                 refresh=False)
    progress.close()
    rows = [row for row in rows if row["image_id"] not in images.failed]

    if empty_captions:
        print(f"skipped {empty_captions} rows with an empty caption")
    if not rows:
        reason = summary(images.failed) if images.failed else "the source gave no row with a caption"
        raise PipelineError(f"no image/caption pair could be saved from {cfg.source}: {reason}")
    write_csv(cfg.csv_path, rows)
    print(
        f"wrote {len(rows)} rows to {cfg.csv_path}: {len(images.fetched) + len(images.reused)} images in "
        f"{cfg.image_dir} ({len(images.fetched)} fetched now, {len(images.reused)} already there)"
    )
    if images.failed:
        print(f"skipped {len(images.failed)} images: {summary(images.failed)}; run again to retry them")


class ImageFetches:
    """The images of the rows, each fetched and saved once, `workers` at a time: a few rows ahead of the CSV at most,
    so memory stays bounded whatever the number of rows."""

    def __init__(self, cfg):
        self.cfg, self.running = cfg, {}  # image path -> (image id, future)
        self.fetched, self.reused, self.failed = set(), set(), {}  # failed: image id -> why
        self.pool = ThreadPoolExecutor(cfg.workers)

    def fetch(self, row):
        """The path row's image is (or will be) saved at."""
        path = os.path.abspath(os.path.join(self.cfg.image_dir, image_file_name(row.image_id)))
        if path in self.fetched or path in self.reused or path in self.running or row.image_id in self.failed:
            return path
        if os.path.exists(path):
            self.reused.add(path)
            return path
        future = self.pool.submit(lambda: save_rgb_jpeg(row.fetch_image(), path, self.cfg.max_image_side))
        self.running[path] = (row.image_id, future)
        if len(self.running) >= 2 * self.cfg.workers:  # read further rows once one of these is done
            self.collect(wait(self.futures(), return_when=FIRST_COMPLETED).done)
        return path

    def futures(self):
        return [future for _, future in self.running.values()]

    def collect(self, done):
        for path, (image_id, future) in list(self.running.items()):
            if future not in done:
                continue
            del self.running[path]
            try:
                future.result()
                self.fetched.add(path)
            except (ImageUnavailable, OSError) as error:
                if is_disk_full(error):
                    raise
                self.failed[image_id] = str(error)

    def saved(self):
        return self.fetched | self.reused

    def __enter__(self):
        return self

    def __exit__(self, error_type, error, traceback):
        if error_type is None:
            self.collect(wait(self.futures()).done)
        self.pool.shutdown(wait=True, cancel_futures=True)  # on a failure, the fetches not started are dropped


def write_csv(path, rows):
    """The CSV, written whole or not at all."""
    with stop_if_disk_full(os.path.dirname(os.path.abspath(path)), path, setting="csv_path",
                           needed=lambda: sum(len(",".join(map(str, row.values())).encode()) + 2 for row in rows),
                           then="the images are all saved, so it writes the CSV at once"), \
            atomic_write(path, encoding="utf-8", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=["image_path", "caption", "image_id"])
        writer.writeheader()
        writer.writerows(rows)


def space_for_the_rest(cfg, rows_taken, images):
    """About the bytes that the images still to fetch take: as many more images per row as so far, each of the mean
    size so far (or a COCO image's, about 160 KB)."""
    mean_size = sum(map(os.path.getsize, images)) / len(images) if images else 160_000
    if cfg.max_data_number < 0:  # all rows: how many are left is not known
        return mean_size
    if cfg.all_captions:
        return (cfg.max_data_number - len(images)) * mean_size
    return (cfg.max_data_number - rows_taken) * len(images) / max(rows_taken, 1) * mean_size + mean_size


def take(rows, cfg):
    """The first max_data_number rows, or with all_captions every row of the first max_data_number images."""
    if not cfg.all_captions:
        yield from itertools.islice(rows, cfg.max_data_number if cfg.max_data_number > 0 else None)
        return
    images = set()
    for row in rows:
        if row.image_id not in images and len(images) == cfg.max_data_number:
            return
        images.add(row.image_id)
        yield row


def summary(failed, shown=5):
    listed = "; ".join(f"{image_id}: {reason}" for image_id, reason in itertools.islice(failed.items(), shown))
    return listed + (f"; and {len(failed) - shown} more" if len(failed) > shown else "")


if __name__ == "__main__":
    run_script(main)
