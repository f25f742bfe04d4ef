"""Step 2: turn the CSV of image/caption pairs into the recipe's conversation JSON.

    python csv2json.py --csv_path=coco-2024-dataset.csv --json_path=data_vl.json

Each row becomes {"id": "identity_N", "conversations": [user: "COCO Yes: <|vision_start|>IMAGE<|vision_end|>",
assistant: CAPTION]}. Rows whose image file is missing or whose caption is empty are skipped and reported.
"""
import csv
import io
import json
import os

from captioning.data import report_skipped
from captioning.disk_full import stop_if_disk_full
from captioning.errors import PipelineError
from captioning.files import write_json
from captioning.locks import hold
from captioning.scripts import run_script
from captioning.settings import parse_settings

# ----------------------------------------------------------------------------- settings
csv_path = "coco-2024-dataset.csv"  # needs columns image_path and caption; relative paths are read from its folder
json_path = "data_vl.json"
prompt = "COCO Yes:"  # the text the user turn sends with each image
debug = False  # show the full traceback of a failure
# -----------------------------------------------------------------------------

REQUIRED_COLUMNS = ("image_path", "caption")


def read_rows(path):
    """The CSV's rows as dicts; a byte-order mark is fine, other encodings and missing columns are clear errors."""
    try:
        with open(path, "rb") as file:
            raw = file.read()
    except FileNotFoundError as error:
        raise PipelineError(f"CSV not found: {path}; run data2csv.py first or set --csv_path") from error
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = raw[: error.start].count(b"\n") + 1
        raise PipelineError(
            f"{path}, line {line}, is not UTF-8 text (byte {raw[error.start]:#04x}): save the CSV as UTF-8 "
            "(in Excel: \"CSV UTF-8\"; in LibreOffice: character set Unicode (UTF-8))"
        ) from error
    if not text.strip():
        raise PipelineError(f"{path} is empty: it needs a header with image_path and caption, and one row per caption")
    reader = csv.DictReader(io.StringIO(text, newline=""))
    rows = list(reader)
    missing = [column for column in REQUIRED_COLUMNS if column not in reader.fieldnames]
    if missing:
        raise PipelineError(f"{path} lacks the column(s) {', '.join(missing)}; it has {', '.join(reader.fieldnames)}")
    return rows


def conversation(number, image_path, caption, prompt_text):
    return {
        "id": f"identity_{number}",
        "conversations": [
            {"from": "user", "value": f"{prompt_text} <|vision_start|>{image_path}<|vision_end|>"},
            {"from": "assistant", "value": caption},
        ],
    }


def main(argv=()):
    cfg = parse_settings(globals(), argv)
    with hold(cfg.json_path):  # one run per JSON file at a time
        csv_folder = os.path.dirname(os.path.abspath(cfg.csv_path))
        conversations, skipped = [], []
        for line_number, row in enumerate(read_rows(cfg.csv_path), start=2):  # line 1 is the header
            image_path = os.path.join(csv_folder, row["image_path"] or "")
            caption = (row["caption"] or "").strip()
            if not caption:
                skipped.append(f"line {line_number}: empty caption")
            elif not os.path.isfile(image_path):
                skipped.append(f"line {line_number}: image not found: {image_path}")
            else:
                number = len(conversations) + 1
                conversations.append(conversation(number, os.path.normpath(image_path), caption, cfg.prompt))

        report_skipped(skipped, f"rows of {cfg.csv_path}")
        if not conversations:
            raise PipelineError(f"{cfg.csv_path} has no usable row (an existing image file and a non-empty caption)")
        with stop_if_disk_full(os.path.dirname(os.path.abspath(cfg.json_path)), cfg.json_path, setting="json_path",
                               needed=lambda: len(json.dumps(conversations, ensure_ascii=False, indent=2).encode()),
                               then="it writes the JSON again"):
            write_json(cfg.json_path, conversations)
        print(f"wrote {len(conversations)} conversations to {cfg.json_path}")


if __name__ == "__main__":
    run_script(main)
