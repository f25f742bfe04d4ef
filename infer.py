"""Step 4: caption images with the trained LoRA adapter.

    python infer.py                                    # the held-out test images, newest adapter in output_dir
    python infer.py --images="photos/*.jpg,cat.png" --checkpoint=output/Qwen2-VL-2B/checkpoint-100

Uses the prompt, image size and base model that training saved in run_config.json, generates greedily in
batches, prints each caption and writes one JSON record per image (image_path, caption) to output_path.
"""
import glob
import json
import os
import re

from captioning import (
    RUN_CONFIG,
    PipelineError,
    atomic_write,
    generate_captions,
    load_images,
    load_model_and_processor,
    parse_settings,
    read_conversations,
    run_script,
)

# ----------------------------------------------------------------------------- settings
model = ""  # base model; empty: the one training used (run_config.json)
output_dir = "output/Qwen2-VL-2B"  # where train.py saved its adapters
checkpoint = ""  # adapter folder; empty: the newest trained adapter under output_dir
images = ""  # comma-separated image paths or globs; empty: the held-out test images of training
batch_size = 8
max_new_tokens = 128
output_path = "predictions.jsonl"
debug = False  # show the full traceback of a failure
# -----------------------------------------------------------------------------

ADAPTER_FILE = "adapter_config.json"


def newest_checkpoint(output_dir):
    """The most recently saved adapter under output_dir: the final one or a checkpoint-N, whichever is newer."""
    candidates = [output_dir] + glob.glob(os.path.join(output_dir, "checkpoint-*"))
    adapters = [folder for folder in candidates if os.path.isfile(os.path.join(folder, ADAPTER_FILE))]
    if not adapters:
        raise PipelineError(f"no trained adapter in {output_dir}: run train.py first, or set --checkpoint or --output_dir")

    def saved_when(folder):
        step = re.search(r"checkpoint-(\d+)$", folder)
        return os.path.getmtime(os.path.join(folder, ADAPTER_FILE)), int(step.group(1)) if step else float("inf")

    return max(adapters, key=saved_when)


def read_run_config(checkpoint_dir):
    """The settings training used, saved in the adapter's folder or (for checkpoint-N) its parent."""
    for folder in (checkpoint_dir, os.path.dirname(os.path.normpath(checkpoint_dir))):
        path = os.path.join(folder, RUN_CONFIG)
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as file:
                return json.load(file)
    raise PipelineError(
        f"no {RUN_CONFIG} in {checkpoint_dir} or its parent folder: infer.py needs it to use training's prompt "
        "and image size; point --checkpoint at an adapter saved by train.py"
    )


def expand_images(spec):
    """Comma-separated paths and globs; a path that does not exist is kept so it is reported by name."""
    paths = []
    for part in filter(None, (part.strip() for part in spec.split(","))):
        matches = sorted(glob.glob(part)) if glob.has_magic(part) else [part]
        if not matches:
            print(f"warning: no file matches {part}")
        paths += matches
    return paths


def main(argv=()):
    cfg = parse_settings(globals(), argv)
    checkpoint_dir = cfg.checkpoint or newest_checkpoint(cfg.output_dir)
    if not os.path.isdir(checkpoint_dir):
        raise PipelineError(f"checkpoint folder not found: {checkpoint_dir}; set --checkpoint to a folder saved by train.py")
    for name in (ADAPTER_FILE, "adapter_model.safetensors"):  # safetensors only: a pickled .bin could run code
        if not os.path.isfile(os.path.join(checkpoint_dir, name)):
            raise PipelineError(f"{checkpoint_dir} has no {name}: set --checkpoint to an adapter saved by train.py")
    run_config = read_run_config(checkpoint_dir)
    if cfg.images:
        image_paths = expand_images(cfg.images)
    else:
        image_paths = list(dict.fromkeys(sample["image_path"] for sample in read_conversations(run_config["test_json"])))
    if not image_paths:
        raise PipelineError("no image to caption: set --images to image paths or globs")

    loaded = load_images(image_paths, run_config["image_size"])
    if not loaded:
        raise PipelineError(f"none of the {len(image_paths)} images could be read")

    from peft import PeftModel

    base_model, processor = load_model_and_processor(cfg.model or run_config["model"])
    lora_model = PeftModel.from_pretrained(base_model, checkpoint_dir).eval()
    print(f"captioning {len(loaded)} images with {checkpoint_dir} (prompt {run_config['prompt']!r}, "
          f"{run_config['image_size']}x{run_config['image_size']})")
    captions = generate_captions(
        lora_model, processor, [image for _, image in loaded], run_config["prompt"], cfg.max_new_tokens, cfg.batch_size
    )

    with atomic_write(cfg.output_path, encoding="utf-8") as file:
        for (path, _), caption in zip(loaded, captions):
            file.write(json.dumps({"image_path": path, "caption": caption}, ensure_ascii=False) + "\n")
            print(f"{path}: {caption}")
    print(f"wrote {len(captions)} captions to {cfg.output_path}")


if __name__ == "__main__":
    run_script(main)
