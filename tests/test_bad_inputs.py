"""Bad inputs, interruptions and flaky networks, step by step: each does the right thing or stops with a message
that names the file, the row or the setting, and what to do, leaving no half-written output."""
import glob
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest
from PIL import Image, ImageStat

import csv2json
import data2csv
import infer
import train
from captioning.errors import PipelineError
from captioning.files import write_json
from conftest import (
    COCO_CAPTIONS, COCO_IMAGES, REPO, FakeMsDataset, coco_args, jpeg_bytes, read_csv, run,
    serve_coco,
)


def write_image(path, size=(10, 10)):
    Image.new("RGB", size).save(path)
    return str(path)


def image_url(image_id):
    return f"/train2014/COCO_train2014_{image_id:012d}.jpg"


# ----------------------------------------------------------------------------- data2csv

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
    deadline = time.time() + 60  # the images are fetched at once: wait for the others to be saved
    while (file_server.requests[held] == 0 or len(glob.glob(f"{tmp_path}/images/*.jpg")) < 3) and time.time() < deadline:
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
    rows = [(row["image_id"], row["caption"]) for row in read_csv(tmp_path / "data.csv")]
    assert rows == [(str(image_id), caption) for image_id, caption in COCO_CAPTIONS[:5]]  # complete, no duplicates
    assert sorted(os.listdir(tmp_path / "images")) == ["1.jpg", "2.jpg", "3.jpg", "4.jpg"]


def test_modelscope_failure_names_other_sources(tmp_path, monkeypatch):
    from modelscope.msdatasets import MsDataset

    rows = [{"image_id": "9", "caption": "a cat", "image": Image.new("RGB", (20, 20))}] * 3
    monkeypatch.setattr(MsDataset, "load", lambda *args, **kwargs: FakeMsDataset(rows, broken_from=0))
    with pytest.raises(PipelineError, match=r"ModelScope failed: FileNotFoundError.*This is the known upstream "
                                            r"breakage.*--source=coco"):
        data2csv.main(["--source=modelscope", f"--image_dir={tmp_path}/images", f"--csv_path={tmp_path}/data.csv"])
    assert not (tmp_path / "data.csv").exists()


def test_unknown_source_is_a_clear_error_without_traceback(tmp_path):
    result = run("data2csv.py", "--source=nowhere", cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.startswith("error: unknown source 'nowhere'") and "Traceback" not in result.stderr


def test_coco_gives_up_after_retries_with_the_reason(tmp_path, file_server):
    url = serve_coco(file_server, {i: COCO_IMAGES[i] for i in (1, 4)}, [(1, "one"), (4, "four")])
    file_server.failures[image_url(4)] = [502, 503, 500]
    data2csv.main(coco_args(tmp_path, url, "--retries=1"))
    assert file_server.requests[image_url(4)] == 2
    assert [row["image_id"] for row in read_csv(tmp_path / "data.csv")] == ["1"]
    assert not (tmp_path / "images" / "4.jpg").exists()


def test_unreachable_image_host_is_a_clear_error_and_saved_images_stay(tmp_path, file_server, capsys):
    with socket.socket() as probe:  # a port on 127.0.0.1 that nothing listens on
        probe.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{probe.getsockname()[1]}"
    annotations = {"images": [{"id": 1, "coco_url": f"{file_server.url}{image_url(1)}"},
                              {"id": 2, "coco_url": f"{dead}{image_url(2)}"}],
                   "annotations": [{"image_id": 1, "caption": "one"}, {"image_id": 2, "caption": "two"}]}
    (tmp_path / "captions.json").write_text(json.dumps(annotations))
    file_server.files[image_url(1)] = COCO_IMAGES[1]
    args = coco_args(tmp_path, str(tmp_path / "captions.json"), "--retries=1")
    data2csv.main(args)
    output = capsys.readouterr().out
    assert f"skipped 1 images: 2: {dead}{image_url(2)} failed 2 times, last with [Errno 111] Connection refused" \
        in output and "run again to retry them" in output
    Image.open(tmp_path / "images" / "1.jpg").load()

    annotations["images"][0]["coco_url"] = f"{dead}{image_url(1)}"
    (tmp_path / "captions.json").write_text(json.dumps(annotations))
    os.remove(tmp_path / "images" / "1.jpg")
    with pytest.raises(PipelineError, match=r"no image/caption pair could be saved from coco: 1: http.*refused"):
        data2csv.main(args)
    assert [row["image_id"] for row in read_csv(tmp_path / "data.csv")] == ["1"]  # the earlier CSV is untouched


def test_truncated_image_is_skipped_and_not_saved(tmp_path, file_server, capsys):
    url = serve_coco(file_server, {1: COCO_IMAGES[1][:len(COCO_IMAGES[1]) // 2], 4: COCO_IMAGES[4]},
                     [(1, "cut"), (4, "whole")])
    data2csv.main(coco_args(tmp_path, url))
    assert "skipped 1 images: 1: the image does not decode (Truncated File Read): a corrupt or incomplete file" in capsys.readouterr().out
    assert os.listdir(tmp_path / "images") == ["4.jpg"]
    assert [row["image_id"] for row in read_csv(tmp_path / "data.csv")] == ["4"]


def png_bytes(image):
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_every_kind_of_image_is_saved_as_a_valid_rgb_jpeg(tmp_path):
    import numpy

    sixteen_bit = Image.fromarray((numpy.arange(64 * 64).reshape(64, 64) * 16).astype(numpy.uint16))
    sources = {
        "gray": Image.new("L", (30, 20), 90),
        "cmyk": Image.open(io.BytesIO(jpeg_bytes("CMYK", (0, 255, 255, 0)))),
        "rgba": Image.new("RGBA", (30, 20), (255, 0, 0, 0)),  # fully transparent: shown on white
        "palette": Image.new("RGB", (30, 20), "green").convert("P"),
        "sixteen_bit": Image.open(io.BytesIO(png_bytes(sixteen_bit))),
        "one_pixel": Image.new("RGB", (1, 1), "blue"),
        "huge": Image.new("RGB", (6000, 4000), "white"),
    }
    assert sources["sixteen_bit"].mode == "I;16"
    folder = tmp_path / "folder"
    folder.mkdir()
    for name, image in sources.items():
        image.save(folder / f"{name}.{'jpg' if name == 'cmyk' else 'png'}")
    (folder / "metadata.jsonl").write_text("".join(
        json.dumps({"file_name": f"{name}.{'jpg' if name == 'cmyk' else 'png'}", "caption": name}) + "\n"
        for name in sources))
    data2csv.main([f"--source={folder}", f"--image_dir={tmp_path}/images", f"--csv_path={tmp_path}/data.csv"])

    saved = {}
    for name in sources:
        with Image.open(tmp_path / "images" / f"{name}.jpg") as image:
            image.load()
            assert (image.format, image.mode) == ("JPEG", "RGB"), name
            saved[name] = image.copy()
    assert saved["huge"].size == (2048, 1365)  # max_image_side=2048
    assert saved["one_pixel"].size == (1, 1)
    assert ImageStat.Stat(saved["rgba"]).mean == pytest.approx([255, 255, 255], abs=2)
    assert ImageStat.Stat(saved["sixteen_bit"]).mean[0] == pytest.approx(127.5, abs=3)  # scaled, not clipped to 255


def test_duplicate_image_ids_save_one_image_and_keep_every_caption(tmp_path, file_server):
    url = serve_coco(file_server, {7: COCO_IMAGES[1]}, [(7, "first"), (7, "second"), (7, "third")])
    data2csv.main(coco_args(tmp_path, url))
    assert [row["caption"] for row in read_csv(tmp_path / "data.csv")] == ["first", "second", "third"]
    assert os.listdir(tmp_path / "images") == ["7.jpg"] and file_server.requests[image_url(7)] == 1


def test_empty_and_whitespace_captions_are_skipped_and_counted(tmp_path, file_server, capsys):
    url = serve_coco(file_server, {1: COCO_IMAGES[1]}, [(1, ""), (1, "  \n "), (1, "kept")])
    data2csv.main(coco_args(tmp_path, url))
    assert "skipped 2 rows with an empty caption" in capsys.readouterr().out
    assert [row["caption"] for row in read_csv(tmp_path / "data.csv")] == ["kept"]


# ----------------------------------------------------------------------------- csv2json

def test_csv_rows_with_missing_images_or_empty_captions_are_skipped_and_named_images_and_empty_captions_and_names_them(tmp_path, capsys):
    write_image(tmp_path / "a.jpg")
    (tmp_path / "data.csv").write_text(
        "\ufeffimage_path,caption\na.jpg,kept\ngone.jpg,no image\na.jpg,   \n", encoding="utf-8"
    )
    csv2json.main([f"--csv_path={tmp_path}/data.csv", f"--json_path={tmp_path}/data.json"])

    output = capsys.readouterr().out
    assert "skipped 2 rows" in output
    assert f"line 3: image not found: {tmp_path}/gone.jpg" in output and "line 4: empty caption" in output
    conversations = json.loads((tmp_path / "data.json").read_text())
    assert [c["conversations"][1]["value"] for c in conversations] == ["kept"]


def test_csv_without_usable_rows_or_columns_fails_clearly(tmp_path):
    (tmp_path / "data.csv").write_text("image_path,caption\ngone.jpg,no image\n")
    with pytest.raises(PipelineError, match="has no usable row"):
        csv2json.main([f"--csv_path={tmp_path}/data.csv", f"--json_path={tmp_path}/data.json"])
    assert not (tmp_path / "data.json").exists()

    (tmp_path / "bad.csv").write_text("path,text\nx.jpg,y\n")
    with pytest.raises(PipelineError, match="lacks the column.s. image_path, caption; it has path, text"):
        csv2json.main([f"--csv_path={tmp_path}/bad.csv", f"--json_path={tmp_path}/data.json"])


def test_csv_extra_columns_are_ignored_and_relative_paths_resolved_against_its_folder(tmp_path, monkeypatch):
    (tmp_path / "data" / "images").mkdir(parents=True)
    write_image(tmp_path / "data" / "images" / "a.jpg")
    (tmp_path / "data" / "data.csv").write_text("notes,caption,image_path,width\nhi,a cat,images/a.jpg,10\n")
    monkeypatch.chdir(tmp_path)  # run from elsewhere than the CSV's folder
    csv2json.main(["--csv_path=data/data.csv", "--json_path=out.json"])
    [entry] = json.loads((tmp_path / "out.json").read_text())
    assert entry["conversations"][0]["value"] == f"COCO Yes: <|vision_start|>{tmp_path}/data/images/a.jpg<|vision_end|>"
    assert set(entry) == {"id", "conversations"}


def test_csv_in_another_encoding_names_the_line_and_the_fix(tmp_path):
    write_image(tmp_path / "a.jpg")
    (tmp_path / "data.csv").write_bytes("image_path,caption\na.jpg,fine\na.jpg,un caf\xe9\n".encode("latin-1"))
    with pytest.raises(PipelineError, match=r"data.csv, line 3, is not UTF-8 text \(byte 0xe9\): save the CSV as UTF-8"):
        csv2json.main([f"--csv_path={tmp_path}/data.csv", f"--json_path={tmp_path}/data.json"])


def test_empty_csv_fails_clearly(tmp_path):
    (tmp_path / "data.csv").write_text("")
    with pytest.raises(PipelineError, match="data.csv is empty: it needs a header with image_path and caption"):
        csv2json.main([f"--csv_path={tmp_path}/data.csv", f"--json_path={tmp_path}/data.json"])


def test_image_paths_are_data_never_shell(tmp_path):
    odd = write_image(tmp_path / "a; $(touch pwned) `touch pwned2`.jpg")
    (tmp_path / "data.csv").write_text(f'image_path,caption\n"{odd}",odd name\n')
    csv2json.main([f"--csv_path={tmp_path}/data.csv", f"--json_path={tmp_path}/data.json"])
    [sample] = train.read_conversations(str(tmp_path / "data.json"))
    assert sample["image_path"] == odd
    assert not (tmp_path / "pwned").exists() and not os.path.exists("pwned") and not os.path.exists("pwned2")


# ----------------------------------------------------------------------------- train.py

def test_a_bad_setting_fails_before_any_model_is_loaded(tmp_path):
    result = run("train.py", "--learning_rate=abc", "--model=does/not-exist", cwd=tmp_path, timeout=120)
    assert result.returncode == 1
    assert result.stderr.strip() == "error: --learning_rate=abc: expected a float like the default 0.0001"



def conversation(image, caption="a cat", user_role="user"):
    return {"id": "x", "conversations": [{"from": user_role, "value": f"COCO Yes: <|vision_start|>{image}<|vision_end|>"},
                                        {"from": "assistant", "value": caption}]}


@pytest.mark.parametrize("content, message", [
    ('[{"id": "identity_1", "conversations": [}]', r"data.json is not valid JSON: Expecting value: line 1 column 41"),
    ('{"conversations": []}', r"data.json holds a dict, not the recipe's list of conversations"),
    ('[{"id": "identity_1"}]', r"entry 0 \(id identity_1\): it does not have two turns, each with 'from' and 'value'"),
    (json.dumps([conversation("a.jpg"), conversation("b.jpg", user_role="human")]),
     r"entry 1 \(id x\): its turns are from 'human' and 'assistant', not 'user' and 'assistant'"),
    ('[{"conversations": [{"from": "user", "value": "hi"}, {"from": "assistant", "value": "c"}]}]',
     r"entry 0 \(id None\): the user turn has no <\|vision_start\|>IMAGE<\|vision_end\|>"),
])
def test_malformed_conversation_json_is_named_before_the_model_loads(tmp_path, content, message):
    (tmp_path / "data.json").write_text(content)
    with pytest.raises(PipelineError, match=message):
        train.main([f"--json_path={tmp_path}/data.json", "--model=not-downloaded/Qwen2-VL-2B-Instruct", f"--output_dir={tmp_path}/out"])


def test_fewer_images_than_test_size_fails_clearly(tmp_path):
    write_json(tmp_path / "data.json", [conversation(f"{n}.jpg") for n in range(3)])
    with pytest.raises(PipelineError, match=r"the data has 3 distinct images, but test_size=4 .* lower --test_size"):
        train.main([f"--json_path={tmp_path}/data.json", "--model=not-downloaded/Qwen2-VL-2B-Instruct", f"--output_dir={tmp_path}/out"])


def test_missing_images_and_overlong_captions_are_skipped_and_a_finished_run_is_kept(tmp_path, tiny_model):
    images = [write_image(tmp_path / f"{n}.jpg", (56, 56)) for n in range(4)]
    write_json(tmp_path / "data.json", [conversation(images[0]), conversation(str(tmp_path / "gone.jpg")),
                                        conversation(images[1], "long " * 300), conversation(images[2]),
                                        conversation(images[3])])
    args = [f"--model={tiny_model}", f"--json_path={tmp_path}/data.json", f"--output_dir={tmp_path}/out",
            "--test_size=1", "--image_size=56", "--max_length=200", "--max_steps=1", "--swanlab_mode=disabled"]
    result = run("train.py", *args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "skipped 2 training samples:" in result.stdout
    assert f"image not found: {tmp_path}/gone.jpg" in result.stdout
    assert f"tokens > max_length=200: {images[1]}" in result.stdout
    adapter = (tmp_path / "out" / "adapter_model.safetensors").read_bytes()

    again = run("train.py", *args, cwd=tmp_path)
    assert again.returncode == 1
    # the message is the last line, after whatever the libraries log (bitsandbytes, on CPUs with AVX512-BF16)
    assert again.stderr.strip().splitlines()[-1] == (
        f"error: {tmp_path}/out already holds a finished training run. To keep it, choose another --output_dir; to "
        "train again and replace it, add --resume=never")
    assert (tmp_path / "out" / "adapter_model.safetensors").read_bytes() == adapter


# ----------------------------------------------------------------------------- infer.py

def test_checkpoint_missing_or_without_safetensors_adapter_is_named(tmp_path):
    with pytest.raises(PipelineError, match=f"checkpoint folder not found: {tmp_path}/nope"):
        infer.main([f"--checkpoint={tmp_path}/nope"])
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "adapter_config.json").write_text("{}")
    (tmp_path / "old" / "adapter_model.bin").write_bytes(b"pickle")
    with pytest.raises(PipelineError, match=f"{tmp_path}/old has no adapter_model.safetensors"):
        infer.main([f"--checkpoint={tmp_path}/old"])
    with pytest.raises(PipelineError, match=f"no trained adapter in {tmp_path}: run train.py first"):
        infer.main([f"--output_dir={tmp_path}"])


def test_an_empty_image_list_is_refused(tmp_path):
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (tmp_path / name).write_text("{}")
    (tmp_path / "run_config.json").write_text('{"image_size": 56, "prompt": "COCO Yes:", "model": "x"}')
    with pytest.raises(PipelineError, match="no image to caption: set --images to image files, folders, globs or text files of paths"):
        infer.main([f"--checkpoint={tmp_path}", "--images=,"])
    with pytest.raises(PipelineError, match="none of the 1 images could be read"):
        infer.main([f"--checkpoint={tmp_path}", f"--images={tmp_path}/missing.jpg"])


# ----------------------------------------------------------------------------- every step

def test_an_interrupted_write_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    target = tmp_path / "data.json"
    write_json(target, ["old"])

    def interrupted(data, file, **kwargs):
        file.write('["new", "half')
        raise KeyboardInterrupt

    monkeypatch.setattr(json, "dump", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_json(target, ["new"])
    assert json.loads(target.read_text()) == ["old"] and os.listdir(tmp_path) == ["data.json"]


def test_unexpected_failures_are_one_paragraph_and_debug_shows_the_traceback(tmp_path):
    write_image(tmp_path / "a.jpg")
    (tmp_path / "data.csv").write_text("image_path,caption\na.jpg,a cat\n")
    (tmp_path / "data.json").mkdir()  # the output path is a folder: the final rename fails
    result = run("csv2json.py", "--csv_path=data.csv", "--json_path=data.json", cwd=tmp_path)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.startswith("error: unexpected IsADirectoryError: ")
    assert "run again with --debug=true" in result.stderr
    assert not (tmp_path / "data.json.part").exists()

    result = run("csv2json.py", "--csv_path=data.csv", "--json_path=data.json", "--debug=true", cwd=tmp_path)
    assert result.returncode == 1 and "Traceback (most recent call last)" in result.stderr


def test_no_script_trusts_remote_code():
    for script in glob.glob(os.path.join(REPO, "*.py")) + glob.glob(os.path.join(REPO, "captioning", "*.py")):
        with open(script) as file:
            assert "trust_remote_code" not in file.read(), script


def test_readme_troubleshooting_quotes_what_the_scripts_say():
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as file:
        readme = file.read()
    section = readme.split("## When something fails")[1].split("\n## ")[0]
    quoted = [fragment for line in section.splitlines() if line.startswith("| ") and not line.startswith("| step")
              for fragment in re.findall(r"`([^`]+)`", line.split(" | ")[1])]
    assert len(quoted) >= 8
    source = ""
    for script in glob.glob(os.path.join(REPO, "*.py")) + glob.glob(os.path.join(REPO, "captioning", "*.py")):
        with open(script, encoding="utf-8") as file:
            source += re.sub(r'"\s*\n\s*f?"', "", file.read())  # join string literals split over lines
    for fragment in quoted:
        for piece in filter(None, (part.strip() for part in fragment.split("…"))):
            assert piece.replace('"', '\\"') in source or piece in source, f"README quotes {fragment!r}; not in the code"


def test_debug_shows_where_a_reported_failure_started(tmp_path):
    result = run("csv2json.py", "--csv_path=missing.csv", cwd=tmp_path)
    assert result.stderr.startswith("error: CSV not found: missing.csv") and "Traceback" not in result.stderr
    result = run("csv2json.py", "--csv_path=missing.csv", "--debug=true", cwd=tmp_path)
    assert "FileNotFoundError: [Errno 2] No such file or directory: 'missing.csv'" in result.stderr
    assert "The above exception was the direct cause of the following exception" in result.stderr
