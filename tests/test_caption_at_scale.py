"""infer.py on a collection: a folder captioned recursively, records saved batch by batch, a killed run resumed to
the file an uninterrupted run writes, one run per output at a time, and the images shared by processes under
torchrun, on one node or two, merged into the file one process writes."""
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import types

import pytest
from PIL import Image

from captioning.errors import PipelineError
from captioning.images import ImageGeometry
from captioning.precision import Compute
from captioning.vllm_engine import VllmCaptions, check_engine
from conftest import COLOR_CAPTIONS, PHOTO_SHAPES, REPO, TRAINED, check, copy_of, run, start_and_wait_for

SIZES = [(64, 48), (48, 96), (160, 40), (56, 56), (90, 30)]
COLORS = [list(COLOR_CAPTIONS)[number % 6] for number in range(40)]  # the collection's photos, by number


@pytest.fixture(scope="module")
def trained(colour_run, tmp_path_factory):
    """A tiny model that has learnt the colour captions, and a collection of 41 photos in nested folders (the
    colours in several shapes) with one file that is not an image."""
    work = copy_of(colour_run, tmp_path_factory, "at_scale")
    for number, color in enumerate(COLORS):
        path = work / "collection" / f"part{number % 3}" / ("deeper" if number % 2 else "") / f"{number:03}-{color}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", SIZES[number % len(SIZES)], color).save(path)
    (work / "collection" / "part1" / "broken.jpg").write_text("not an image")
    return work


def caption(work, *settings, output="out.jsonl"):
    return check(run("infer.py", "--images=collection", f"--output_path={output}", "--batch_size=3",
                     "--max_new_tokens=16", *settings, cwd=work))


@pytest.fixture(scope="module")
def one_process(trained):
    result = caption(trained, output="one.jsonl")
    return (trained / "one.jsonl").read_text().splitlines(), result


def test_a_folder_is_captioned_recursively_in_a_fixed_order_and_a_broken_file_named(trained, one_process):
    lines, result = one_process
    records = [json.loads(line) for line in lines]
    # each folder's own images, then its subfolder's, each sorted by name
    walk = [os.path.join("collection", f"part{part}", *(["deeper"] if deeper else []), f"{number:03}-{color}.jpg")
            for part in range(3) for deeper in (0, 1) for number, color in enumerate(COLORS)
            if number % 3 == part and number % 2 == deeper]
    assert [record["image_path"] for record in records] == walk and len(walk) == 40
    as_trained = [number for number, color in enumerate(COLORS)
                  if color in TRAINED and SIZES[number % len(SIZES)] == PHOTO_SHAPES[color]]
    assert len(as_trained) > 3
    for number in as_trained:  # a photo of a trained colour and shape gets the trained caption
        [record] = [record for record in records if record["image_path"].endswith(f"/{number:03}-{COLORS[number]}.jpg")]
        assert record["caption"] == COLOR_CAPTIONS[COLORS[number]]
    assert "skipped 1 images:\n  collection/part1/broken.jpg: cannot read image" in result.stdout
    summary = re.search(r"wrote 40 captions to one.jsonl: 40 new in ([\d.]+) s \(([\d.]+) s loading the model, "
                        r"then ([\d.]+) images/s\), 1 skipped", result.stdout)
    whole, loading, rate = map(float, summary.groups())
    captioning = whole - loading  # each printed to 0.1 s, so within 0.1 s of the time the rate was taken over
    assert 0 < loading < whole and 40 / (captioning + 0.1) - 0.01 <= rate <= 40 / max(captioning - 0.1, 0.01) + 0.01
    assert not (trained / "one.jsonl.parts").exists()  # merged, then removed


def test_a_killed_run_goes_on_where_it_stopped_and_writes_the_uninterrupted_file(trained, one_process):
    part = trained / "killed.jsonl.parts" / "part-0.jsonl"
    command = [sys.executable, os.path.join(REPO, "infer.py"), "--images=collection", "--output_path=killed.jsonl",
               "--batch_size=3", "--max_new_tokens=16"]
    process = subprocess.Popen(command, cwd=trained, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while not (part.exists() and part.stat().st_size) and process.poll() is None:  # a first batch saved
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    assert not (trained / "killed.jsonl").exists()
    written = len(part.read_text().splitlines())
    assert 0 < written < 41  # some batches saved, as they finished
    with open(part, "a") as file:
        file.write('{"image_path": "collection/cut')  # as if killed while appending
    resumed = check(run("infer.py", *command[2:], cwd=trained))
    assert f"captioning {41 - written} images" in resumed.stdout and f"{written} captioned before" in resumed.stdout
    assert (trained / "killed.jsonl").read_text().splitlines() == one_process[0]
    again = check(run("infer.py", *command[2:], cwd=trained))  # all done but the broken file, which is tried again
    assert "captioning 1 images" in again.stdout and "wrote 40 captions to killed.jsonl: 0 new" in again.stdout
    assert (trained / "killed.jsonl").read_text().splitlines() == one_process[0]


def test_a_second_run_on_the_same_output_is_refused_while_the_first_holds_it(trained):
    command = [sys.executable, os.path.join(REPO, "infer.py"), "--images=collection", "--output_path=busy.jsonl",
               "--batch_size=1", "--max_new_tokens=16"]
    first = start_and_wait_for(command, trained / ".busy.jsonl.lock.json", cwd=trained, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    first.send_signal(signal.SIGSTOP)  # holding the output, however long the second takes to start
    try:
        second = run("infer.py", *command[2:], cwd=trained)
        assert second.returncode == 1 and "busy.jsonl is in use by process" in second.stderr
    finally:
        first.kill()
        first.wait(timeout=60)


def infer_under_torchrun(launch, output, cwd):
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", *launch, os.path.join(REPO, "infer.py"),
                             "--images=collection", f"--output_path={output}", "--batch_size=3",
                             "--max_new_tokens=16"], cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finished(launcher):
    stdout, stderr = launcher.communicate(timeout=600)
    assert launcher.returncode == 0, stderr[-5000:]
    return stdout


def test_two_processes_under_torchrun_share_the_images_and_merge_the_file_one_process_writes(trained, one_process):
    stdout = finished(infer_under_torchrun(["--standalone", "--nproc_per_node=2"], "two.jsonl", trained))
    assert "in 2 process(es)" in stdout and stdout.count("wrote 40 captions") == 1  # the main process merges
    assert (trained / "two.jsonl").read_text().splitlines() == one_process[0]


@pytest.mark.slow  # a minute; torchrun's two processes above cover the sharing
def test_two_node_launchers_on_this_machine_merge_the_file_one_process_writes(trained, one_process):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    launchers = [infer_under_torchrun(["--nnodes=2", f"--node_rank={node}", "--nproc_per_node=1",
                                       "--master_addr=127.0.0.1", f"--master_port={port}"], "nodes.jsonl", trained)
                 for node in (0, 1)]
    for launcher in launchers:
        finished(launcher)
    assert (trained / "nodes.jsonl").read_text().splitlines() == one_process[0]


def test_a_full_disk_keeps_the_batches_written_and_the_next_run_goes_on(trained, one_process):
    full = run("infer.py", "--images=collection", "--output_path=full.jsonl", "--batch_size=3", "--max_new_tokens=16",
               cwd=trained, disk_full_at=("*/full.jsonl.parts/part-0.jsonl", 2))
    assert full.returncode == 1 and "is full: writing the captions failed" in full.stderr
    assert "it goes on after the captions already written" in full.stderr
    kept = (trained / "full.jsonl.parts" / "part-0.jsonl").read_text()
    assert kept.endswith("\n") and len(kept.splitlines()) == 6  # two whole batches, nothing of the third
    check(run("infer.py", "--images=collection", "--output_path=full.jsonl", "--batch_size=3", "--max_new_tokens=16",
              cwd=trained))
    assert (trained / "full.jsonl").read_text().splitlines() == one_process[0]


def test_the_vllm_engine_is_refused_where_it_cannot_caption(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # not installed
    with pytest.raises(PipelineError, match=r"--engine=vllm needs vLLM, which is not installed: pip install vllm"):
        check_engine("vllm", "none", None)
    with pytest.raises(PipelineError, match=r"^--engine=sglang: use transformers or vllm$"):
        check_engine("sglang", "none", None)
    monkeypatch.setitem(sys.modules, "vllm", types.ModuleType("vllm"))  # installed
    with pytest.raises(PipelineError, match=r"--engine=vllm takes --quantization=none, not 4bit"):
        check_engine("vllm", "4bit", None)
    (tmp_path / "adapter_config.json").write_text(json.dumps({"r": 64, "use_dora": True}))
    with pytest.raises(PipelineError, match=r"is a DoRA adapter, which vLLM cannot apply: merge it"):
        check_engine("vllm", "none", str(tmp_path))
    check_engine("transformers", "4bit", str(tmp_path))


def test_a_vllm_engine_that_cannot_start_here_is_named(monkeypatch):
    def no_engine(**settings):
        raise RuntimeError("CUDA capability 6.1 is below vLLM's minimum 7.0")

    fake = {"vllm": types.SimpleNamespace(LLM=no_engine, SamplingParams=dict),
            "vllm.lora.request": types.SimpleNamespace(LoRARequest=None)}
    for name, module in fake.items():
        monkeypatch.setitem(sys.modules, name, module)
    with pytest.raises(PipelineError, match=r"vLLM could not start its engine for model-folder on this machine "
                                            r"\(RuntimeError: CUDA capability 6.1 .*\); use --engine=transformers"):
        VllmCaptions("model-folder", None, ImageGeometry(56, 28), Compute("cuda", "fp16", "sdpa"), "COCO Yes:", 16)


def test_vllm_on_a_cpu_is_refused_qwen35_in_fp32_before_it_loads(tmp_path, monkeypatch):
    """vLLM's CPU build runs Qwen3.5's linear attention in bf16 only, and fails at the first image otherwise."""
    monkeypatch.setitem(sys.modules, "vllm", None)  # refused before vLLM is imported
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen3_5"}))
    with pytest.raises(PipelineError, match=r"runs Qwen3.5's linear attention in bf16 only: caption with "
                                            r"--precision=bf16, or with --engine=transformers"):
        VllmCaptions(str(tmp_path), None, ImageGeometry(64, 32), Compute("cpu", "fp32", "sdpa"), "COCO Yes:", 16)
