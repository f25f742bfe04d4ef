"""bench.py's data part (--data_rows): fetching from a slow image host with one connection and with workers, then
the time and peak memory of data2csv.py, csv2json.py and building train.py's training set at growing row counts.

Every step runs as its own process, as a user runs it, so its peak RSS is its own (read with os.wait4). The data is
synthetic and COCO-shaped: five captions per image, an annotation JSON, and one small JPEG linked under every image
name, so that at scale data2csv finds the images already there (as on a resumed run) and measures its own work.
"""
import io
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy
from PIL import Image

from testkit.file_server import FileServer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CAPTIONS_PER_IMAGE = 5  # as in COCO 2014 train: 414,113 captions of 82,783 images


def noise_jpeg(seed, size=(320, 240)):
    pixels = numpy.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=numpy.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def coco_annotations(path, rows, image_url):
    """A captions_train2014.json with `rows` captions, five to an image."""
    images = -(-rows // CAPTIONS_PER_IMAGE)
    with open(path, "w", encoding="utf-8") as file:
        json.dump({"images": [{"id": number, "coco_url": image_url(number)} for number in range(1, images + 1)],
                   "annotations": [{"id": row, "image_id": row // CAPTIONS_PER_IMAGE + 1,
                                    "caption": f"A person rides a red bicycle past shop number {row}."}
                                   for row in range(rows)]}, file)
    return images


def run_step(command, cwd):
    """(seconds, peak RSS in MB) of a command run as a process of its own."""
    with tempfile.TemporaryFile() as errors:
        start = time.perf_counter()
        process = subprocess.Popen(command, cwd=cwd, stdout=subprocess.DEVNULL, stderr=errors)
        _, status, usage = os.wait4(process.pid, 0)
        seconds = time.perf_counter() - start
        process.returncode = os.waitstatus_to_exitcode(status)
        if process.returncode:
            errors.seek(0)
            raise RuntimeError(f"{' '.join(command)} failed:\n{errors.read().decode()[-3000:]}")
    return seconds, usage.ru_maxrss / 1024


def script(name, *settings):
    return [sys.executable, os.path.join(REPO, name), *settings]


def measure_fetch(cfg, folder):
    """Images per second from a host that answers each request after fetch_latency seconds: one connection, then
    data2csv's workers; the two runs' images and CSVs must be identical."""
    server = FileServer(delay=cfg.fetch_latency)
    try:
        for number in range(1, cfg.fetch_images + 1):
            server.files[f"/{number}.jpg"] = noise_jpeg(number)
        annotations = os.path.join(folder, "captions_train2014.json")
        coco_annotations(annotations, cfg.fetch_images * CAPTIONS_PER_IMAGE, lambda number: f"{server.url}/{number}.jpg")
        result = {}
        for name, workers in (("one_connection", 1), ("workers", cfg.fetch_workers)):
            seconds, peak = run_step(script("data2csv.py", "--source=coco", f"--coco_annotations={annotations}",
                                            "--max_data_number=-1", f"--workers={workers}",
                                            f"--image_dir={name}/images", f"--csv_path={name}/data.csv"), folder)
            result[name] = {"workers": workers, "seconds": seconds, "images_per_s": cfg.fetch_images / seconds,
                            "peak_rss_mb": peak}
    finally:
        server.close()
    result["images"] = cfg.fetch_images
    result["identical"] = same_output(os.path.join(folder, "one_connection"), os.path.join(folder, "workers"))
    result["speedup"] = result["workers"]["images_per_s"] / result["one_connection"]["images_per_s"]
    return result


def same_output(first, second):
    """Whether two data2csv runs wrote the same image files and the same CSV rows (apart from the folder)."""
    names = sorted(os.listdir(os.path.join(first, "images")))
    if names != sorted(os.listdir(os.path.join(second, "images"))):
        return False
    for name in names:
        with open(os.path.join(first, "images", name), "rb") as one, open(os.path.join(second, "images", name),
                                                                             "rb") as other:
            if one.read() != other.read():
                return False
    with open(os.path.join(first, "data.csv"), encoding="utf-8") as one, \
            open(os.path.join(second, "data.csv"), encoding="utf-8") as other:
        return one.read().replace(first, second) == other.read()


def measure_scale(cfg, folder, rows, run_part):
    """data2csv (the images already there), csv2json and the training set, at `rows` captions."""
    images = coco_annotations(os.path.join(folder, "captions_train2014.json"), rows, lambda number: "")
    os.makedirs(os.path.join(folder, "images"), exist_ok=True)
    jpeg = noise_jpeg(0, (64, 48))
    for number in range(1, images + 1):  # one file under every name: no disk space, nothing to fetch
        source = os.path.join(folder, f"image-{number // 60000}.jpg")  # ext4 links a file 65000 times at most
        if not os.path.exists(source):
            with open(source, "wb") as file:
                file.write(jpeg)
        os.link(source, os.path.join(folder, "images", f"{number}.jpg"))
    result = {"rows": rows, "images": images}
    for step, command in (
            ("data2csv", script("data2csv.py", "--source=coco", "--coco_annotations=captions_train2014.json",
                                "--max_data_number=-1", "--image_dir=images", "--csv_path=data.csv")),
            ("csv2json", script("csv2json.py", "--csv_path=data.csv", "--json_path=data_vl.json"))):
        seconds, peak = run_step(command, folder)
        result[step] = {"seconds": seconds, "peak_rss_mb": peak}
    result["training_set"] = run_part("scale/training_set", folder)
    return result


def measure(cfg, run_part):
    """Both measurements, in fresh folders under one temporary folder."""
    with tempfile.TemporaryDirectory() as folder:
        os.makedirs(os.path.join(folder, "fetch"))
        results = {"fetch": measure_fetch(cfg, os.path.join(folder, "fetch")), "scale": []}
        for rows in cfg.data_row_counts:
            print(f"measuring the data steps at {rows} rows ...", flush=True)
            work = os.path.join(folder, f"rows-{rows}")
            os.makedirs(work)
            results["scale"].append(measure_scale(cfg, work, rows, run_part))
    return results


def table(results):
    fetch = results["fetch"]
    lines = [f"fetching {fetch['images']} images: "
             f"one connection {fetch['one_connection']['images_per_s']:.1f} images/s, "
             f"{fetch['workers']['workers']} workers {fetch['workers']['images_per_s']:.1f} images/s "
             f"({fetch['speedup']:.1f}x); identical images and CSV: {'yes' if fetch['identical'] else 'NO'}", "",
             "| rows | images | data2csv s | MB | csv2json s | MB | training set s | MB |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for scale in results["scale"]:
        steps = [scale[step] for step in ("data2csv", "csv2json", "training_set")]
        lines.append(f"| {scale['rows']} | {scale['images']} | "
                     + " | ".join(f"{step['seconds']:.2f} | {step['peak_rss_mb']:.0f}" for step in steps) + " |")
    first, last = results["scale"][0], results["scale"][-1]
    growth = last["rows"] / first["rows"]
    lines.append(f"\nfrom {first['rows']} to {last['rows']} rows ({growth:.0f}x): time grew "
                 + ", ".join(f"{step} {last[step]['seconds'] / first[step]['seconds']:.1f}x"
                             for step in ("data2csv", "csv2json", "training_set")))
    return "\n".join(lines)
