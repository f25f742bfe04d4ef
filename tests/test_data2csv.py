"""data2csv.py: every source, RGB JPEG output, resume after a kill, and captions that survive the CSV."""
import csv
import io
import json
import os
import signal
import subprocess
import sys
import time
import zipfile

import pytest
from PIL import Image

import data2csv
from captioning import PipelineError
from conftest import REPO, make_imagefolder, run


def jpeg_bytes(mode, color, size=(40, 30)):
    buffer = io.BytesIO()
    Image.new(mode, size, color).save(buffer, format="JPEG")
    return buffer.getvalue()


def serve_coco(server, images, captions, split="train"):
    """Put a COCO-style annotation zip and the images on the server; returns the annotation URL."""
    annotations = {
        "images": [
            {"id": image_id, "file_name": f"COCO_{split}2014_{image_id:012d}.jpg",
             "coco_url": f"{server.url}/{split}2014/COCO_{split}2014_{image_id:012d}.jpg"}
            for image_id in images
        ],
        "annotations": [
            {"id": number, "image_id": image_id, "caption": caption}
            for number, (image_id, caption) in enumerate(captions)
        ],
    }
    for image_id, body in images.items():
        server.files[f"/{split}2014/COCO_{split}2014_{image_id:012d}.jpg"] = body
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as zipped:
        zipped.writestr(f"annotations/captions_{split}2014.json", json.dumps(annotations))
    server.files["/annotations/annotations_trainval2014.zip"] = archive.getvalue()
    return f"{server.url}/annotations/annotations_trainval2014.zip"


def read_csv(path):
    with open(path, encoding="utf-8", newline="") as file:
        return list(csv.DictReader(file))


COCO_IMAGES = {
    1: jpeg_bytes("RGB", "red"),
    2: jpeg_bytes("L", 128),  # COCO has grayscale ...
    3: jpeg_bytes("CMYK", (0, 255, 255, 0)),  # ... and CMYK JPEGs
    4: jpeg_bytes("RGB", "blue"),
    5: jpeg_bytes("RGB", "green"),
}
COCO_CAPTIONS = [(1, "A red thing."), (2, "A gray thing."), (1, "Red, again."), (3, "A CMYK thing."),
                 (4, "A blue thing."), (5, "Never fetched.")]


def coco_args(tmp_path, url, *extra):
    return ["--source=coco", f"--coco_annotations={url}", f"--image_dir={tmp_path}/images",
            f"--csv_path={tmp_path}/data.csv", f"--download_dir={tmp_path}/downloads", "--max_data_number=5", *extra]


def test_coco_source_fetches_only_needed_images_as_rgb_jpeg(tmp_path, file_server):
    url = serve_coco(file_server, COCO_IMAGES, COCO_CAPTIONS)
    data2csv.main(coco_args(tmp_path, url))

    rows = read_csv(tmp_path / "data.csv")
    assert [(row["image_id"], row["caption"]) for row in rows] == [
        (str(image_id), caption) for image_id, caption in COCO_CAPTIONS[:5]
    ]
    assert all(row["image_path"] == str(tmp_path / "images" / f"{row['image_id']}.jpg") for row in rows)
    assert sorted(os.listdir(tmp_path / "images")) == ["1.jpg", "2.jpg", "3.jpg", "4.jpg"]
    for name in os.listdir(tmp_path / "images"):
        with Image.open(tmp_path / "images" / name) as image:
            assert (image.format, image.mode) == ("JPEG", "RGB")
    # an RGB JPEG is kept byte for byte; image 1 has two captions but is fetched once; image 5 is never fetched
    assert (tmp_path / "images" / "1.jpg").read_bytes() == COCO_IMAGES[1]
    assert file_server.requests["/train2014/COCO_train2014_000000000001.jpg"] == 1
    assert file_server.requests["/train2014/COCO_train2014_000000000005.jpg"] == 0

    # the annotation download is kept, and a second run fetches nothing again
    data2csv.main(coco_args(tmp_path, url))
    assert file_server.requests["/annotations/annotations_trainval2014.zip"] == 1
    assert file_server.requests["/train2014/COCO_train2014_000000000001.jpg"] == 1
    assert read_csv(tmp_path / "data.csv") == rows


def test_coco_retries_server_errors_and_reports_missing_images(tmp_path, file_server):
    url = serve_coco(file_server, {i: COCO_IMAGES[i] for i in (1, 3, 4)}, [(1, "one"), (3, "gone"), (4, "four")])
    del file_server.files["/train2014/COCO_train2014_000000000003.jpg"]
    file_server.failures["/train2014/COCO_train2014_000000000001.jpg"] = [503]
    data2csv.main(coco_args(tmp_path, url, "--retries=1"))

    assert file_server.requests["/train2014/COCO_train2014_000000000001.jpg"] == 2  # one 503, then the image
    assert file_server.requests["/train2014/COCO_train2014_000000000003.jpg"] == 1  # 404 is not retried
    assert [row["image_id"] for row in read_csv(tmp_path / "data.csv")] == ["1", "4"]


def test_killed_run_resumes_without_refetching_or_half_written_files(tmp_path, file_server):
    url = serve_coco(file_server, COCO_IMAGES, COCO_CAPTIONS)
    held = "/train2014/COCO_train2014_000000000004.jpg"
    file_server.hold.add(held)  # the download of image 4 hangs until the run is killed
    process = subprocess.Popen([sys.executable, os.path.join(REPO, "data2csv.py"), *coco_args(tmp_path, url)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while file_server.requests[held] == 0 and time.time() < deadline:
        time.sleep(0.05)
    assert file_server.requests[held] == 1
    process.send_signal(signal.SIGKILL)
    process.wait()

    assert not (tmp_path / "data.csv").exists()
    assert sorted(os.listdir(tmp_path / "images")) == ["1.jpg", "2.jpg", "3.jpg"]
    for name in os.listdir(tmp_path / "images"):
        Image.open(tmp_path / "images" / name).load()  # every saved image decodes

    file_server.hold.clear()
    data2csv.main(coco_args(tmp_path, url))
    for image_id in (1, 2, 3):
        assert file_server.requests[f"/train2014/COCO_train2014_{image_id:012d}.jpg"] == 1
    rows = read_csv(tmp_path / "data.csv")
    assert len(rows) == 5 and sorted(os.listdir(tmp_path / "images")) == ["1.jpg", "2.jpg", "3.jpg", "4.jpg"]


def test_imagefolder_captions_survive_the_csv_round_trip(tmp_path):
    awkward = {
        "comma": 'A man, a plan, a canal: "Panama"',
        "newline": "two lines\nof caption",
        "unicode": "Ein Café am Fluss – 河边的咖啡馆 🚲",
        "quote": "it's a 'quoted' \"caption\"",
    }
    folder = make_imagefolder(tmp_path / "folder", awkward)
    data2csv.main([f"--source={folder}", f"--image_dir={tmp_path}/images", f"--csv_path={tmp_path}/data.csv"])
    rows = read_csv(tmp_path / "data.csv")
    assert {row["image_id"]: row["caption"] for row in rows} == awkward


def test_imagefolder_with_metadata_csv_and_rgba_png(tmp_path):
    folder = tmp_path / "folder"
    folder.mkdir()
    Image.new("RGBA", (20, 20), (255, 0, 0, 128)).save(folder / "a.png")
    Image.new("P", (20, 20)).save(folder / "b.png")
    (folder / "metadata.csv").write_text("file_name,caption,image_id\na.png,first,10\nb.png,second,11\n")
    data2csv.main([f"--source={folder}", f"--image_dir={tmp_path}/images", f"--csv_path={tmp_path}/data.csv"])
    assert [(row["image_id"], row["caption"]) for row in read_csv(tmp_path / "data.csv")] == [("10", "first"),
                                                                                               ("11", "second")]
    for name in ("10.jpg", "11.jpg"):
        with Image.open(tmp_path / "images" / name) as image:
            assert (image.format, image.mode) == ("JPEG", "RGB")


class FakeMsDataset:
    """Stands in for what MsDataset.load returns: rows with image_id, caption and a decoded PIL image."""

    def __init__(self, rows, broken_from=None):
        self.rows, self.broken_from = rows, broken_from

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, index):
        if self.broken_from is not None and index >= self.broken_from:
            raise FileNotFoundError("/root/.cache/modelscope/hub/datasets/coco/2014/train2014")  # as upstream fails
        return self.rows[index]


def test_modelscope_source_reads_the_recipe_fields(tmp_path, monkeypatch):
    from modelscope.msdatasets import MsDataset

    rows = [{"image_id": "9", "caption": "a cat", "image": Image.new("L", (20, 20), 50)},
            {"image_id": "9", "caption": "the same cat", "image": Image.new("L", (20, 20), 50)},
            {"image_id": "10", "caption": "a dog", "image": Image.new("RGB", (20, 20), "red")}]
    calls = []
    monkeypatch.setattr(MsDataset, "load", lambda *args, **kwargs: calls.append((args, kwargs)) or FakeMsDataset(rows))
    data2csv.main([f"--image_dir={tmp_path}/images", f"--csv_path={tmp_path}/data.csv", "--max_data_number=2"])

    assert calls == [(("modelscope/coco_2014_caption",), {"subset_name": "coco_2014_caption", "split": "train"})]
    assert [(row["image_id"], row["caption"]) for row in read_csv(tmp_path / "data.csv")] == [("9", "a cat"),
                                                                                               ("9", "the same cat")]
    assert os.listdir(tmp_path / "images") == ["9.jpg"]


def test_modelscope_failure_names_other_sources(tmp_path, monkeypatch):
    from modelscope.msdatasets import MsDataset

    rows = [{"image_id": "9", "caption": "a cat", "image": Image.new("RGB", (20, 20))}] * 3
    monkeypatch.setattr(MsDataset, "load", lambda *args, **kwargs: FakeMsDataset(rows, broken_from=0))
    with pytest.raises(PipelineError, match=r"ModelScope failed: FileNotFoundError.*--source=coco"):
        data2csv.main([f"--image_dir={tmp_path}/images", f"--csv_path={tmp_path}/data.csv"])
    assert not (tmp_path / "data.csv").exists()


def test_hub_dataset_source_with_a_list_of_captions(tmp_path):
    import datasets

    table = datasets.Dataset.from_dict({
        "picture": [Image.new("RGB", (30, 20), "red"), Image.new("L", (30, 20), 100)],
        "sentences": [["a red one", "red thing"], ["gray"]],
        "image_id": [7, 8],
    }).cast_column("picture", datasets.Image())
    (tmp_path / "hub" / "data").mkdir(parents=True)
    table.to_parquet(str(tmp_path / "hub" / "data" / "train-00000-of-00001.parquet"))

    data2csv.main([f"--source=hf:{tmp_path}/hub", "--image_column=picture", "--caption_column=sentences",
                   f"--image_dir={tmp_path}/images", f"--csv_path={tmp_path}/data.csv"])
    assert [(row["image_id"], row["caption"]) for row in read_csv(tmp_path / "data.csv")] == [
        ("7", "a red one"), ("7", "red thing"), ("8", "gray")]

    with pytest.raises(PipelineError, match="no column caption; its columns are picture, sentences, image_id"):
        data2csv.main([f"--source=hf:{tmp_path}/hub", "--image_column=picture",
                       f"--image_dir={tmp_path}/images", f"--csv_path={tmp_path}/data2.csv"])


def test_unknown_source_is_a_clear_error_without_traceback(tmp_path):
    result = run("data2csv.py", "--source=nowhere", cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.startswith("error: unknown source 'nowhere'") and "Traceback" not in result.stderr
