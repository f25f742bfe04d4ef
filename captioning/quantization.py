"""The base model in 4 or 8 bits (QLoRA) with bitsandbytes: its language model's linear layers quantized, the vision
tower and the output head left in the model's precision; the bytes its weights take."""

import importlib

from captioning.disk_full import size_text
from captioning.errors import PipelineError
from captioning.processes import this_process

QUANTIZATIONS = ("none", "4bit", "8bit")  # the quantization setting of train.py, infer.py, compare.py and demo.py
# kept in the model's precision beside the frozen vision tower (its features can then be cached, and are not
# blurred): the output head (tied to the embeddings in the 2B model, which bitsandbytes cannot quantize)
NOT_QUANTIZED = ["lm_head"]
BITSANDBYTES = "bitsandbytes>=0.45"  # the first release whose 4-bit layers train on GPUs of every generation


def check_quantization(quantization, deepspeed_config=None):
    """Refuse a quantization that cannot be used here, before anything loads: unknown, bitsandbytes missing or
    unable to load, or under DeepSpeed (untried: ZeRO-3 partitions weights, which bitsandbytes packs its own way)."""
    if quantization not in QUANTIZATIONS:
        raise PipelineError(f"--quantization={quantization}: use {', '.join(QUANTIZATIONS)}")
    if quantization == "none":
        return
    if deepspeed_config:
        raise PipelineError(f"--quantization={quantization} cannot be used with --deepspeed: a quantized base is "
                            "not supported under DeepSpeed here (ZeRO-3 partitions weights, which bitsandbytes packs "
                            "its own way). On several GPUs, train it with torchrun's plain data parallel")
    try:
        importlib.import_module("bitsandbytes")  # which loads its native library for this machine
    except ModuleNotFoundError as error:
        raise PipelineError(f"--quantization={quantization} needs bitsandbytes, which is not installed: "
                            f"pip install '{BITSANDBYTES}'") from error
    except Exception as error:  # its native library does not load on this machine
        raise PipelineError(f"--quantization={quantization} needs bitsandbytes, which does not load here "
                            f"({type(error).__name__}: {error}): reinstall it with pip install -U '{BITSANDBYTES}', "
                            "or use --quantization=none") from error


def quantized_loading(quantization, compute, family):
    """from_pretrained's arguments that load the base model quantized, straight onto this process's device: nf4
    with double quantization, computing in compute's precision; or LLM.int8. {} for quantization none."""
    if quantization == "none":
        return {}
    from transformers import BitsAndBytesConfig

    kept = [family.vision_tower, *NOT_QUANTIZED, *family.not_quantized]
    if quantization == "4bit":
        config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                    bnb_4bit_compute_dtype=compute.dtype, llm_int8_skip_modules=kept)
    else:
        config = BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=kept)
    device = f"cuda:{this_process().local_rank}" if compute.device == "cuda" else "cpu"  # under torchrun: its own GPU
    return {"quantization_config": config, "device_map": {"": device}}


def eval_mode_between_training_steps(model):
    """model.eval() (no dropout), except bitsandbytes' own 4-bit layers, which hold no dropout: on CPUs with
    AVX512-BF16 their eval-mode forward repacks their weights into a layout that cannot train afterwards (GPUs never
    take that path), and train_rl.py samples and evaluates between training steps."""
    model.eval()
    for module in model.modules():
        if type(module).__name__ == "Linear4bit" and type(module).__module__.startswith("bitsandbytes."):
            module.train()
    return model


def weight_bytes(model):
    """(bytes the model's weights take as held, bytes they would take unquantized in the model's precision), an
    adapter's own weights left out: a quantized layer holds its packed weights and its quantization constants."""
    import torch

    held = unquantized = 0
    precision = model.dtype.itemsize
    weights = [tensor for name, tensor in model.named_parameters() if "lora_" not in name]  # peft's lora_A, lora_B, ...
    for tensor in (*weights, *model.buffers()):
        state = getattr(tensor, "quant_state", None)  # a 4-bit weight
        scales = getattr(tensor, "SCB", None)  # an 8-bit weight's per-row scales
        constants = ([value for value in state.as_dict(packed=True).values() if torch.is_tensor(value)] if state
                     else [scales] if scales is not None else [])
        held += tensor.numel() * tensor.element_size() + sum(c.numel() * c.element_size() for c in constants)
        quantized = state is not None or scales is not None
        unquantized += (state.shape.numel() if state else tensor.numel()) * (precision if quantized else tensor.element_size())
    return held, unquantized


def describe(model, quantization):
    """One line on the base model's weights, for the printed plan."""
    held, unquantized = weight_bytes(model)
    if quantization == "none":
        return f"base model {size_text(held)}"
    bits = "4 bits (nf4)" if quantization == "4bit" else "8 bits (LLM.int8)"
    return f"base model {size_text(held)} with its language model in {bits} ({size_text(unquantized)} unquantized)"
