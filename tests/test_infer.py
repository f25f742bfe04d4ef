"""infer.py's parts: finding the newest adapter, reading training's settings, expanding image lists."""
import glob
import json
import os

import pytest
from PIL import Image

from captioning.image_paths import image_paths
from captioning.predictions import Predictions
from captioning.checkpoints import newest_checkpoint, read_run_config
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


def test_images_setting_takes_files_globs_folders_lists_and_the_earlier_steps_files(tmp_path, capsys):
    for name in ("b.jpg", "a.jpg", "c.png", "sub/z.webp", "sub/deeper/y.JPG", "sub/notes.txt"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    spec = f"{tmp_path}/*.jpg, {tmp_path}/missing.jpg,{tmp_path}/none*.gif"
    assert list(image_paths(spec)) == [f"{tmp_path}/a.jpg", f"{tmp_path}/b.jpg", f"{tmp_path}/missing.jpg"]
    assert f"no file matches {tmp_path}/none*.gif" in capsys.readouterr().out
    # a folder: its images, recursively, each folder's own before its subfolders'
    assert list(image_paths(str(tmp_path / "sub"))) == [f"{tmp_path}/sub/z.webp", f"{tmp_path}/sub/deeper/y.JPG"]
    (tmp_path / "list.txt").write_text(f"c.png\n\n{tmp_path}/a.jpg\n  spaced.jpg  \n")
    assert list(image_paths(str(tmp_path / "list.txt"))) == ["c.png", f"{tmp_path}/a.jpg", "spaced.jpg"]
    (tmp_path / "data.csv").write_text("image_path,caption,image_id\na.jpg,one,1\nb.jpg,two,2\na.jpg,three,1\n")
    assert list(image_paths(str(tmp_path / "data.csv"))) == ["a.jpg", "b.jpg"]  # each image once
    entries = [{"conversations": [{"from": "user", "value": f"COCO Yes: <|vision_start|>{image}<|vision_end|>"},
                                  {"from": "assistant", "value": "a caption"}]} for image in ("b.jpg", "b.jpg", "a.jpg")]
    (tmp_path / "data_vl.json").write_text(json.dumps(entries))
    assert list(image_paths(str(tmp_path / "data_vl.json"))) == ["b.jpg", "a.jpg"]
    (tmp_path / "other.csv").write_text("path,text\na.jpg,one\n")
    with pytest.raises(PipelineError, match=r"other.csv has no image_path column \(its columns: path, text\)"):
        list(image_paths(str(tmp_path / "other.csv")))


def test_records_written_by_any_number_of_processes_are_not_captioned_again_and_merge_in_input_order(tmp_path):
    output = str(tmp_path / "out.jsonl")
    paths = [f"image{number}.jpg" for number in range(10)]
    # an interrupted run of three processes: each wrote some of its share; one was killed while appending
    for rank in range(3):
        part = Predictions(output, rank, 3)
        part.append([{"image_path": path, "caption": f"caption of {path}"}
                     for path in list(part.to_caption(paths))[:2]])
    with open(os.path.join(output + ".parts", "part-2.jsonl"), "a") as file:
        file.write('{"image_path": "image9.jp')
    written = {json.loads(line)["image_path"] for part in glob.glob(output + ".parts/*") for line in open(part)
               if line.endswith("\n")}
    assert len(written) == 6
    alone = Predictions(output, 0, 1)  # resumed by one process
    left = list(alone.to_caption(paths + ["image0.jpg"]))
    assert left == [path for path in paths if path not in written]
    alone.append([{"image_path": left[0], "skipped": "cannot read image"}] +
                 [{"image_path": path, "caption": f"caption of {path}"} for path in left[1:]])
    added, skipped = alone.merge(paths)
    assert (added, skipped) == (9, [(left[0], "cannot read image")])
    records = [json.loads(line) for line in open(output)]
    assert [record["image_path"] for record in records] == [path for path in paths if path != left[0]]
    assert not os.path.exists(output + ".parts")
    # a later run with more images keeps the earlier records as they were and adds the new ones after them
    later = Predictions(output, 0, 1)
    assert list(later.to_caption(["new.jpg", *paths])) == ["new.jpg", left[0]]
    later.append([{"image_path": "new.jpg", "caption": "new"}])
    assert later.merge(["new.jpg", *paths]) == (1, [])
    assert [json.loads(line)["image_path"] for line in open(output)][-1] == "new.jpg"


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
