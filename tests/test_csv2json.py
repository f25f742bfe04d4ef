"""csv2json.py: the recipe's exact JSON format, and rows that cannot be used skipped and named."""
import json

from PIL import Image

import csv2json


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
