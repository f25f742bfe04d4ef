"""Step 4: caption images with the trained LoRA adapter.

    python infer.py                                    # the held-out test images, newest adapter in output_dir
    python infer.py --images="photos/*.jpg,cat.png" --checkpoint=output/Qwen2-VL-2B/checkpoint-100
    python infer.py --model=output/Qwen2-VL-2B-merged                # a merged model from merge.py

Uses the prompt, image size and base model that training saved in run_config.json, generates greedily in
batches, prints each caption and writes one JSON record per image (image_path, caption) to output_path.
"""
import glob
import json
import os

from captioning import (
    RUN_CONFIG,
    PipelineError,
    atomic_write,
    generate_captions,
    load_images,
    load_model_and_processor,
    parse_settings,
    read_conversations,
    read_run_config,
    run_script,
    trained_adapter,
)

# ----------------------------------------------------------------------------- settings
model = ""  # base model; empty: the one training used (run_config.json); a folder from merge.py needs no adapter
output_dir = "output/Qwen2-VL-2B"  # where train.py saved its adapters
checkpoint = ""  # adapter folder; empty: the newest trained adapter under output_dir
images = ""  # comma-separated image paths or globs; empty: the held-out test images of training
batch_size = 8
max_new_tokens = 128
output_path = "predictions.jsonl"
debug = False  # show the full traceback of a failure
# -----------------------------------------------------------------------------


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
    merged = cfg.model and not cfg.checkpoint and os.path.isfile(os.path.join(cfg.model, RUN_CONFIG))
    if merged:  # a model written by merge.py: the adapter is already folded in
        checkpoint_dir, run_config = None, read_run_config(cfg.model)
    else:
        checkpoint_dir, run_config = trained_adapter(cfg.checkpoint, cfg.output_dir)
    if cfg.images:
        image_paths = expand_images(cfg.images)
    else:
        image_paths = list(dict.fromkeys(sample["image_path"] for sample in read_conversations(run_config["test_json"])))
    if not image_paths:
        raise PipelineError("no image to caption: set --images to image paths or globs")
    loaded = load_images(image_paths, run_config["image_size"])
    if not loaded:
        raise PipelineError(f"none of the {len(image_paths)} images could be read")

    model, processor = load_model_and_processor(cfg.model or run_config["model"], on_device=True)
    if checkpoint_dir:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, checkpoint_dir)
    model.eval()
    print(f"captioning {len(loaded)} images with {checkpoint_dir or cfg.model} (prompt {run_config['prompt']!r}, "
          f"{run_config['image_size']}x{run_config['image_size']})")
    captions = generate_captions(
        model, processor, [image for _, image in loaded], run_config["prompt"], cfg.max_new_tokens, cfg.batch_size
    )

    with atomic_write(cfg.output_path, encoding="utf-8") as file:
        for (path, _), caption in zip(loaded, captions):
            file.write(json.dumps({"image_path": path, "caption": caption}, ensure_ascii=False) + "\n")
            print(f"{path}: {caption}")
    print(f"wrote {len(captions)} captions to {cfg.output_path}")


if __name__ == "__main__":
    run_script(main)
