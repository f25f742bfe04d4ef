"""A disk that fills up: each step that writes files stops with one message naming the folder and the space needed,
leaves no half-written file, and the next run, once space is free, continues. The disk fills up in a patched writer
(tests/disk_fills_up.py), never for real."""
import glob
import os

import pytest

from conftest import make_imagefolder, read_csv, run


def stopped_on_full_disk(result, folder, what, setting):
    assert result.returncode == 1, result.stdout[-2000:] + result.stderr[-3000:]
    message = result.stderr.strip().splitlines()[-1]
    assert message.startswith(f"error: the disk holding {folder} is full: writing {what} failed with "
                              '"No space left on device". It needs about '), message
    assert " and 0 bytes is free. Nothing half-written was kept. Free some space (or give " \
           f"--{setting} a folder on another disk) and run the same command again: " in message, message


def half_written(folder):
    return glob.glob(f"{folder}/**/*.part", recursive=True) + glob.glob(f"{folder}/**/*.part/", recursive=True)


def test_data2csv_and_csv2json(tmp_path):
    source = make_imagefolder(tmp_path / "source")
    images = tmp_path / "coco_2014_caption"

    full = run("data2csv.py", f"--source={source}", cwd=tmp_path, disk_full_at=(f"{images}/*.jpg.part", 2))
    stopped_on_full_disk(full, "coco_2014_caption", "the images", "image_dir")
    assert len(os.listdir(images)) == 2 and not (tmp_path / "coco-2024-dataset.csv").exists()

    full = run("data2csv.py", f"--source={source}", cwd=tmp_path, disk_full_at=("*/coco-2024-dataset.csv.part", 0))
    stopped_on_full_disk(full, tmp_path, "coco-2024-dataset.csv", "csv_path")
    assert "4 fetched now" not in full.stdout and len(os.listdir(images)) == 6

    done = run("data2csv.py", f"--source={source}", cwd=tmp_path)
    assert done.returncode == 0 and "(0 fetched now, 6 already there)" in done.stdout
    assert len(read_csv(tmp_path / "coco-2024-dataset.csv")) == 6

    full = run("csv2json.py", cwd=tmp_path, disk_full_at=("*/data_vl.json.part", 0))
    stopped_on_full_disk(full, tmp_path, "data_vl.json", "json_path")
    assert not (tmp_path / "data_vl.json").exists()
    assert run("csv2json.py", cwd=tmp_path).returncode == 0 and (tmp_path / "data_vl.json").is_file()
    assert not half_written(tmp_path)


@pytest.mark.slow  # two minutes: every later step's writer filled in turn
def test_train_infer_merge_and_compare(tmp_path, tiny_model):
    from safetensors.torch import load_file

    assert run("data2csv.py", f"--source={make_imagefolder(tmp_path / 'source')}", cwd=tmp_path).returncode == 0
    assert run("csv2json.py", cwd=tmp_path).returncode == 0
    output = tmp_path / "output" / "Qwen2-VL-2B"
    settings = [f"--model={tiny_model}", "--test_size=2", "--image_size=56", "--max_steps=6", "--save_steps=2",
                "--per_device_train_batch_size=2", "--gradient_accumulation_steps=1", "--swanlab_mode=disabled",
                "--dataloader_num_workers=0", "--max_new_tokens=4"]

    full = run("train.py", *settings, cwd=tmp_path, disk_full_at=("*/data_vl_train.json.part", 0))
    assert full.returncode == 1 and full.stderr.strip().splitlines()[-1] == (
        "error: the disk is full: [Errno 28] No space left on device. Free some space on it and run the same "
        "command again"), full.stderr[-3000:]

    full = run("train.py", *settings, cwd=tmp_path, disk_full_at=(f"{output}/checkpoint-4/optimizer.pt", 0))
    stopped_on_full_disk(full, "output/Qwen2-VL-2B", "a checkpoint", "output_dir")
    assert full.stderr.endswith("it resumes from the newest complete checkpoint\n")
    assert sorted(os.listdir(output)) == ["checkpoint-2", "run_config.json"]  # the half-written checkpoint-4 is gone

    full = run("train.py", *settings, cwd=tmp_path,
               disk_full_at=(f"{output}/final-adapter.part/adapter_model.safetensors", 0))
    assert "resuming the interrupted run from output/Qwen2-VL-2B/checkpoint-2" in full.stdout
    stopped_on_full_disk(full, "output/Qwen2-VL-2B", "the final adapter", "output_dir")
    assert sorted(os.listdir(output)) == ["all_results.json", "checkpoint-2", "checkpoint-4", "checkpoint-6",
                                          "run_config.json", "train_results.json", "trainer_state.json"]

    done = run("train.py", *settings, cwd=tmp_path)
    assert done.returncode == 0 and "resuming the interrupted run from output/Qwen2-VL-2B/checkpoint-6" in done.stdout
    final, last = (load_file(folder / "adapter_model.safetensors") for folder in (output, output / "checkpoint-6"))
    assert final.keys() == last.keys() and all((final[name] == last[name]).all() for name in final)

    full = run("infer.py", cwd=tmp_path, disk_full_at=("*/predictions.jsonl.part", 0))
    stopped_on_full_disk(full, output, "output/Qwen2-VL-2B/predictions.jsonl", "output_path")
    assert run("infer.py", cwd=tmp_path).returncode == 0 and (output / "predictions.jsonl").is_file()

    full = run("merge.py", cwd=tmp_path, disk_full_at=("*/Qwen2-VL-2B-merged.part/model*.safetensors", 0))
    stopped_on_full_disk(full, "output/Qwen2-VL-2B-merged", "the merged model", "merged_dir")
    assert glob.glob(f"{tmp_path}/output/*") == [str(output)]
    assert run("merge.py", cwd=tmp_path).returncode == 0 and (tmp_path / "output" / "Qwen2-VL-2B-merged").is_dir()

    full = run("compare.py", "--swanlab_mode=disabled", "--java=never", cwd=tmp_path,
               disk_full_at=("*/eval/report.html.part", 0))
    stopped_on_full_disk(full, "output/Qwen2-VL-2B/eval", "the report", "report_dir")
    assert os.listdir(output / "eval") == []
    done = run("compare.py", "--swanlab_mode=disabled", "--java=never", cwd=tmp_path)
    assert done.returncode == 0 and sorted(os.listdir(output / "eval")) == ["metrics.json", "report.html"]
    assert not half_written(tmp_path)
