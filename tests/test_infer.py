"""infer.py's parts: finding the newest adapter, reading training's settings, expanding image lists."""
import os

import pytest
from PIL import Image

import infer
from captioning.adapters import newest_checkpoint, read_run_config
from captioning.errors import PipelineError
from captioning.generation import generate_captions


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


def test_batched_captions_equal_one_at_a_time_for_every_family(family_model, family_processor, family_side):
    """Left padding in a batch changes nothing: the same greedy captions as each image alone."""
    import numpy
    from transformers import AutoModelForImageTextToText

    from bench.bench import captions_a_person_can_compare

    model = AutoModelForImageTextToText.from_pretrained(family_model).eval()
    captions_a_person_can_compare(model, family_processor.tokenizer)
    noise = numpy.random.default_rng(0).integers(0, 255, (3, family_side, family_side, 3), dtype=numpy.uint8)
    images = [Image.fromarray(pixels) for pixels in noise]
    batched = generate_captions(model, family_processor, images, "COCO Yes:", 8, batch_size=3)
    alone = [generate_captions(model, family_processor, [image], "COCO Yes:", 8, batch_size=1)[0] for image in images]
    assert batched == alone and len(set(batched)) > 1 and all(batched)  # the images change the text
