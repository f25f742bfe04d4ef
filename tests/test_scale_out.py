"""Scaling out and resuming: torchrun data parallel on CPU (gloo), kill-and-resume, DeepSpeed settings."""
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys

import psutil
import pytest
import torch

import csv2json
import data2csv
import train
from captioning import deepspeed_configs
from captioning.checkpoints import checkpoint_folders, finished_writing
from captioning.errors import PipelineError
from conftest import REPO, make_imagefolder, run, start_and_wait_for

COMMON = ["--image_size=56", "--learning_rate=5e-3", "--gradient_accumulation_steps=1", "--swanlab_mode=disabled",
          "--logging_steps=1", "--lora_dropout=0"]


@pytest.fixture(scope="module")
def data_json(tmp_path_factory):
    work = tmp_path_factory.mktemp("scale_out")
    folder = make_imagefolder(work / "source")
    data2csv.main([f"--source={folder}", f"--image_dir={work}/images", f"--csv_path={work}/data.csv"])
    csv2json.main([f"--csv_path={work}/data.csv", f"--json_path={work}/data_vl.json"])
    return work / "data_vl.json"


def logged_losses(output_dir):
    [state] = [os.path.join(output_dir, name, "trainer_state.json") for name in os.listdir(output_dir)
               if name == f"checkpoint-{max_step(output_dir)}"]
    with open(state) as file:
        history = json.load(file)
    return history["global_step"], [entry["loss"] for entry in history["log_history"] if "loss" in entry]


def max_step(output_dir):
    return max(int(name.split("-")[1]) for name in os.listdir(output_dir) if name.startswith("checkpoint-"))


def global_batch_args(tiny_model, data_json):
    # 2 training images (4 held out): every step's global batch holds both, in one process or split over two
    return [f"--model={tiny_model}", f"--json_path={data_json}", "--test_size=4", "--max_steps=8", "--save_steps=8",
            *COMMON]


def torchrun_command(*args, launch=("--standalone", "--nproc_per_node=2"), wrapper=()):
    """train.py in two processes on the CPU, one sample each, as `torchrun --nproc_per_node=2 train.py ...` runs it
    (or with the launch given), through the wrapper script given, if any."""
    return [sys.executable, "-m", "torch.distributed.run", *launch, *wrapper,
            os.path.join(REPO, "train.py"), *args, "--per_device_train_batch_size=1"]


def written_whole(checkpoint):
    """Whether Trainer has finished writing the checkpoint: its trainer_state.json appears before it is written whole,
    and a run killed in between has no checkpoint to resume from (seen in CI: it started afresh)."""
    return lambda: finished_writing(checkpoint)


def torchrun(*args, cwd):
    return subprocess.run(torchrun_command(*args), cwd=cwd, capture_output=True, text=True, timeout=1200)


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory, tiny_model, data_json):
    work = tmp_path_factory.mktemp("ddp")
    result = torchrun(*global_batch_args(tiny_model, data_json), f"--output_dir={work}/ddp", cwd=work)
    assert result.returncode == 0, result.stderr[-5000:]
    return work / "ddp", result


def test_two_processes_with_torchrun_match_one_process_with_the_same_global_batch(
        tmp_path, tiny_model, data_json, ddp_run):
    ddp_dir, torchrun_result = ddp_run
    args = global_batch_args(tiny_model, data_json)
    single = run("train.py", *args, f"--output_dir={tmp_path}/single", "--per_device_train_batch_size=2", cwd=tmp_path)
    assert single.returncode == 0, single.stderr[-5000:]

    ddp_step, ddp_losses = logged_losses(ddp_dir)
    single_step, single_losses = logged_losses(tmp_path / "single")
    assert ddp_step == single_step == 8 and len(ddp_losses) == 8
    assert ddp_losses == pytest.approx(single_losses, abs=1e-4)
    assert sorted(os.listdir(ddp_dir)) == sorted(os.listdir(tmp_path / "single"))  # one adapter, one set
    assert torchrun_result.stdout.count("saved the adapter") == 1  # only rank 0 reports, logs and captions
    assert json.loads((ddp_dir / "run_config.json").read_text())["world_size"] == 2


def adapter_weights(output_dir):
    from safetensors.torch import load_file

    return load_file(os.path.join(output_dir, "adapter_model.safetensors"))


@pytest.mark.slow  # DeepSpeed compiles its CPU op with g++ on first use (minutes), then caches it
@pytest.mark.parametrize("stage", ["zero2", "zero3"])
def test_deepspeed_trains_saves_and_captions_like_plain_data_parallel(tmp_path, tiny_model, data_json, ddp_run, stage):
    ddp_dir, _ = ddp_run
    result = torchrun(*global_batch_args(tiny_model, data_json), f"--output_dir={tmp_path}/{stage}",
                      f"--deepspeed={stage}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-5000:]
    (step, losses), (ddp_step, ddp_losses) = logged_losses(tmp_path / stage), logged_losses(ddp_dir)
    assert step == ddp_step == 8 and losses == pytest.approx(ddp_losses, abs=1e-4)
    deepspeed_adapter, ddp_adapter = adapter_weights(tmp_path / stage), adapter_weights(ddp_dir)
    assert deepspeed_adapter.keys() == ddp_adapter.keys()
    for name, weight in ddp_adapter.items():  # ZeRO-3 sums partitioned gradients in another order: 1.3e-5 seen
        assert torch.allclose(deepspeed_adapter[name], weight, atol=1e-4), name
    # the held-out images are captioned after training, once, also when ZeRO-3 splits the weights over processes
    assert result.stdout.count("saved the adapter") == 1
    for color in ("blue", "yellow", "white", "black"):
        assert result.stdout.count(f"images/{color}.jpg: ") == 1, result.stdout[-3000:]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny_model, data_json):
    output_dir = tmp_path_factory.mktemp("uninterrupted") / "out"
    result = run("train.py", *resume_args(tiny_model, data_json, output_dir), cwd=output_dir.parent)
    assert result.returncode == 0, result.stderr[-5000:]
    return logged_losses(output_dir)


def resume_args(tiny_model, data_json, output_dir):
    # 4 training images, batch 1: 4 steps an epoch, 120 steps in all, counted from epochs rather than max_steps
    return [f"--model={tiny_model}", f"--json_path={data_json}", f"--output_dir={output_dir}", "--test_size=2",
            "--per_device_train_batch_size=1", "--num_train_epochs=30", "--save_steps=10", *COMMON]


@pytest.mark.parametrize("stop", [pytest.param(signal.SIGTERM, marks=pytest.mark.slow), signal.SIGKILL],
                         ids=["SIGTERM", "SIGKILL"])
def test_a_killed_run_resumes_from_its_checkpoint_and_ends_like_an_uninterrupted_one(
        stop, tmp_path, tiny_model, data_json, uninterrupted, monkeypatch):
    output_dir = tmp_path / "out"
    monkeypatch.setenv("SWANLAB_LOG_DIR", str(tmp_path / "swanlab-logs"))
    args = [*resume_args(tiny_model, data_json, output_dir), "--swanlab_mode", "local"]
    process = start_and_wait_for([sys.executable, os.path.join(REPO, "train.py"), *args],
                                 written_whole(output_dir / "checkpoint-10"), cwd=tmp_path,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    process.send_signal(stop)
    _, stderr = process.communicate(timeout=120)
    if stop == signal.SIGTERM:  # stopped like Ctrl-C, with a message
        assert process.returncode == 130 and "interrupted: the files already finished are kept" in stderr
    else:
        assert process.returncode == -signal.SIGKILL
    assert not (output_dir / "adapter_config.json").exists()  # it did not finish
    first_run_id = json.loads((output_dir / "run_config.json").read_text())["swanlab_run_id"]
    interrupted_at = max_step(output_dir)
    assert 10 <= interrupted_at < 120

    resumed = run("train.py", *args, cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-5000:]
    assert f"resuming the interrupted run from {output_dir}/checkpoint-" in resumed.stdout
    final_step, losses = logged_losses(output_dir)
    expected_step, expected_losses = uninterrupted
    assert final_step == expected_step == 120
    assert losses[-1] == pytest.approx(expected_losses[-1], abs=1e-3)  # same optimizer, schedule and data order
    # the same SwanLab experiment continues, logged where SWANLAB_LOG_DIR says
    assert json.loads((output_dir / "run_config.json").read_text())["swanlab_run_id"] == first_run_id
    assert len([name for name in os.listdir(tmp_path / "swanlab-logs") if name.endswith(first_run_id)]) == 2
    # and, as the Hugging Face example scripts do, the run's state and results at the top of output_dir
    state = json.loads((output_dir / "trainer_state.json").read_text())
    results = json.loads((output_dir / "train_results.json").read_text())
    assert state["global_step"] == 120 and results["epoch"] == state["epoch"] and results["train_loss"] > 0

    captioned = run("infer.py", f"--output_dir={output_dir}", f"--output_path={tmp_path}/p.jsonl", cwd=tmp_path)
    assert captioned.returncode == 0, captioned.stderr[-5000:]
    assert len((tmp_path / "p.jsonl").read_text().splitlines()) == 2


def test_changed_settings_are_not_resumed(tmp_path, tiny_model, data_json):
    output_dir = tmp_path / "out"
    (output_dir / "checkpoint-10").mkdir(parents=True)
    (output_dir / "checkpoint-10" / "trainer_state.json").write_text("{}")
    (output_dir / "run_config.json").write_text(json.dumps({"learning_rate": 0.1, "lora_r": 64}))
    with pytest.raises(PipelineError, match="holds an interrupted run with other settings .learning_rate differ."):
        train.main([f"--json_path={data_json}", f"--output_dir={output_dir}",
                    "--model=not-downloaded/Qwen2-VL-2B-Instruct"])


def test_deepspeed_configs_ship_and_are_selected_by_one_setting():
    for stage in (2, 3):
        with open(os.path.join(REPO, "deepspeed", f"zero{stage}.json")) as file:
            config = json.load(file)
        assert config["zero_optimization"]["stage"] == stage
        assert config["train_micro_batch_size_per_gpu"] == "auto"  # filled in from train.py's settings
    with pytest.raises(PipelineError, match="--deepspeed=zero4: use zero2, zero3 or the path of a DeepSpeed JSON"):
        deepspeed_configs.resolve_deepspeed("zero4")
    assert deepspeed_configs.resolve_deepspeed("") is None
    if importlib.util.find_spec("deepspeed") is None:
        with pytest.raises(PipelineError, match="--deepspeed=zero2 needs DeepSpeed, which is not installed"):
            deepspeed_configs.resolve_deepspeed("zero2")
    else:
        assert deepspeed_configs.resolve_deepspeed("zero3") == os.path.join(REPO, "deepspeed", "zero3.json")


def test_a_launcher_that_asked_for_two_cpu_processes_but_started_one_is_reported(tmp_path):
    # accelerate's multi-CPU mode needs an MPI hostfile; without one it runs the script once
    result = subprocess.run(
        [os.path.join(os.path.dirname(sys.executable), "accelerate"), "launch", "--cpu", "--num_processes=2",
         "--num_machines=1", "--mixed_precision=no", "--dynamo_backend=no", os.path.join(REPO, "train.py"),
         "--json_path=missing.json", "--swanlab_mode=disabled"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )
    assert "missing.json not found" in result.stderr  # it stopped at the first check, as one process
    assert result.stdout.count("this process runs alone (no WORLD_SIZE)") == 1, result.stdout + result.stderr
    alone = run("train.py", "--json_path=missing.json", "--swanlab_mode=disabled", cwd=tmp_path)
    assert "runs alone" not in alone.stdout


def two_process_resume_args(model, data_json, output_dir):
    # 4 training images over 2 processes, one each: 2 steps an epoch, so checkpoint-3 falls in the middle of epoch 1,
    # whose second step pairs other images than epoch 0's (a resume that reused epoch 0's order went unnoticed in
    # epoch 2, whose second step pairs the same two images as epoch 0's, only swapped between the processes)
    return [f"--model={model}", f"--json_path={data_json}", f"--output_dir={output_dir}", "--test_size=2",
            "--num_train_epochs=12", "--save_steps=3", *COMMON]


def resumes_to_the_uninterrupted_losses(model, data_json, tmp_path, *settings):
    """Two processes trained uninterrupted, then killed after checkpoint-3 and resumed: the same 24 losses."""
    uninterrupted = torchrun(*two_process_resume_args(model, data_json, tmp_path / "uninterrupted"), *settings,
                             cwd=tmp_path)
    assert uninterrupted.returncode == 0, uninterrupted.stderr[-5000:]

    output_dir = tmp_path / "out"
    args = [*two_process_resume_args(model, data_json, output_dir), *settings]
    launcher = start_and_wait_for(torchrun_command(*args), written_whole(output_dir / "checkpoint-3"), cwd=tmp_path,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for process in [*psutil.Process(launcher.pid).children(recursive=True), launcher]:  # each in its own session
        process.kill()
    launcher.wait(timeout=60)
    assert not (output_dir / "adapter_config.json").exists()
    for step, folder in checkpoint_folders(output_dir).items():  # one more saved in the instant before the kill
        if step > 3:  # ... would resume at an epoch's start: keep the kill in the middle of epoch 1
            shutil.rmtree(folder)

    resumed = torchrun(*args, cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-5000:]
    assert f"resuming the interrupted run from {output_dir}/checkpoint-3" in resumed.stdout
    step, losses = logged_losses(output_dir)
    expected_step, expected_losses = logged_losses(tmp_path / "uninterrupted")
    assert step == expected_step == 24
    assert losses == pytest.approx(expected_losses, abs=1e-5)  # step for step: same data order, optimizer and schedule


@pytest.mark.parametrize("order", [pytest.param("--group_by_length=true", marks=pytest.mark.slow),
                                   "--group_by_length=false"])
def test_two_processes_killed_mid_epoch_resume_to_the_losses_of_an_uninterrupted_run(
        tmp_path, tiny_model, data_json, order):
    resumes_to_the_uninterrupted_losses(tiny_model, data_json, tmp_path, order)


@pytest.mark.slow  # a minute: Qwen3.5's linear attention in its reference path
def test_qwen35_in_two_processes_killed_mid_epoch_resumes_to_the_losses_of_an_uninterrupted_run(
        tmp_path, qwen35_model, data_json):
    """The family whose language model mixes linear and full attention saves and resumes as the others do (torchrun
    gives each process one thread, as its linear attention wants)."""
    resumes_to_the_uninterrupted_losses(qwen35_model, data_json, tmp_path, "--image_size=64")


def test_processes_that_read_different_free_memory_take_one_cache_plan_and_train_alike(
        tmp_path, tiny_model, data_json, ddp_run, monkeypatch):
    """Each process read its own free memory and decided alone: rank 1 skipped the cache while rank 0 entered the
    collective that gathers the features, and the run died (gloo) or hung (NCCL)."""
    ddp_dir, _ = ddp_run
    monkeypatch.setenv("FREE_MEMORY_BY_RANK", f"{2**40},{2**10}")  # rank 0: a terabyte free; rank 1: a kilobyte
    result = subprocess.run(torchrun_command(*global_batch_args(tiny_model, data_json), f"--output_dir={tmp_path}/out",
                                             wrapper=[os.path.join(REPO, "tests", "memory_reads.py")]),
                            cwd=tmp_path, capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stderr[-5000:]
    # the smallest reading decides for all: one copy on the node, read back from the local disk
    assert "image features computed once" in result.stdout and "read from disk" in result.stdout, result.stdout
    (step, losses), (ddp_step, ddp_losses) = logged_losses(tmp_path / "out"), logged_losses(ddp_dir)
    assert step == ddp_step == 8 and losses == pytest.approx(ddp_losses, abs=1e-4)


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def two_node_launchers(args, folders):
    """train.py as two nodes of one process each, both on 127.0.0.1, each launcher started in its own folder."""
    port = free_port()
    return [subprocess.Popen(torchrun_command(*args, launch=("--nnodes=2", f"--node_rank={node}", "--nproc_per_node=1",
                                                             "--master_addr=127.0.0.1", f"--master_port={port}")),
                             cwd=folder, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for node, folder in enumerate(folders)]


def test_two_nodes_that_do_not_share_output_dir_both_stop_at_once_saying_it_must_be_shared(
        tmp_path, tiny_model, data_json):
    """Only node 0 had the checkpoints: killed and restarted, node 0 resumed at step 2 while node 1 started from 0."""
    folders = [tmp_path / "node0", tmp_path / "node1"]
    for folder in folders:
        folder.mkdir()
    launchers = two_node_launchers([*global_batch_args(tiny_model, data_json), "--output_dir=out"], folders)
    for launcher, folder in zip(launchers, folders):
        _, stderr = launcher.communicate(timeout=600)
        assert launcher.returncode != 0
        assert "--output_dir=out is not one folder shared by every process" in stderr, stderr[-3000:]
        assert "must be on storage all nodes share" in stderr
        assert not checkpoint_folders(folder / "out")  # it stopped before training


def test_two_nodes_sharing_output_dir_train_as_two_processes_on_one_node(tmp_path, tiny_model, data_json, ddp_run):
    ddp_dir, _ = ddp_run
    launchers = two_node_launchers([*global_batch_args(tiny_model, data_json), f"--output_dir={tmp_path}/shared"],
                                   [tmp_path, tmp_path])
    for launcher in launchers:
        _, stderr = launcher.communicate(timeout=1200)
        assert launcher.returncode == 0, stderr[-5000:]
    (step, losses), (ddp_step, ddp_losses) = logged_losses(tmp_path / "shared"), logged_losses(ddp_dir)
    assert step == ddp_step == 8 and losses == pytest.approx(ddp_losses, abs=1e-4)
