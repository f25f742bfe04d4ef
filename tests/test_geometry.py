"""Train as served: every photo gets the same image grid in training, in infer.py and in transformers' own processor
reading the saved folder, for each family; the shapes no processor takes are named, and the recipe's square stays."""
import json

import pytest
from PIL import Image

from captioning.errors import PipelineError
from captioning.images import ImageGeometry, load_image, trained_geometry, upright_size
from captioning.served_files import pin_image_size, save_processor
from captioning.models import model_family
from captioning.training_samples import CaptionDataset
from conftest import copy_of, run

SHAPES = [(640, 480), (480, 640), (1000, 100), (100, 1000), (300, 300), (1, 1), (306, 306), (1920, 1080)]
REFUSED = (5000, 20)  # a long side more than 200 times the short one


def photo(folder, size, name=None):
    path = folder / f"{name or '%dx%d' % size}.jpg"
    Image.new("RGB", size, (size[0] % 256, size[1] % 256, 120)).save(path)
    return str(path)


def grids(processor, images):
    return processor.image_processor(images=images, return_tensors="pt")["image_grid_thw"].tolist()


def test_every_shape_gets_the_same_grid_in_training_infer_and_transformers(family_model, tmp_path):
    from transformers import AutoProcessor

    family_processor = AutoProcessor.from_pretrained(family_model)  # pinned here, so not the shared fixture
    family = model_family(family_model)
    geometry = ImageGeometry(family.image_size, family.side_multiple)
    paths = [photo(tmp_path, size) for size in SHAPES]
    samples = [{"image_path": path, "prompt": "COCO Yes:", "caption": "a photo"} for path in paths]

    pin_image_size(family_processor, geometry)
    dataset = CaptionDataset(samples, family_processor, geometry, max_length=8192, show_progress=False)
    in_training = [dataset[index]["image_grid_thw"].tolist()[0] for index in range(len(dataset))]
    in_infer = grids(family_processor, [load_image(path, geometry) for path in paths])
    save_processor(family_processor, tmp_path / "served", geometry, family_model)
    served = AutoProcessor.from_pretrained(tmp_path / "served")
    as_served = grids(served, [Image.open(path).convert("RGB") for path in paths])  # full size, as users send them

    assert in_training == in_infer == as_served
    merge = family.side_multiple // 2  # grid rows and columns count patches, two per merged patch side
    for (width, height), (_, rows, columns) in zip(SHAPES, in_training):
        if max(width, height) <= 10 * min(width, height):  # only extreme shapes may pass image_size² with a side
            assert rows * columns * merge ** 2 <= family.image_size ** 2  # of one merged patch
        assert (columns >= rows) == (width >= height) or width == height  # the photo's orientation kept
    assert in_training[SHAPES.index((1, 1))] == [1, 2, 2]  # a 1x1 image becomes one merged patch
    assert len(dataset.lengths) == len(SHAPES) and len(set(dataset.lengths)) > 3  # tokens follow each shape


def test_a_shape_no_processor_takes_is_named_and_skipped_everywhere(tiny_processor, tmp_path):
    geometry = ImageGeometry(56, 28)
    path = photo(tmp_path, REFUSED)
    kept = photo(tmp_path, (640, 480))
    samples = [{"image_path": p, "prompt": "COCO Yes:", "caption": "a photo"} for p in (path, kept)]
    dataset = CaptionDataset(samples, tiny_processor, geometry, max_length=8192, show_progress=False)
    assert [sample["image_path"] for sample in dataset.samples] == [kept]
    assert dataset.skipped == [f"{path} is 5000x20, a shape the Qwen-VL processor refuses in transformers and "
                               "vLLM alike (absolute aspect ratio must be smaller than 200, got 250.0): crop it"]
    with pytest.raises(PipelineError, match=r"is 5000x20, a shape the Qwen-VL processor refuses"):
        load_image(path, geometry)
    with pytest.raises(ValueError, match="aspect ratio must be smaller than 200"):  # transformers' own refusal
        tiny_processor.image_processor(images=[Image.open(path).convert("RGB")])


def test_a_turned_photo_is_sized_upright_from_its_header(tmp_path):
    path = str(tmp_path / "turned.jpg")
    exif = Image.Exif()
    exif[274] = 6  # rotated 90 degrees: a 640x480 file shown as 480x640
    Image.new("RGB", (640, 480), "red").save(path, exif=exif)
    geometry = ImageGeometry(280, 28)
    assert upright_size(path) == (480, 640)
    assert load_image(path, geometry).size == geometry.size_of(480, 640) == (224, 308)


def test_the_recipe_s_square_stays_a_setting_and_older_runs_read_as_square():
    square = ImageGeometry(280, 28, square=True)
    assert square.size_of(640, 480) == square.size_of(1, 1) == (280, 280)
    assert trained_geometry({"image_size": 280, "family": "Qwen2-VL"}) == square  # recorded before the setting
    assert trained_geometry({"image_size": 280}) == square  # recorded before the family was
    assert trained_geometry({"image_size": 288, "family": "Qwen3-VL", "aspect_ratio": "keep"}) == ImageGeometry(288, 32)
    assert str(ImageGeometry(280, 28)) == "aspect ratio kept, at most 280x280 pixels"


def test_the_recipe_s_square_still_trains_captions_and_records_itself(tiny_model, colour_run, tmp_path_factory):
    work = copy_of(colour_run, tmp_path_factory, "square")  # its photos of several shapes and data_vl.json
    for step in (("train.py", f"--model={tiny_model}", "--aspect_ratio=square", "--image_size=56", "--max_steps=2",
                  "--test_size=2", "--per_device_train_batch_size=2", "--gradient_accumulation_steps=1",
                  "--swanlab_mode=disabled", "--output_dir=square"),
                 ("infer.py", f"--images={work / 'coco_2014_caption' / 'blue.jpg'}", "--max_new_tokens=4",
                  "--output_dir=square")):
        result = run(*step, cwd=work)
        assert result.returncode == 0, result.stderr[-3000:]
        if step[0] == "train.py":
            assert "warning: aspect_ratio=square: every image is squashed to 56x56 as the recipe does" in result.stdout
    run_config = json.loads((work / "square" / "run_config.json").read_text())
    assert run_config["aspect_ratio"] == "square" and trained_geometry(run_config) == ImageGeometry(56, 28, True)
    assert "images squashed to a square 56x56 pixels" in result.stdout  # infer.py says which geometry it uses
