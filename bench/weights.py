"""What a training run holds in GPU memory before its first batch, by quantization: the base model's weights as
train.py loads them, and the LoRA adapter with its gradients and AdamW's two moments (all fp32).

    .venv/bin/python bench/weights.py                   # the published shapes of the four families
    .venv/bin/python bench/weights.py --models=2b

Each model has the published architecture (bench.py's SIZES) with random weights in bf16, so nothing is downloaded;
it is loaded on the CPU as train.py loads it on a GPU (bitsandbytes quantizes it alike on either), and its tensors
are measured with captioning.quantization.weight_bytes. Activations are not counted: they depend on the batch and
image size, and train.py's memory probe measures them on the GPU itself. Prints a table and writes
bench/weights_results.json.
"""
import os
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [REPO, os.path.join(REPO, "bench")]

from captioning.errors import PipelineError  # noqa: E402
from captioning.files import write_json  # noqa: E402
from captioning.scripts import run_script  # noqa: E402
from captioning.settings import parse_settings  # noqa: E402

# ----------------------------------------------------------------------------- settings
models = "2b,qwen2.5-vl-3b,qwen3-vl-2b,qwen3.5-0.8b,qwen3.5-2b,qwen3.5-4b"  # bench.py's SIZES, or small
quantizations = "none,8bit,4bit"
lora_r = 64  # train.py's default
output = "bench/weights_results.json"
debug = False  # show the full traceback of a failure
# -----------------------------------------------------------------------------

GIB = 2 ** 30


def measure(folder, quantization):
    """(bytes of the base model's weights as held, of its LoRA adapter's weights) for one quantization."""
    from peft import LoraConfig, get_peft_model

    from captioning.models import load_model_and_processor, model_family
    from captioning.precision import Compute
    from captioning.quantization import weight_bytes

    model, _ = load_model_and_processor(folder, Compute("cpu", "bf16", "sdpa"), quantization=quantization)
    held, _ = weight_bytes(model)
    lora_model = get_peft_model(model, LoraConfig(target_modules=model_family(folder).lora_target_modules, r=lora_r))
    adapter = sum(p.numel() * 4 for p in lora_model.parameters() if p.requires_grad)  # fp32
    return held, adapter


def main(argv=()):
    cfg = parse_settings(globals(), argv)
    import torch

    from bench import SIZES
    from testkit.tiny_models import BUILDERS

    results = {}
    for name in cfg.models.split(","):
        if name not in SIZES:
            raise PipelineError(f"--models: {name!r} is not one of {', '.join(SIZES)}")
        size = SIZES[name]
        with tempfile.TemporaryDirectory() as folder:
            torch.set_default_dtype(torch.bfloat16)  # built in bf16 from the start: fp32 first takes twice the memory
            BUILDERS[size["family"]](folder, text=size["text"], vision=size["vision"], vocab_size=size["vocab_size"])
            torch.set_default_dtype(torch.float32)
            for quantization in cfg.quantizations.split(","):
                held, adapter = measure(folder, quantization)
                # the adapter, its gradients and AdamW's two moments
                results[f"{name}/{quantization}"] = {"weights_gib": held / GIB, "adapter_and_optimizer_gib": 4 * adapter / GIB,
                                                     "before_activations_gib": (held + 4 * adapter) / GIB}
                print(f"{name:14} {quantization:5}  weights {held / GIB:5.2f} GiB  adapter+grads+AdamW "
                      f"{4 * adapter / GIB:4.2f} GiB  = {(held + 4 * adapter) / GIB:5.2f} GiB before activations",
                      flush=True)
    write_json(cfg.output, {"settings": {"lora_r": cfg.lora_r, "dtype": "bf16"}, "results": results})
    print(f"wrote {cfg.output}")


if __name__ == "__main__":
    run_script(main)
