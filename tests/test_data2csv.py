"""data2csv.py: every source, RGB JPEG output, resume after a kill, and captions that survive the CSV."""
import os
import subprocess
import sys
import time

import pytest
from PIL import Image

import data2csv
from captioning.errors import PipelineError
from conftest import (REPO, COCO_CAPTIONS, COCO_IMAGES, FakeMsDataset, coco_args, jpeg_bytes, make_imagefolder, read_csv,
                      run, serve_coco)


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

    data2csv.main([f"--image_dir={tmp_path}/images", f"--csv_path={tmp_path}/data.csv", "--max_data_number=1",
                   "--all_captions=true"])  # one whole image: both of its captions
    assert [(row["image_id"], row["caption"]) for row in read_csv(tmp_path / "data.csv")] == [("9", "a cat"),
                                                                                               ("9", "the same cat")]


def dataset_scripts_refused(*args, **kwargs):  # what datasets >= 4 answers for this dataset (modelscope issue 1769)
    raise RuntimeError("Dataset scripts are no longer supported, but found coco_2014_caption.py")


@pytest.mark.parametrize("load", [lambda *args, **kwargs: FakeMsDataset([{"image_id": "9"}], broken_from=0),
                                  dataset_scripts_refused], ids=["images missing", "dataset scripts refused"])
def test_auto_source_takes_the_coco_files_when_modelscope_fails_as_upstream(tmp_path, file_server, monkeypatch,
                                                                            capsys, load):
    from modelscope.msdatasets import MsDataset

    monkeypatch.setattr(MsDataset, "load", load)
    url = serve_coco(file_server, COCO_IMAGES, COCO_CAPTIONS)
    data2csv.main(["--source=auto", *coco_args(tmp_path, url)[1:]])

    said = capsys.readouterr().out
    assert "source=auto: the recipe's ModelScope dataset failed (" in said
    assert "This is the known upstream breakage of this dataset (modelscope issues 1252 and 1769)" in said
    assert "using the official COCO 2014 files instead. Choose a source with --source=modelscope, coco" in said
    assert [(row["image_id"], row["caption"]) for row in read_csv(tmp_path / "data.csv")] == [
        (str(image_id), caption) for image_id, caption in COCO_CAPTIONS[:5]]


def test_auto_source_keeps_a_working_modelscope_dataset(tmp_path, file_server, monkeypatch, capsys):
    from modelscope.msdatasets import MsDataset

    rows = [{"image_id": "9", "caption": "a cat", "image": Image.new("RGB", (20, 20), "red")}]
    monkeypatch.setattr(MsDataset, "load", lambda *args, **kwargs: FakeMsDataset(rows))
    url = serve_coco(file_server, COCO_IMAGES, COCO_CAPTIONS)
    data2csv.main(coco_args(tmp_path, url)[1:])  # the default source

    assert "source=auto" not in capsys.readouterr().out
    assert [(row["image_id"], row["caption"]) for row in read_csv(tmp_path / "data.csv")] == [("9", "a cat")]
    assert file_server.requests["/annotations/annotations_trainval2014.zip"] == 0


def test_the_real_modelscope_load_asks_the_hub_despite_the_image_folder(tmp_path, monkeypatch):
    """MsDataset.load takes a folder named like the dataset in the working directory for a local copy; data2csv's
    own image folder, coco_2014_caption/, is one on every run after the first. Here the hub is a closed port."""
    import socket

    with socket.socket() as closed:  # a port nothing listens on: connections to it are refused at once
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    monkeypatch.setenv("MODELSCOPE_ENDPOINT", f"http://127.0.0.1:{port}")
    (tmp_path / "coco_2014_caption").mkdir()
    (tmp_path / "coco_2014_caption" / "9.jpg").write_bytes(COCO_IMAGES[1])  # an earlier run's image
    result = run("data2csv.py", "--source=modelscope", cwd=tmp_path)
    assert result.returncode == 1
    assert f"127.0.0.1', port={port}" in result.stderr and "ModelScope could not be reached: check" in result.stderr
    assert "EmptyDatasetError" not in result.stderr and "doesn't contain any data files" not in result.stderr
    assert "known upstream breakage" not in result.stderr


def test_hub_dataset_source_with_a_list_of_captions(tmp_path):
    import datasets
    import torchvision  # noqa: F401  as after a Qwen-VL processor loads: datasets' formatters then look into it

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




def test_hub_dataset_whose_image_column_holds_urls_is_fetched(tmp_path, file_server):
    import datasets

    file_server.files.update({"/a.jpg": COCO_IMAGES[1], "/b.jpg": COCO_IMAGES[2]})
    file_server.failures["/b.jpg"] = [503]
    (tmp_path / "hub" / "data").mkdir(parents=True)
    datasets.Dataset.from_dict({"url": [f"{file_server.url}/a.jpg", f"{file_server.url}/b.jpg"],
                                "caption": ["red", "gray"]}).to_parquet(
        str(tmp_path / "hub" / "data" / "train-00000-of-00001.parquet"))
    data2csv.main([f"--source=hf:{tmp_path}/hub", "--image_column=url", f"--image_dir={tmp_path}/images",
                   f"--csv_path={tmp_path}/data.csv"])
    assert [row["caption"] for row in read_csv(tmp_path / "data.csv")] == ["red", "gray"]
    assert (tmp_path / "images" / "0.jpg").read_bytes() == COCO_IMAGES[1] and file_server.requests["/b.jpg"] == 2


def test_all_captions_takes_whole_images_for_evaluation_sets(tmp_path, file_server):
    captions = [(1, "one a"), (2, "two a"), (1, "one b"), (3, "three a"), (2, "two b"), (1, "one c")]
    url = serve_coco(file_server, {i: COCO_IMAGES[i] for i in (1, 2, 3)}, captions, split="val")
    data2csv.main(coco_args(tmp_path, url, "--split=val", "--all_captions=true", "--max_data_number=2"))
    assert [(row["image_id"], row["caption"]) for row in read_csv(tmp_path / "data.csv")] == [
        ("1", "one a"), ("1", "one b"), ("1", "one c"), ("2", "two a"), ("2", "two b")]
    assert file_server.requests["/val2014/COCO_val2014_000000000003.jpg"] == 0


def many_coco_images(file_server, count):
    """count distinct RGB and grayscale JPEGs, two captions each, served COCO-style."""
    images = {number: jpeg_bytes("L", number * 5 % 256) if number % 3 == 0 else
              jpeg_bytes("RGB", (number * 7 % 256, number * 13 % 256, 90)) for number in range(1, count + 1)}
    captions = [(number, f"image {number}, caption {which}") for number in images for which in (1, 2)]
    return serve_coco(file_server, images, captions)


def test_concurrent_fetch_writes_what_one_connection_writes(tmp_path, file_server):
    url = many_coco_images(file_server, 40)
    data2csv.main(coco_args(tmp_path / "one", url, "--workers=1", "--max_data_number=-1"))
    data2csv.main(coco_args(tmp_path / "many", url, "--workers=8", "--max_data_number=-1"))
    one, many = (read_csv(tmp_path / run / "data.csv") for run in ("one", "many"))
    assert len(one) == 80 and [(row["image_id"], row["caption"]) for row in one] == \
        [(row["image_id"], row["caption"]) for row in many]  # every row, in source order
    assert sorted(os.listdir(tmp_path / "one" / "images")) == sorted(os.listdir(tmp_path / "many" / "images"))
    for name in os.listdir(tmp_path / "one" / "images"):
        assert (tmp_path / "one" / "images" / name).read_bytes() == (tmp_path / "many" / "images" / name).read_bytes()
    assert max(count for path, count in file_server.requests.items() if path.endswith(".jpg")) == 2  # once a run


def test_fetches_run_workers_at_a_time(tmp_path, file_server):
    url = many_coco_images(file_server, 12)
    images = [path for path in file_server.files if path.endswith(".jpg")]
    file_server.hold.update(images)  # every image download waits until released
    process = subprocess.Popen([sys.executable, os.path.join(REPO, "data2csv.py"),
                                *coco_args(tmp_path, url, "--workers=4", "--max_data_number=-1")],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while sum(file_server.requests[path] for path in images) < 4 and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(1)  # time enough for a fifth connection, were one allowed
    assert sum(file_server.requests[path] for path in images) == 4
    file_server.release.set()
    assert process.wait(timeout=60) == 0 and len(os.listdir(tmp_path / "images")) == 12


def test_a_busy_host_is_retried_after_the_wait_it_asks_for(tmp_path, file_server):
    url = serve_coco(file_server, COCO_IMAGES, COCO_CAPTIONS)
    busy = "/train2014/COCO_train2014_000000000002.jpg"
    file_server.failures[busy] = [(429, {"Retry-After": "2"}), 503]
    start = time.perf_counter()
    data2csv.main(coco_args(tmp_path, url))
    assert file_server.requests[busy] == 3 and time.perf_counter() - start >= 2 + 2  # Retry-After, then 2 s (2nd try)
    assert len(read_csv(tmp_path / "data.csv")) == 5
