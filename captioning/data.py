"""The recipe's conversation JSON read as samples, and the rows skipped on the way named."""

import json
import re

from captioning.errors import PipelineError


def report_skipped(skipped, what):
    """Name the first five things skipped, and count the rest."""
    if skipped:
        print(f"skipped {len(skipped)} {what}:", *skipped[:5], sep="\n  ")
        if len(skipped) > 5:
            print(f"  ... and {len(skipped) - 5} more")


VISION_TAG = re.compile(r"<\|vision_start\|>(.*?)<\|vision_end\|>")


def read_conversations(path):
    """The recipe's JSON as samples with image_path, prompt (the user text around the image) and caption."""
    try:
        with open(path, encoding="utf-8") as file:
            entries = json.load(file)
    except FileNotFoundError as error:
        raise PipelineError(f"{path} not found: run csv2json.py first or set --json_path") from error
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise PipelineError(f"{path} is not valid JSON: {error}; rebuild it with csv2json.py") from error
    if not isinstance(entries, list):
        raise PipelineError(f"{path} holds a {type(entries).__name__}, not the recipe's list of conversations")
    return [conversation_sample(path, number, entry) for number, entry in enumerate(entries)]


def references_by_image(path):
    """{image path: all its captions} of a conversation JSON, images in the order of their first caption."""
    references = {}
    for sample in read_conversations(path):
        references.setdefault(sample["image_path"], []).append(sample["caption"])
    return references


def conversation_sample(path, number, entry):
    problem = None
    try:
        user, assistant = entry["conversations"]
        roles = (user["from"], assistant["from"])
        image = VISION_TAG.search(user["value"])
        if roles != ("user", "assistant"):
            problem = f"its turns are from {roles[0]!r} and {roles[1]!r}, not 'user' and 'assistant'"
        elif not image:
            problem = "the user turn has no <|vision_start|>IMAGE<|vision_end|>"
        elif not isinstance(assistant["value"], str) or not assistant["value"].strip():
            problem = "the assistant turn has no caption"
    except (KeyError, TypeError, ValueError):
        problem = "it does not have two turns, each with 'from' and 'value'"
    if problem:
        entry_id = entry.get("id") if isinstance(entry, dict) else None
        raise PipelineError(
            f"{path}, entry {number} (id {entry_id}): {problem}. Each entry must look like "
            '{"conversations": [{"from": "user", "value": "PROMPT <|vision_start|>IMAGE<|vision_end|>"}, '
            '{"from": "assistant", "value": "CAPTION"}]}; rebuild the file with csv2json.py'
        )
    return {"image_path": image.group(1), "prompt": VISION_TAG.sub("", user["value"]).strip(),
            "caption": assistant["value"], "entry": entry}
