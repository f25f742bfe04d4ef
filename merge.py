"""Ship it: fold the trained LoRA adapter into the base model and save a plain transformers model.

    python merge.py                                    # newest adapter in output_dir -> output/Qwen2-VL-2B-merged
    python merge.py --checkpoint=output/Qwen2-VL-2B/checkpoint-100 --merged_dir=my-captioner

The folder holds the merged weights (safetensors), the processor, tokenizer, chat template and generation config,
so `AutoModelForImageTextToText.from_pretrained` and inference engines such as vLLM load it without peft, plus
training's run_config.json, so `infer.py --model=<folder>` captions with the same prompt and image size. Its
processor is pinned to training's image size, so other readers do not feed full-size images, and it carries the
files and config fields that transformers 4 reads; every file is readable by all users (0644).
"""
import os

from captioning.checkpoints import RUN_CONFIG, trained_adapter
from captioning.disk_full import stop_if_disk_full
from captioning.errors import PipelineError
from captioning.files import readable_by_all, write_json, written_whole
from captioning.images import trained_geometry
from captioning.locks import hold
from captioning.models import load_model_and_processor, resolve_model
from captioning.scripts import run_script
from captioning.served_files import add_config_fields_for_transformers_4, merged_folder, save_processor
from captioning.settings import parse_settings

# ----------------------------------------------------------------------------- settings
output_dir = "output/Qwen2-VL-2B"  # the same in every script: --help
checkpoint = ""  # the same in every script: --help
model = ""  # the same in every script: --help
merged_dir = ""  # empty: output_dir + "-merged"; an existing folder is replaced
dtype = "auto"  # auto (the base model's own: bfloat16 for the Qwen-VL instruct models) | bfloat16 | float16 | float32
debug = False  # show the full traceback of a failure
# -----------------------------------------------------------------------------

DTYPES = ("auto", "bfloat16", "float16", "float32")


def main(argv=()):
    cfg = parse_settings(globals(), argv)
    if cfg.dtype not in DTYPES:
        raise PipelineError(f"--dtype={cfg.dtype}: use one of {', '.join(DTYPES)}")
    checkpoint_dir, run_config = trained_adapter(cfg.checkpoint, cfg.output_dir)
    merged_dir = cfg.merged_dir or merged_folder(cfg.output_dir)

    with hold(merged_dir):  # one merge into a folder at a time
        from peft import PeftModel  # seconds to import: after the lock, so that a folder in use is named at once

        base = resolve_model(cfg.model or run_config["model"])
        print(f"merging {checkpoint_dir} into {base}")
        if run_config.get("quantization", "none") != "none":
            print(f"the adapter was trained on the base model in {run_config['quantization']}: it is merged into the "
                  "unquantized base (quantized weights cannot take it in without rounding it away), as QLoRA "
                  "does; captions can differ slightly from those of the quantized base")
        base_model, processor = load_model_and_processor(base, dtype=cfg.dtype)
        merged = PeftModel.from_pretrained(base_model, checkpoint_dir).merge_and_unload()

        with stop_if_disk_full(merged_dir, "the merged model", setting="merged_dir", then="it merges again",
                               needed=lambda: sum(tensor.numel() * tensor.element_size()
                                                  for tensor in merged.state_dict().values())), \
                written_whole(merged_dir) as staging:
            merged.save_pretrained(staging)  # weights as safetensors, config and generation config
            add_config_fields_for_transformers_4(staging)
            save_processor(processor, staging, trained_geometry(run_config), base)
            write_json(os.path.join(staging, RUN_CONFIG), {**run_config, "merged_from": os.path.abspath(checkpoint_dir)})
            readable_by_all(staging)
        print(f"wrote the merged model to {merged_dir}: load it with AutoModelForImageTextToText.from_pretrained, "
              f"vLLM, or `python infer.py --model={merged_dir}`")


if __name__ == "__main__":
    run_script(main)
