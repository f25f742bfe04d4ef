"""Step 4: caption images with the trained LoRA adapter.

    python infer.py                                    # the held-out test images, newest adapter in output_dir
    python infer.py --images="photos/*.jpg,cat.png" --checkpoint=output/Qwen2-VL-2B/checkpoint-100
    python infer.py --model=output/Qwen2-VL-2B-merged                # a merged model from merge.py

Uses the prompt, image size and base model that training saved in run_config.json, generates greedily in
batches, prints each caption and writes one JSON record per image (image_path, caption, model, adapter) to
output_path, by default predictions.jsonl next to the adapter used.
"""
import glob
import json
import os

from captioning.adapters import trained_model
from captioning.data import read_conversations
from captioning.disk_full import stop_if_disk_full
from captioning.errors import PipelineError
from captioning.files import atomic_write
from captioning.generation import caption_files
from captioning.images import trained_geometry
from captioning.models import load_model_and_processor
from captioning.precision import compute_choice
from captioning.quantization import check_quantization
from captioning.scripts import run_script
from captioning.settings import parse_settings, require_positive

# ----------------------------------------------------------------------------- settings
model = ""  # base model; empty: the one training used (run_config.json); a folder from merge.py needs no adapter
output_dir = "output/Qwen2-VL-2B"  # where train.py saved its adapters
checkpoint = ""  # adapter folder; empty: the newest trained adapter under output_dir
images = ""  # comma-separated image paths or globs; empty: the held-out test images of training
batch_size = 8
max_new_tokens = 128
output_path = ""  # one JSON record per image; empty: predictions.jsonl in the adapter's (or merged model's) folder
quantization = "none"  # none | 4bit | 8bit: the base model's language model quantized (bitsandbytes), for GPUs the full model does not fit
precision = "auto"  # auto: bf16 on GPUs of compute capability 8.0+, fp16 on older ones (T4, V100), fp32 on a CPU | bf16 | fp16 | fp32
attention = "auto"  # auto: flash_attention_2 where flash-attn 2 is installed and the GPU is 8.0+, else sdpa | sdpa | eager
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
    require_positive(cfg, "batch_size", "max_new_tokens")
    compute = compute_choice(cfg.precision, cfg.attention)
    check_quantization(cfg.quantization)
    checkpoint_dir, run_config, base = trained_model(cfg.model, cfg.checkpoint, cfg.output_dir)
    if cfg.images:
        image_paths = expand_images(cfg.images)
    else:
        image_paths = list(dict.fromkeys(sample["image_path"] for sample in read_conversations(run_config["test_json"])))
    if not image_paths:
        raise PipelineError("no image to caption: set --images to image paths or globs")
    if not any(os.path.isfile(path) for path in image_paths):
        raise PipelineError(f"none of the {len(image_paths)} images could be read: {', '.join(image_paths[:3])} "
                            "not found")

    model, processor = load_model_and_processor(base, compute, on_device=True, quantization=cfg.quantization)
    if checkpoint_dir:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, checkpoint_dir)
    model.eval()
    used = checkpoint_dir or base
    geometry = trained_geometry(run_config)
    print(f"captioning {len(image_paths)} images with {used} (prompt {run_config['prompt']!r}, images {geometry})")
    captioned = caption_files(model, processor, image_paths, geometry, run_config["prompt"],
                              cfg.max_new_tokens, cfg.batch_size)
    if not captioned:
        raise PipelineError(f"none of the {len(image_paths)} images could be read")

    output_path = cfg.output_path or os.path.join(used, "predictions.jsonl")
    adapter = os.path.abspath(checkpoint_dir) if checkpoint_dir else None
    lines = []
    for path, caption in captioned:
        print(f"{path}: {caption}")
        record = {"image_path": path, "caption": caption, "model": base, "adapter": adapter}
        lines.append(json.dumps(record, ensure_ascii=False) + "\n")
    with stop_if_disk_full(os.path.dirname(os.path.abspath(output_path)), output_path, setting="output_path",
                           needed=lambda: sum(len(line.encode()) for line in lines), then="it captions again"), \
            atomic_write(output_path, encoding="utf-8") as file:
        file.writelines(lines)
    print(f"wrote {len(captioned)} captions to {output_path}")


if __name__ == "__main__":
    run_script(main)
