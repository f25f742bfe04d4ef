"""infer.py's parts: finding the newest adapter, reading training's settings, expanding image lists."""
import os

import pytest

import infer
from captioning import PipelineError, newest_checkpoint, read_run_config


def make_adapter(folder, saved_at):
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "adapter_config.json")
    with open(path, "w") as file:
        file.write("{}")
    os.utime(path, (saved_at, saved_at))
    return str(folder)


def test_newest_checkpoint_is_the_most_recently_saved_adapter(tmp_path):
    with pytest.raises(PipelineError, match="no trained adapter in"):
        newest_checkpoint(str(tmp_path))
    make_adapter(tmp_path / "checkpoint-100", 1000)
    make_adapter(tmp_path / "checkpoint-62", 2000)  # saved later by a smaller run: the step number does not matter
    (tmp_path / "checkpoint-900").mkdir()  # no adapter files in it
    assert newest_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoint-62")
    make_adapter(tmp_path, 3000)  # the final adapter of a finished run
    assert newest_checkpoint(str(tmp_path)) == str(tmp_path)
    make_adapter(tmp_path / "checkpoint-20", 3000)  # same time: the final adapter wins over a checkpoint
    assert newest_checkpoint(str(tmp_path)) == str(tmp_path)


def test_run_config_is_read_from_the_checkpoint_or_its_parent(tmp_path):
    (tmp_path / "checkpoint-5").mkdir()
    with pytest.raises(PipelineError, match="no run_config.json in"):
        read_run_config(str(tmp_path / "checkpoint-5"))
    (tmp_path / "run_config.json").write_text('{"prompt": "COCO Yes:", "image_size": 280}')
    assert read_run_config(str(tmp_path / "checkpoint-5"))["image_size"] == 280


def test_images_setting_takes_paths_and_globs(tmp_path, capsys):
    for name in ("b.jpg", "a.jpg", "c.png"):
        (tmp_path / name).write_bytes(b"")
    spec = f"{tmp_path}/*.jpg, {tmp_path}/missing.jpg,{tmp_path}/none*.gif"
    assert infer.expand_images(spec) == [f"{tmp_path}/a.jpg", f"{tmp_path}/b.jpg", f"{tmp_path}/missing.jpg"]
    assert f"no file matches {tmp_path}/none*.gif" in capsys.readouterr().out
