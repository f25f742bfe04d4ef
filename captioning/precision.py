"""Precision and attention chosen by what the GPU can do (compute capability), behind one seam tests can fake."""

from typing import NamedTuple

from captioning.errors import PipelineError
from captioning.processes import this_process

PRECISIONS = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}  # setting: torch's dtype name
ATTENTIONS = ("flash_attention_2", "sdpa", "eager")


NATIVE_BF16 = (8, 0)  # compute capability from which GPUs compute in bf16 natively, and FlashAttention 2 runs


class Compute(NamedTuple):
    """Where and how a script computes: cuda or cpu, bf16, fp16 or fp32, and the attention kernel."""
    device: str
    precision: str
    attention: str

    @property
    def dtype(self):
        import torch

        return getattr(torch, PRECISIONS[self.precision])

    def __str__(self):
        return f"{self.precision}, {self.attention}"


def gpu_capability():
    """The (major, minor) compute capability of this process's GPU, or None on a CPU: the CUDA query the precision
    and attention rest on, one function so that tests can fake a T4 or an H100."""
    import torch

    if not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_capability(this_process().local_rank)  # under torchrun: its own GPU


def flash_attention_2_installed():
    """transformers' own test of the flash-attn 2 package (a flash-attn 4 install also provides a flash_attn module)."""
    from transformers.utils import is_flash_attn_2_available

    return is_flash_attn_2_available()


def compute_choice(precision="auto", attention="auto"):
    """The Compute for the precision and attention settings. auto: bf16 where the GPU has it natively (compute
    capability 8.0+: A100, RTX 30xx, H100 and newer), fp16 on older GPUs (T4, V100: their bf16 is emulated, far
    slower), fp32 on a CPU; FlashAttention 2 where it is installed and can run (8.0+, in bf16 or fp16), else PyTorch's
    SDPA. A setting other than auto is used as given, unless this machine cannot run it."""
    capability = gpu_capability()
    if precision not in ("auto", *PRECISIONS):
        raise PipelineError(f"--precision={precision}: use auto, {', '.join(PRECISIONS)}")
    if attention not in ("auto", *ATTENTIONS):
        raise PipelineError(f"--attention={attention}: use auto, {', '.join(ATTENTIONS)}")
    native_bf16 = capability is not None and capability >= NATIVE_BF16
    if precision == "auto":
        precision = "fp32" if capability is None else "bf16" if native_bf16 else "fp16"
    flash_runs = native_bf16 and precision != "fp32" and flash_attention_2_installed()
    if attention == "auto":
        attention = "flash_attention_2" if flash_runs else "sdpa"
    if precision == "fp16" and capability is None:
        raise PipelineError("--precision=fp16 needs a GPU: on a CPU use fp32 (or bf16)")
    if attention == "flash_attention_2" and not flash_runs:
        where = "a CPU" if capability is None else f"this GPU of compute capability {capability[0]}.{capability[1]}"
        raise PipelineError(f"--attention=flash_attention_2 cannot run on {where} in {precision}: it needs the "
                            "flash-attn 2 package, a GPU of compute capability 8.0 or newer and bf16 or fp16. Use "
                            "--attention=sdpa")
    return Compute("cpu" if capability is None else "cuda", precision, attention)
