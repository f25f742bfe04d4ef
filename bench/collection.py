"""Captioning a collection with infer.py: the images/s of its two engines on the same model and photos, and its
peak memory as the collection grows.

    .venv/bin/python bench/collection.py                # CPU: bench.py's scaled-down Qwen2-VL; CUDA: the 2B shape
    .venv/bin/python bench/collection.py --vllm_python=/path/to/python/with/vllm --images=1000

Every measurement is a run of infer.py as a user starts it, in its own process, on a random-weight model given as a
folder with run_config.json (so nothing is downloaded or trained) over random-noise photos. images/s is the rate
infer.py's summary gives once the model has loaded (or the engine started), so start-up drops out. The random
model seldom stops before max_new_tokens, and the two engines' captions are compared. Peak memory (the RSS of the
largest process: infer.py's, or vLLM's engine's) is measured with the transformers engine over each of
memory_images photos, each captioned with one token (memory does not grow with the caption's length, and a run
over 10,000 photos then takes minutes on a CPU). Prints a table and writes bench/collection_results.json.
"""
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from types import SimpleNamespace

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [REPO, os.path.join(REPO, "bench")]

from captioning.errors import PipelineError  # noqa: E402
from captioning.files import write_json  # noqa: E402
from captioning.scripts import run_script  # noqa: E402
from captioning.settings import parse_settings  # noqa: E402

# ----------------------------------------------------------------------------- settings
images = 256  # photos of the timed runs
memory_images = "1000,10000"  # photos of the runs whose peak memory is measured
max_new_tokens = 16
batch_size = 16
model_size = "auto"  # auto: 2b on CUDA, small on CPU | bench.py's SIZES
vllm_python = "auto"  # a Python that has vLLM | auto: this one if it has vLLM, else the tests' (~/.cache) | none: skip
output = "bench/collection_results.json"
debug = False  # show the full traceback of a failure
# -----------------------------------------------------------------------------

# runs a command, then prints the peak RSS of its largest process (infer.py, or vLLM's engine) in MB, once all ended
PEAK_RSS = ("import resource, subprocess, sys; code = subprocess.call(sys.argv[1:]); "
            "print('peak_rss_mb', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024); sys.exit(code)")


def prepare(cfg, folder, count):
    """count random-noise photos in folder/photos, and a random-weight model in folder/model that infer.py takes
    as a merged folder (its run_config.json gives the prompt and the image size)."""
    import numpy
    from PIL import Image

    from bench import SIZES, prepare as prepare_model_and_data
    from captioning.models import FAMILIES

    family = FAMILIES[SIZES[cfg.model_size]["family"]]
    prepare_model_and_data(SimpleNamespace(images=0, image_size=family.image_size, model_size=cfg.model_size), folder)
    write_json(os.path.join(folder, "model", "run_config.json"),
               {"model": os.path.join(folder, "model"), "prompt": "COCO Yes:", "image_size": family.image_size,
                "family": family.name, "aspect_ratio": "keep"})
    rng = numpy.random.default_rng(0)
    os.makedirs(os.path.join(folder, "photos"))
    for number in range(count):
        Image.fromarray(rng.integers(0, 255, (family.image_size * 3 // 4, family.image_size, 3), dtype=numpy.uint8)
                        ).save(os.path.join(folder, "photos", f"{number:06}.jpg"))


def caption(cfg, python, folder, count, engine, max_new_tokens):
    """(images/s once loaded, seconds, peak RSS in MB, captions) of infer.py captioning the first count photos."""
    listed = os.path.join(folder, f"first-{count}.txt")
    with open(listed, "w") as file:
        file.writelines(os.path.join(folder, "photos", f"{number:06}.jpg\n") for number in range(count))
    output = os.path.join(folder, f"{engine}-{count}.jsonl")
    start = time.perf_counter()
    result = subprocess.run([python, "-c", PEAK_RSS, python, os.path.join(REPO, "infer.py"), f"--model={folder}/model",
                             f"--images={listed}", f"--output_path={output}", f"--engine={engine}",
                             f"--batch_size={cfg.batch_size}", f"--max_new_tokens={max_new_tokens}"],
                            capture_output=True, text=True, env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "4"})
    seconds = time.perf_counter() - start
    if result.returncode:
        raise PipelineError(f"infer.py --engine={engine} failed:\n{result.stderr[-3000:]}")
    peak = float(result.stdout.rsplit("peak_rss_mb", 1)[1])
    rate = float(re.search(r"then ([\d.]+) images/s", result.stdout)[1])
    with open(output, encoding="utf-8") as file:
        captions = [json.loads(line)["caption"] for line in file]
    os.remove(output)
    return rate, seconds, peak, captions


def python_with_vllm(setting):
    if setting != "auto":
        return None if setting == "none" else setting
    import importlib.util

    if importlib.util.find_spec("vllm"):
        return sys.executable
    from testkit.outside_tools import cached_vllm_python

    return cached_vllm_python()


def main(argv=()):
    cfg = parse_settings(globals(), argv)
    import torch

    if cfg.model_size == "auto":
        cfg.model_size = "2b" if torch.cuda.is_available() else "small"
    counts = [int(count) for count in cfg.memory_images.split(",")]
    engines = {"transformers": sys.executable}
    vllm = python_with_vllm(cfg.vllm_python)
    if vllm:
        engines["vllm"] = vllm
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"
    results = {"machine": {"python": platform.python_version(), "device": device},
               "settings": {key: getattr(cfg, key) for key in ("images", "max_new_tokens", "batch_size", "model_size")},
               "engines": {}, "memory": {}}
    with tempfile.TemporaryDirectory() as folder:
        print(f"preparing {max(counts + [cfg.images])} photos and a {cfg.model_size} model on {device}")
        prepare(cfg, folder, max(counts + [cfg.images]))
        captions = {}
        for engine, python in engines.items():
            print(f"timing the {engine} engine ...", flush=True)
            rate, seconds, peak, captions[engine] = caption(cfg, python, folder, cfg.images, engine,
                                                            cfg.max_new_tokens)
            results["engines"][engine] = {"images_per_second": rate, "seconds": seconds, "peak_rss_mb": peak}
        if len(captions) == 2:
            results["engines"]["same_captions"] = sum(
                a == b for a, b in zip(captions["transformers"], captions["vllm"])) / len(captions["transformers"])
        for count in counts:
            print(f"captioning {count} photos for the peak memory ...", flush=True)
            _, seconds, peak, _ = caption(cfg, sys.executable, folder, count, "transformers", max_new_tokens=1)
            results["memory"][count] = {"peak_rss_mb": peak, "seconds": seconds}
            write_json(cfg.output, results)
    write_json(cfg.output, results)
    print(f"on {device}, {cfg.model_size} model, {cfg.max_new_tokens} new tokens a photo:")
    for engine in engines:
        print(f"  {engine:12} {results['engines'][engine]['images_per_second']:8.2f} images/s once loaded")
    if "same_captions" in results["engines"]:
        print(f"  captions the same in both engines: {results['engines']['same_captions']:.0%}")
    for count, measured in results["memory"].items():
        print(f"  {count:6} photos: peak RSS {measured['peak_rss_mb']:.0f} MB")
    print(f"wrote {cfg.output}")


if __name__ == "__main__":
    run_script(main)
