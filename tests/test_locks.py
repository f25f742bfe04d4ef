"""One run per output: a second process that targets a folder or file in use stops at once and names the first;
a lock left by a killed process is taken over."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import REPO, make_imagefolder, run, start_and_wait_for


def holder(path):
    """A separate process that holds path with captioning.locks.hold until it is killed."""
    code = f"import sys, time; sys.path.insert(0, {REPO!r}); from captioning.locks import hold\n" \
           f"with hold({str(path)!r}):\n    print('held', flush=True); time.sleep(600)"
    process = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "held"
    return process


@pytest.mark.parametrize("script, args, target", [
    ("data2csv.py", ["--csv_path=data.csv"], "coco_2014_caption"),
    ("data2csv.py", ["--csv_path=data.csv"], "data.csv"),
    ("csv2json.py", ["--csv_path=data.csv"], "data_vl.json"),
    ("merge.py", [], "output/Qwen2-VL-2B-merged"),
    ("compare.py", [], "output/Qwen2-VL-2B/eval"),
])
def test_a_folder_in_use_stops_the_second_process_at_once_and_a_killed_holder_s_lock_is_taken_over(
        script, args, target, tmp_path, tiny_model):
    for name in ("adapter_config.json", "adapter_model.safetensors"):  # enough of an adapter to reach the lock
        (tmp_path / "output" / "Qwen2-VL-2B").mkdir(parents=True, exist_ok=True)
        (tmp_path / "output" / "Qwen2-VL-2B" / name).write_text("{}")
    (tmp_path / "output" / "Qwen2-VL-2B" / "run_config.json").write_text(
        json.dumps({"model": tiny_model, "image_size": 56, "prompt": "COCO Yes:",  # loads, then the adapter fails
                    "test_json": "missing.json", "train_json": "missing.json"}))
    source = make_imagefolder(tmp_path / "source")
    first = holder(tmp_path / target)
    try:
        start = time.perf_counter()
        refused = run(script, f"--source={source}" if script == "data2csv.py" else "--debug=false", *args,
                      "--swanlab_mode=disabled" if script == "compare.py" else "--debug=false", cwd=tmp_path)
        assert refused.returncode == 1 and time.perf_counter() - start < 60
        assert f"{target} is in use by process {first.pid} on " in refused.stderr
        assert "Wait for that run to finish or stop it, or give this one another folder or file" in refused.stderr
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    taken_over = run(script, f"--source={source}" if script == "data2csv.py" else "--debug=false", *args,
                     "--swanlab_mode=disabled" if script == "compare.py" else "--debug=false", cwd=tmp_path)
    assert f"taking over {target} from process {first.pid} on " in taken_over.stdout
    assert "is in use by" not in taken_over.stderr  # it got past the lock; what follows depends on the step


def test_two_training_runs_on_one_output_dir(tmp_path, tiny_model):
    """The second stops at once with the message; the first finishes untouched."""
    folder = make_imagefolder(tmp_path / "source")
    assert run("data2csv.py", f"--source={folder}", cwd=tmp_path).returncode == 0
    assert run("csv2json.py", cwd=tmp_path).returncode == 0
    args = [f"--model={tiny_model}", "--test_size=2", "--image_size=56", "--max_steps=20", "--save_steps=5000",
            "--per_device_train_batch_size=2", "--gradient_accumulation_steps=1", "--swanlab_mode=disabled"]
    owner = tmp_path / "output" / ".Qwen2-VL-2B.lock.json"
    first = start_and_wait_for([sys.executable, os.path.join(REPO, "train.py"), *args], owner, cwd=tmp_path,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    first.send_signal(signal.SIGSTOP)  # paused while it holds the lock, however fast it would train
    try:
        second = run("train.py", *args, cwd=tmp_path)
    finally:
        first.send_signal(signal.SIGCONT)
    assert second.returncode == 1, second.stderr[-3000:]
    assert f"output/Qwen2-VL-2B is in use by process {first.pid} on " in second.stderr
    output, _ = first.communicate(timeout=600)
    assert first.returncode == 0, output[-3000:]
    assert (tmp_path / "output" / "Qwen2-VL-2B" / "adapter_config.json").is_file() and not owner.exists()
