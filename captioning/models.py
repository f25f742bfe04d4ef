"""The Qwen-VL families this project fine-tunes, one record each, and loading a model with its processor."""

import importlib
import json
import os
from typing import NamedTuple

from captioning.chat import without_thinking_by_default
from captioning.errors import PipelineError
from captioning.precision import compute_choice
from captioning.quantization import quantized_loading


def resolve_model(model):
    """A local model folder as given, or a hub id downloaded with ModelScope into ./<id> as the recipe does."""
    if os.path.isdir(model):
        return model
    print(f"model {model!r} is not a local folder: downloading it from ModelScope into ./{model}")
    try:
        from modelscope import snapshot_download

        return snapshot_download(model, cache_dir="./")
    except Exception as error:
        raise PipelineError(
            f"downloading the model {model!r} from ModelScope failed ({type(error).__name__}: {error}). "
            "Download it another way (e.g. `huggingface-cli download Qwen/Qwen2-VL-2B-Instruct --local-dir "
            "Qwen2-VL-2B-Instruct`) and pass the folder as --model=Qwen2-VL-2B-Instruct"
        ) from error


RECIPE_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")  # the recipe's LoRA layers


class Family(NamedTuple):
    """One Qwen-VL family: all that the scripts need to know of it. A new family is one more record in FAMILIES (and
    a tiny test model)."""
    name: str  # as users know it
    patch_size: int  # the side of a vision patch in pixels; 2x2 patches merge into one image token
    image_size: int  # image_size's default: the recipe's 280, or the nearest multiple of the family's merged patch
    lora_layers: tuple = RECIPE_PROJECTIONS  # the language model's linear layers that take LoRA
    vision_tower: str = "model.visual"  # its module: never quantized, never adapted, its output cacheable
    not_quantized: tuple = ()  # the language model's linear layers a quantized base keeps in its precision
    # the output class that carries precomputed vision features into the model's forward (mm_encoder_outputs)
    cached_features: str = "transformers.modeling_outputs.BaseModelOutputWithPooling"
    gguf_converter_args: tuple | None = ()  # llama.cpp's converter's extra arguments for the language model's GGUF;
    # None: not exported (untested)
    also_named: tuple = ()  # later releases of the same architecture, by the names in their hub ids

    @property
    def side_multiple(self):
        """Image sides are multiples of it: a patch merged 2x2."""
        return self.patch_size * 2

    @property
    def lora_target_modules(self):
        """peft's target_modules: the LoRA layers of the language model only (Qwen2.5-VL's vision blocks have
        gate/up/down_proj too)."""
        return rf".*\.language_model\..*\.({'|'.join(self.lora_layers)})"

    def cached_features_output(self, pooled, deepstack=None):
        """The model's own output object for precomputed vision features: pooled, and Qwen3-VL's deepstack features
        (image tokens x layers x width), which it adds into its first language layers."""
        module, _, name = self.cached_features.rpartition(".")
        output_class = getattr(importlib.import_module(module), name)
        extra = {} if deepstack is None else {"deepstack_features": [(layer,) for layer in deepstack.unbind(1)]}
        return output_class(pooler_output=(pooled,), **extra)


# the Qwen-VL families this project fine-tunes, by the model_type in their config.json
FAMILIES = {
    "qwen2_vl": Family("Qwen2-VL", patch_size=14, image_size=280),
    "qwen2_5_vl": Family("Qwen2.5-VL", patch_size=14, image_size=280),
    "qwen3_vl": Family("Qwen3-VL", patch_size=16, image_size=288, gguf_converter_args=None,
                       cached_features="transformers.models.qwen3_vl.modeling_qwen3_vl."
                                       "BaseModelOutputWithDeepstackFeatures"),
    # Gated DeltaNet layers (3 of 4) beside full attention: LoRA on both and the MLP, not on in_proj_a/in_proj_b (one
    # value per head: an adapter larger than the weight); vLLM packs in_proj_qkv with in_proj_z, so both or neither.
    # Real configs declare a multi-token-prediction layer that a transformers-saved folder does not carry: --no-mtp.
    # In 4 bits, in_proj_a/in_proj_b (the decay and write gates, a few thousand weights a layer) stay unquantized:
    # bitsandbytes' CPU kernel refuses their width, and 4 bits would save nothing there
    "qwen3_5": Family("Qwen3.5", patch_size=16, image_size=288, also_named=("Qwen3.6", "Qwen3.8"),
                      lora_layers=(*RECIPE_PROJECTIONS, "in_proj_qkv", "in_proj_z", "out_proj"),
                      not_quantized=("in_proj_a", "in_proj_b"), gguf_converter_args=("--no-mtp",)),
}
# model types refused with a reason of their own
REFUSED = {"qwen3_5_moe": "Qwen3.5's mixture-of-experts models are not supported (LoRA on their experts is untried "
                          "here): use a dense Qwen3.5, 0.8B, 2B, 4B or 9B"}


def family_named(name):
    """The Family of a name recorded in run_config.json."""
    return next(family for family in FAMILIES.values() if family.name == name)


def family_of(model):
    """The Family of a loaded model (a peft model too)."""
    return FAMILIES[model.config.model_type]


def model_family(model):
    """The Family of a model folder, from its config.json, or of a hub id not yet downloaded, from its name."""
    config_path = os.path.join(model, "config.json")
    if os.path.isfile(config_path):
        with open(config_path, encoding="utf-8") as file:
            model_type = json.load(file).get("model_type")
        if model_type in REFUSED:
            raise PipelineError(f"{model} holds a {model_type!r} model: {REFUSED[model_type]}")
        if model_type not in FAMILIES:
            raise PipelineError(f"{model} holds a {model_type!r} model; this project fine-tunes "
                                f"{', '.join(family.name for family in FAMILIES.values())} (model_type "
                                f"{', '.join(FAMILIES)})")
        return FAMILIES[model_type]
    named = [family for family in FAMILIES.values() for name in (family.name, *family.also_named)
             if f"{name.lower()}-" in os.path.basename(model).lower()]
    if not named:
        raise PipelineError(f"cannot tell which Qwen-VL family {model!r} is: no config.json there, and its name "
                            "does not say. Download the model and pass its folder as --model")
    return named[0]


def checked_image_size(image_size, family):
    """image_size, or the family's default for 0, refused unless the family's patches tile it."""
    image_size = image_size or family.image_size
    if image_size < 0 or image_size % family.side_multiple:
        raise PipelineError(f"--image_size={image_size}: {family.name} needs a positive multiple of "
                            f"{family.side_multiple} ({family.side_multiple // 2}-pixel patches merged 2x2), e.g. "
                            f"{family.image_size}")
    return image_size


def load_model_and_processor(model, compute=None, on_device=False, dtype=None, quantization="none"):
    """A Qwen-VL model (the class its config.json names) and its processor from a local folder or hub id,
    safetensors only: in dtype if given, else in compute's precision (compute_choice() when not given), with its
    attention; moved to its device when on_device, else left on the CPU for Trainer to place. Quantized (4bit,
    8bit), it is loaded onto its device, where bitsandbytes quantizes it."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    path = resolve_model(model)
    family = model_family(path)
    compute = compute or compute_choice()
    processor = without_thinking_by_default(AutoProcessor.from_pretrained(path))
    base_model = AutoModelForImageTextToText.from_pretrained(
        path, dtype=dtype or compute.dtype, use_safetensors=True, attn_implementation=compute.attention,
        **quantized_loading(quantization, compute, family))
    return base_model.to(compute.device) if on_device and quantization == "none" else base_model, processor
