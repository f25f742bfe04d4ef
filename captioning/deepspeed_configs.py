"""The deepspeed setting: the ZeRO config files shipped in deepspeed/, or the user's own, and which stage it runs."""
import importlib.util
import json
import os

from captioning.errors import PipelineError

DEEPSPEED_CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "deepspeed")  # beside train.py


def resolve_deepspeed(choice):
    """The DeepSpeed config file for the deepspeed setting, or None."""
    if not choice:
        return None
    shipped = os.path.join(DEEPSPEED_CONFIGS, f"{choice}.json")
    path = shipped if choice in ("zero2", "zero3") else choice
    if not os.path.isfile(path):
        raise PipelineError(f"--deepspeed={choice}: use zero2, zero3 or the path of a DeepSpeed JSON config")
    if importlib.util.find_spec("deepspeed") is None:
        raise PipelineError(f"--deepspeed={choice} needs DeepSpeed, which is not installed: pip install deepspeed")
    return path


def is_zero3(deepspeed_config):
    if not deepspeed_config:
        return False
    with open(deepspeed_config, encoding="utf-8") as file:
        return json.load(file).get("zero_optimization", {}).get("stage") == 3


ZERO3_SPLITS_THE_VISION_TOWER = "DeepSpeed ZeRO-3 splits the vision tower across GPUs"
