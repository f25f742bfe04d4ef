"""Precision and attention follow what the GPU can do (its CUDA queries faked), and captioning with an adapter
computes in the base model's precision."""
import pytest
import torch
from PIL import Image
from torch.utils._python_dispatch import TorchDispatchMode

from captioning import generation, precision
from captioning.errors import PipelineError
from captioning.models import FAMILIES


@pytest.mark.parametrize("capability, flash_attn, expected", [
    ((7, 0), False, ("fp16", "sdpa")),  # V100: bf16 only emulated, no FlashAttention 2
    ((7, 0), True, ("fp16", "sdpa")),
    ((7, 5), False, ("fp16", "sdpa")),  # T4
    ((7, 5), True, ("fp16", "sdpa")),
    ((8, 0), False, ("bf16", "sdpa")),  # A100
    ((8, 0), True, ("bf16", "flash_attention_2")),
    ((9, 0), False, ("bf16", "sdpa")),  # H100, H200
    ((9, 0), True, ("bf16", "flash_attention_2")),
    (None, True, ("fp32", "sdpa")),  # a CPU
])
def test_precision_and_attention_follow_the_gpu_s_compute_capability(monkeypatch, capability, flash_attn, expected):
    monkeypatch.setattr(precision, "gpu_capability", lambda: capability)
    monkeypatch.setattr(precision, "flash_attention_2_installed", lambda: flash_attn)
    compute = precision.compute_choice()
    assert (compute.precision, compute.attention) == expected
    assert compute.device == ("cpu" if capability is None else "cuda")
    assert str(compute) == ", ".join(expected)  # as train.py's plan line names them
    assert compute.dtype == {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[expected[0]]


def test_the_settings_override_the_choice_unless_the_machine_cannot_run_it(monkeypatch):
    monkeypatch.setattr(precision, "flash_attention_2_installed", lambda: True)
    monkeypatch.setattr(precision, "gpu_capability", lambda: (7, 5))
    assert precision.compute_choice("fp32", "auto")[1:] == ("fp32", "sdpa")
    assert precision.compute_choice("bf16", "eager")[1:] == ("bf16", "eager")
    with pytest.raises(PipelineError, match=r"--attention=flash_attention_2 cannot run on this GPU of compute "
                                            r"capability 7.5 in fp16: .* Use --attention=sdpa"):
        precision.compute_choice("auto", "flash_attention_2")
    monkeypatch.setattr(precision, "gpu_capability", lambda: (9, 0))
    with pytest.raises(PipelineError, match="cannot run on this GPU of compute capability 9.0 in fp32"):
        precision.compute_choice("fp32", "flash_attention_2")
    monkeypatch.setattr(precision, "gpu_capability", lambda: None)
    with pytest.raises(PipelineError, match="--precision=fp16 needs a GPU"):
        precision.compute_choice("fp16", "auto")
    with pytest.raises(PipelineError, match="--precision=half: use auto, bf16, fp16, fp32"):
        precision.compute_choice("half", "auto")


def test_train_py_trains_in_the_chosen_precision(monkeypatch):
    import train

    monkeypatch.setattr(precision, "gpu_capability", lambda: (7, 5))
    monkeypatch.setattr(precision, "flash_attention_2_installed", lambda: True)
    cfg = train.parse_settings(vars(train), ["--model=not-downloaded/Qwen2-VL-2B-Instruct"])
    _, compute = train.check_settings(cfg)
    assert compute == ("cuda", "fp16", "sdpa")
    arguments = train.trainer_arguments(cfg, None, compute._replace(device="cpu"))  # no GPU to build them for here
    assert (arguments.fp16, arguments.bf16) == (True, False)


class MatmulDtypes(TorchDispatchMode):
    """The dtypes of the inputs of every matrix multiplication run inside it."""

    def __init__(self):
        super().__init__()
        self.seen = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in (torch.ops.aten.linear, torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.bmm,
                                   torch.ops.aten.matmul):
            self.seen |= {arg.dtype for arg in args if isinstance(arg, torch.Tensor)}
        return func(*args, **(kwargs or {}))


def test_captioning_with_an_adapter_computes_in_the_base_model_s_precision(tmp_path, tiny_model, tiny_processor):
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForImageTextToText

    adapter = get_peft_model(AutoModelForImageTextToText.from_pretrained(tiny_model),
                             LoraConfig(target_modules=FAMILIES["qwen2_vl"].lora_target_modules, r=8,
                                                    init_lora_weights=False))
    adapter.save_pretrained(tmp_path / "adapter")
    base = AutoModelForImageTextToText.from_pretrained(tiny_model, dtype=torch.bfloat16)  # as on a bf16 GPU
    model = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()  # as infer.py, compare.py and demo.py load it
    assert {p.dtype for name, p in model.named_parameters() if "lora_" in name} == {torch.float32}  # peft upcasts
    image = Image.new("RGB", (56, 56), "red")
    with MatmulDtypes() as matmuls:
        [caption] = generation.generate_captions(model, tiny_processor, [image], "COCO Yes:", max_new_tokens=3,
                                                 batch_size=1, show_progress=False)
    assert matmuls.seen == {torch.bfloat16}  # the adapter's matmuls too, not fp32
