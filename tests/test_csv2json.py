"""csv2json.py: the recipe's exact JSON format, and rows that cannot be used skipped and named."""
import json

import pytest
from PIL import Image

import csv2json
from captioning import PipelineError


def write_image(path):
    Image.new("RGB", (10, 10)).save(path)
    return str(path)


def test_writes_the_recipe_format_resolving_relative_paths(tmp_path):
    write_image(tmp_path / "a.jpg")
    absolute = write_image(tmp_path / "b.jpg")
    (tmp_path / "data.csv").write_text(
        f'image_path,caption,image_id\na.jpg,"A cat, on a mat.",1\n{absolute},Ein Hund 🐕,2\n', encoding="utf-8"
    )
    csv2json.main([f"--csv_path={tmp_path}/data.csv", f"--json_path={tmp_path}/data.json"])

    assert json.loads((tmp_path / "data.json").read_text(encoding="utf-8")) == [
        {"id": "identity_1", "conversations": [
            {"from": "user", "value": f"COCO Yes: <|vision_start|>{tmp_path}/a.jpg<|vision_end|>"},
            {"from": "assistant", "value": "A cat, on a mat."}]},
        {"id": "identity_2", "conversations": [
            {"from": "user", "value": f"COCO Yes: <|vision_start|>{absolute}<|vision_end|>"},
            {"from": "assistant", "value": "Ein Hund 🐕"}]},
    ]


def test_skips_missing_images_and_empty_captions_and_names_them(tmp_path, capsys):
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


def test_fails_clearly_when_no_row_remains_or_columns_are_missing(tmp_path):
    (tmp_path / "data.csv").write_text("image_path,caption\ngone.jpg,no image\n")
    with pytest.raises(PipelineError, match="has no usable row"):
        csv2json.main([f"--csv_path={tmp_path}/data.csv", f"--json_path={tmp_path}/data.json"])
    assert not (tmp_path / "data.json").exists()

    (tmp_path / "bad.csv").write_text("path,text\nx.jpg,y\n")
    with pytest.raises(PipelineError, match="lacks the column.s. image_path, caption; it has path, text"):
        csv2json.main([f"--csv_path={tmp_path}/bad.csv", f"--json_path={tmp_path}/data.json"])
