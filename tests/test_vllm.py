"""vLLM as a client (slow: its CPU build in its own environment, built once): a tiny model trained on photos of
several shapes captions each of them in vLLM as infer.py does, merged and as base + adapter (LoRARequest), with
the same number of image tokens as training gave it; and infer.py's vLLM engine writes the file its transformers
engine writes, in one process and in two. A tiny Qwen3.5 with the official template, which thinks by default, gives
its trained captions in vLLM, merged and as base + adapter, without a thinking block."""
import json
import os
import shutil
import subprocess

import pytest
from PIL import Image

from conftest import COLOR_CAPTIONS, REPO, TRAINED, check, run, serving, trained_on_the_colours
from testkit.outside_tools import vllm_python
from testkit.tiny_models import (TINY_VLLM_QWEN35_TEXT, TINY_VLLM_TEXT, TINY_VLLM_VISION, build_tiny_qwen2vl,
                                 build_tiny_qwen35)

def caption_with_vllm(model, images, *options):
    result = check(subprocess.run([vllm_python(), os.path.join(os.path.dirname(__file__), "caption_with_vllm.py"),
                                   str(model), "COCO Yes:", *images, *options], capture_output=True, text=True,
                                  timeout=900, env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}))
    [answer] = [line for line in result.stdout.splitlines() if line.startswith('{"vllm"')]  # among vLLM's logs
    return json.loads(answer)["captions"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny model with heads of 32 that has learnt the colour captions, its adapter and its merged folder."""
    tmp_path = tmp_path_factory.mktemp("vllm")
    model = build_tiny_qwen2vl(str(tmp_path / "tiny"), text=TINY_VLLM_TEXT, vision=TINY_VLLM_VISION)
    trained_on_the_colours(tmp_path, model, "--image_size=56")
    check(run("merge.py", cwd=tmp_path))
    return tmp_path, model


@pytest.mark.slow
def test_vllm_captions_photos_of_every_shape_as_infer_does(trained):
    from captioning.images import ImageGeometry

    tmp_path, model = trained
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


def infer_with_vllm(*command, cwd):
    """infer.py run by the Python that has vLLM (as a user who installed it runs it)."""
    return check(subprocess.run([vllm_python(), *command], cwd=cwd, capture_output=True, text=True, timeout=900,
                                env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}))


@pytest.mark.slow
def test_infer_s_vllm_engine_writes_the_file_its_transformers_engine_writes(trained):
    tmp_path, _ = trained
    collection = tmp_path / "collection"
    collection.mkdir()
    for color in TRAINED:
        shutil.copy(tmp_path / "coco_2014_caption" / f"{color}.jpg", collection)
    Image.new("RGB", (640, 480), "blue").save(collection / "full_size_blue.jpg")
    (collection / "broken.jpg").write_text("not an image")
    captioning = ["--images=collection", "--max_new_tokens=16", "--batch_size=2"]
    check(run("infer.py", *captioning, "--output_path=transformers.jsonl", cwd=tmp_path))
    expected = (tmp_path / "transformers.jsonl").read_text().splitlines()
    assert len(expected) == 5
    infer = os.path.join(REPO, "infer.py")
    result = infer_with_vllm(infer, *captioning, "--engine=vllm", "--output_path=vllm.jsonl", cwd=tmp_path)
    assert "skipped 1 images:" in result.stdout and (tmp_path / "vllm.jsonl").read_text().splitlines() == expected
    # the merged folder (no adapter) in two processes under torchrun, each with its own engine
    infer_with_vllm("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", infer, *captioning,
                    "--engine=vllm", "--model=output/Qwen2-VL-2B-merged", "--output_path=merged.jsonl", cwd=tmp_path)
    assert [json.loads(line)["caption"] for line in (tmp_path / "merged.jsonl").read_text().splitlines()] == [
        json.loads(line)["caption"] for line in expected]


@pytest.fixture(scope="module")
def vllm_server(trained):
    """vLLM's OpenAI-compatible server on the merged folder, on 127.0.0.1, started once (this package's `vllm serve`
    entry point fails to find its own version: the module it runs is started directly)."""
    tmp_path, _ = trained
    with serving(lambda port: [vllm_python(), "-m", "vllm.entrypoints.openai.api_server", "--model",
                               str(tmp_path / "output" / "Qwen2-VL-2B-merged"), "--dtype", "float32",
                               "--max-model-len", "512", "--enforce-eager", "--host", "127.0.0.1", "--port", str(port)],
                 "/v1/models", tmp_path / "vllm_server.log", env={"VLLM_CPU_KVCACHE_SPACE": "1"}) as url:
        yield url


@pytest.mark.slow
def test_verify_asks_vllm_serve_over_http_and_gets_infer_s_captions(trained, vllm_server):
    tmp_path, _ = trained
    photos = [str(tmp_path / "coco_2014_caption" / f"{color}.jpg") for color in TRAINED]
    result = check(run("verify.py", f"--images={','.join(photos)}", "--max_new_tokens=16", "--report_dir=verified",
                       f"--server={vllm_server}", cwd=tmp_path))
    rows = {row["engine"]: row for row in json.loads((tmp_path / "verified" / "verify.json").read_text())["engines"]}
    assert (rows["server"]["equal"], rows["server"]["of"]) == (4, 4), result.stdout
    assert rows["server"]["captions"] == {photo: COLOR_CAPTIONS[color] for photo, color in zip(photos, TRAINED)}


ONE_THREAD = {"OMP_NUM_THREADS": "1"}  # transformers' linear attention without its kernels: far slower on two threads


@pytest.fixture(scope="module")
def qwen35_trained(tmp_path_factory, qwen35_template):
    """A tiny Qwen3.5 with heads of 32, the real tokenizer and the official template, that has learnt the colour
    photos of several shapes, and its merged folder."""
    tmp_path = tmp_path_factory.mktemp("vllm_qwen35")
    model = build_tiny_qwen35(str(tmp_path / "tiny"), text=TINY_VLLM_QWEN35_TEXT, chat_template=qwen35_template)
    trained_on_the_colours(tmp_path, model, "--image_size=64", "--dataloader_num_workers=0", env=ONE_THREAD)
    check(run("merge.py", cwd=tmp_path, env=ONE_THREAD))
    return tmp_path


@pytest.mark.slow
def test_vllm_gives_qwen35_s_trained_captions_merged_and_as_base_and_adapter_without_thinking(qwen35_trained):
    """The merged folder in vLLM's chat, its template called without arguments as `vllm serve` calls it, and
    infer.py's vLLM engine on the base model (whose template thinks by default) with the adapter."""
    tmp_path = qwen35_trained
    photos = [str(tmp_path / "coco_2014_caption" / f"{color}.jpg") for color in TRAINED]
    captioning = [f"--images={','.join(photos)}", "--max_new_tokens=16"]
    expected = [COLOR_CAPTIONS[color] for color in TRAINED]  # what infer.py gives a trained Qwen3.5 (test_qwen35.py)

    # vLLM's CPU build runs Qwen3.5's linear attention in bf16 only (it asserts so)
    merged = caption_with_vllm(tmp_path / "output" / "Qwen2-VL-2B-merged", photos, "--dtype=bfloat16")
    assert [merged[photo]["caption"] for photo in photos] == expected
    infer_with_vllm(os.path.join(REPO, "infer.py"), *captioning, "--engine=vllm", "--precision=bf16",
                    "--output_path=vllm.jsonl", cwd=tmp_path)
    records = [json.loads(line) for line in (tmp_path / "vllm.jsonl").read_text().splitlines()]
    assert [record["caption"] for record in records] == expected and records[0]["adapter"]
