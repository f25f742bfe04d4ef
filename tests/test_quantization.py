"""QLoRA on a CPU, with bitsandbytes' CPU backend: the base model's language model in 4 or 8 bits, the vision tower
and the head as they were; it trains, captions, resumes and merges. Each process trains before it captions: on CPUs
with AVX512-BF16 bitsandbytes repacks 4-bit weights after a no-grad forward, and training them then fails (train_rl.py,
which samples between its steps, keeps those layers out of eval mode)."""
import json
import os
import shutil
import sys

import pytest
import torch
from PIL import Image

import train
from captioning.chat import build_messages
from captioning.errors import PipelineError
from captioning.generation import BaseAndFineTuned
from captioning.images import ImageGeometry
from captioning.models import load_model_and_processor, model_family
from captioning.precision import Compute
from captioning.quantization import check_quantization, weight_bytes
from captioning.settings import parse_settings
from conftest import COLOR_CAPTIONS, PHOTO_SHAPES, TRAINED, check, make_imagefolder, run
from test_scale_out import logged_losses, torchrun
from testkit.tiny_models import BUILDERS

CPU = Compute("cpu", "fp32", "sdpa")
LEARNING = ["--test_size=2", "--image_size=56", "--max_steps=150", "--learning_rate=5e-3",
            "--per_device_train_batch_size=2", "--gradient_accumulation_steps=1", "--logging_steps=10",
            "--save_steps=100", "--swanlab_mode=disabled"]


def quantized_layers(model):
    return {name for name, module in model.named_modules() if type(module).__name__ in ("Linear4bit", "Linear8bitLt")}


@pytest.mark.parametrize("quantization", ["4bit", "8bit"])
def test_only_the_language_model_s_linear_layers_are_quantized(family_model, family_processor, family_side,
                                                              quantization):
    """All of them but those the family keeps (Qwen3.5's in_proj_a/in_proj_b), and the model still captions."""
    model, _ = load_model_and_processor(family_model, CPU, quantization=quantization)
    family = model_family(family_model)
    language_model_linears = {name for name, module in model.named_modules()
                              if isinstance(module, torch.nn.Linear) and name.startswith("model.language_model.")}
    kept = {name for name in language_model_linears if name.rsplit(".", 1)[-1] in family.not_quantized}
    assert quantized_layers(model) == language_model_linears - kept and language_model_linears
    assert bool(kept) == (family.name == "Qwen3.5")
    assert type(model.lm_head) is torch.nn.Linear and model.lm_head.weight.dtype == torch.float32
    assert all(parameter.dtype == torch.float32 for parameter in model.model.visual.parameters())
    image = Image.new("RGB", (family_side, family_side), "red")
    text = family_processor.apply_chat_template(build_messages(image, "COCO Yes:"), add_generation_prompt=True,
                                                tokenize=False)
    inputs = family_processor(text=[text], images=[image], return_tensors="pt")
    assert model.generate(**inputs, max_new_tokens=2, do_sample=False).shape[1] == inputs["input_ids"].shape[1] + 2


def test_training_s_4bit_model_keeps_the_vision_tower_and_head_in_the_run_s_precision(tiny_model):
    cfg = parse_settings(vars(train), ["--quantization=4bit"])
    lora_model, _ = train.lora_model_and_processor(cfg, tiny_model, Compute("cpu", "bf16", "sdpa"), ImageGeometry(56, 28))
    base_model = lora_model.get_base_model()
    # no k-bit preparation: it would upcast them to fp32
    assert {p.dtype for p in (*base_model.model.visual.parameters(), *base_model.lm_head.parameters())} == {torch.bfloat16}
    assert {p.dtype for name, p in lora_model.named_parameters() if p.requires_grad} == {torch.float32}  # the adapter
    assert not any(p.requires_grad for p in base_model.model.visual.parameters())


def test_the_weights_take_what_their_bits_say_measured_from_their_tensors(tiny_model):
    full, _ = load_model_and_processor(tiny_model, CPU)
    full_bytes, as_if_unquantized = weight_bytes(full)
    assert full_bytes == as_if_unquantized == sum(p.numel() * 4 for p in full.parameters()) + sum(
        b.numel() * b.element_size() for b in full.buffers())
    linears = [module for name, module in full.named_modules()
               if isinstance(module, torch.nn.Linear) and name.startswith("model.language_model.")]
    weights = sum(module.weight.numel() for module in linears)
    rows = sum(module.out_features for module in linears)
    # 4 bits a weight, plus a one-byte scale per block of 64 and a 1.3 KB table per layer; 8 bits, plus a scale a row
    for quantization, bits, most_constants in (("4bit", 4, weights / 64 + len(linears) * 1300), ("8bit", 8, rows * 4)):
        quantized, _ = load_model_and_processor(tiny_model, CPU, quantization=quantization)
        held, unquantized = weight_bytes(quantized)
        assert unquantized == full_bytes  # the same model, its weights counted at full size
        assert sum(layer.weight.numel() * layer.weight.element_size() for layer in quantized.modules()
                   if type(layer).__name__ in ("Linear4bit", "Linear8bitLt")) == weights * bits / 8
        constants = held - (full_bytes - weights * 4) - weights * bits / 8
        assert 0 < constants <= most_constants, (quantization, constants)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    work = tmp_path_factory.mktemp("qlora")
    folder = make_imagefolder(work / "source", shapes=PHOTO_SHAPES)
    check(run("data2csv.py", f"--source={folder}", cwd=work))
    check(run("csv2json.py", cwd=work))
    return work


@pytest.fixture(scope="module")
def qlora_run(tiny_model, work):
    training = check(run("train.py", f"--model={tiny_model}", "--quantization=4bit", "--output_dir=qlora", *LEARNING,
                         cwd=work))
    return work / "qlora", training


def trained_images(work):
    return ",".join(str(work / "coco_2014_caption" / f"{color}.jpg") for color in TRAINED)


def captions_of(predictions):
    return [(os.path.basename(record["image_path"]), record["caption"])
            for record in map(json.loads, predictions.read_text().splitlines())]


LEARNT = [(f"{color}.jpg", COLOR_CAPTIONS[color]) for color in TRAINED]


def test_a_4bit_base_trains_and_its_captions_are_learnt_on_either_base(qlora_run, work):
    output_dir, training = qlora_run
    assert "base model" in training.stdout and "with its language model in 4 bits (nf4)" in training.stdout
    run_config = json.loads((output_dir / "run_config.json").read_text())
    assert run_config["quantization"] == "4bit" and run_config["image_features_cached"]  # the vision tower as it was
    state = json.loads((output_dir / "checkpoint-150" / "trainer_state.json").read_text())
    losses = [entry["loss"] for entry in state["log_history"] if "loss" in entry]
    assert losses[-1] < losses[0] - 0.5, losses
    for quantization in ("4bit", "none"):  # the 4-bit base training used, and the base in full precision
        check(run("infer.py", f"--output_dir={output_dir}", f"--images={trained_images(work)}",
                  f"--quantization={quantization}", f"--output_path={quantization}.jsonl", cwd=work))
        assert captions_of(work / f"{quantization}.jsonl") == LEARNT, quantization


def test_a_4bit_run_merges_into_the_unquantized_base_with_the_same_captions(qlora_run, work):
    output_dir, _ = qlora_run
    merged = check(run("merge.py", f"--output_dir={output_dir}", "--merged_dir=qlora-merged", cwd=work))
    assert "merged into the unquantized base" in merged.stdout
    config = json.loads((work / "qlora-merged" / "config.json").read_text())
    assert "quantization_config" not in config  # a plain model, for any reader
    check(run("infer.py", "--model=qlora-merged", f"--images={trained_images(work)}", "--output_path=merged.jsonl",
              cwd=work))
    assert captions_of(work / "merged.jsonl") == LEARNT


def test_compare_and_demo_caption_with_a_4bit_base_and_the_adapter_switched_off(qlora_run, work):
    output_dir, _ = qlora_run
    models = BaseAndFineTuned("", "", str(output_dir), CPU, quantization="4bit")
    assert quantized_layers(models.fine_tuned)
    paths = trained_images(work).split(",")
    assert [(os.path.basename(path), caption) for path, caption in models.caption("fine_tuned", paths, 32, 4)] == LEARNT
    assert [caption for _, caption in models.caption("base", paths, 32, 4)] != [caption for _, caption in LEARNT]


@pytest.mark.slow  # 20 s, beside make test's budget
def test_train_rl_trains_a_4bit_run_further_and_infer_captions_with_it(qlora_run, work):
    """train_rl.py samples and evaluates between its training steps on the 4-bit base, the KL's reference adapter
    beside the trained one; the run keeps the 4-bit base and infer.py takes it."""
    output_dir, _ = qlora_run
    check(run("train_rl.py", f"--sft_dir={output_dir}", "--output_dir=qlora-rl", "--max_steps=2", "--num_generations=2",
              "--eval_steps=1", "--beta=0.1", "--temperature=0.05", "--logging_steps=1", "--java=never",
              "--swanlab_mode=disabled", cwd=work))
    run_config = json.loads((work / "qlora-rl" / "run_config.json").read_text())
    assert run_config["quantization"] == "4bit" and run_config["started_from"] == str(output_dir)
    history = json.loads((work / "qlora-rl" / "trainer_state.json").read_text())["log_history"]
    assert [entry["step"] for entry in history if "eval_cider_d" in entry] == [0, 1, 2]
    assert all(entry["kl"] >= 0 for entry in history if "reward" in entry)
    check(run("infer.py", "--output_dir=qlora-rl", f"--images={trained_images(work)}", "--output_path=rl.jsonl",
              cwd=work))
    assert len(captions_of(work / "rl.jsonl")) == len(TRAINED)


@pytest.mark.slow  # a minute
def test_a_4bit_qwen35_base_learns_its_captions(work, tmp_path):
    """Its linear attention's projections in 4 bits, the gates kept: the captions learnt exactly, in 4 bits."""
    model = BUILDERS["qwen3_5"](str(tmp_path / "qwen35"))
    one_thread = {"OMP_NUM_THREADS": "1"}  # the linear attention's reference path: far slower on two threads
    check(run("train.py", f"--model={model}", "--quantization=4bit", "--output_dir=qlora35", *LEARNING,
              "--image_size=64", "--dataloader_num_workers=0", cwd=work, env=one_thread))
    check(run("infer.py", "--output_dir=qlora35", f"--images={trained_images(work)}", "--output_path=qwen35.jsonl",
              cwd=work, env=one_thread))
    assert captions_of(work / "qwen35.jsonl") == LEARNT


def test_a_4bit_run_resumed_from_its_checkpoint_ends_as_the_uninterrupted_one(tiny_model, work):
    args = [f"--model={tiny_model}", "--quantization=4bit", "--output_dir=resumed", "--test_size=2",
            "--image_size=56", "--max_steps=8", "--save_steps=4", "--logging_steps=1", "--learning_rate=5e-3",
            "--per_device_train_batch_size=1", "--gradient_accumulation_steps=1", "--lora_dropout=0",
            "--swanlab_mode=disabled"]
    check(run("train.py", *args, cwd=work))
    output_dir = work / "resumed"
    uninterrupted = json.loads((output_dir / "checkpoint-8" / "trainer_state.json").read_text())["log_history"]
    shutil.rmtree(output_dir / "checkpoint-8")
    os.remove(output_dir / "adapter_config.json")  # as if it had been stopped after checkpoint-4
    resumed = check(run("train.py", *args, cwd=work))
    assert f"resuming the interrupted run from {os.path.join('resumed', 'checkpoint-4')}" in resumed.stdout
    history = json.loads((output_dir / "checkpoint-8" / "trainer_state.json").read_text())["log_history"]
    losses = [(entry["step"], entry["loss"]) for entry in history if "loss" in entry]
    assert losses == [(entry["step"], pytest.approx(entry["loss"], abs=1e-5)) for entry in uninterrupted if "loss" in entry]
    assert [step for step, _ in losses] == list(range(1, 9))


@pytest.mark.slow  # half a minute; make test runs two processes without quantization (test_scale_out.py)
def test_two_processes_under_torchrun_train_a_4bit_base_as_one_process_with_the_same_global_batch(tiny_model, work):
    args = [f"--model={tiny_model}", "--quantization=4bit", "--test_size=2", "--image_size=56", "--max_steps=4",
            "--save_steps=4", "--logging_steps=1", "--learning_rate=5e-3", "--gradient_accumulation_steps=1",
            "--lora_dropout=0", "--swanlab_mode=disabled"]
    check(torchrun(*args, "--output_dir=ddp", cwd=work))  # one sample a process
    check(run("train.py", *args, "--output_dir=single", "--per_device_train_batch_size=2", cwd=work))
    ddp_step, ddp_losses = logged_losses(work / "ddp")
    single_step, single_losses = logged_losses(work / "single")
    assert ddp_step == single_step == 4 and ddp_losses == pytest.approx(single_losses, abs=1e-4)


@pytest.mark.slow  # a minute
def test_dora_trains_on_a_4bit_base_with_checkpointing_and_merges_with_the_same_captions(tiny_model, work):
    training = check(run("train.py", f"--model={tiny_model}", "--quantization=4bit", "--use_dora=true",
                         "--gradient_checkpointing=true", "--output_dir=dora", *LEARNING, cwd=work))
    assert "gradient checkpointing on" in training.stdout
    assert json.loads((work / "dora" / "adapter_config.json").read_text())["use_dora"] is True
    check(run("merge.py", "--output_dir=dora", "--merged_dir=dora-merged", cwd=work))
    for name, model in (("dora", []), ("dora-merged", ["--model=dora-merged"])):
        check(run("infer.py", "--output_dir=dora", *model, f"--images={trained_images(work)}",
                  f"--output_path={name}.jsonl", cwd=work))
        assert captions_of(work / f"{name}.jsonl") == LEARNT, name


@pytest.mark.slow  # half a minute; make test trains, resumes and merges in 4 bits
def test_an_8bit_base_trains_and_captions(tiny_model, work):
    check(run("train.py", f"--model={tiny_model}", "--quantization=8bit", "--output_dir=int8", *LEARNING, cwd=work))
    check(run("infer.py", "--output_dir=int8", "--quantization=8bit", f"--images={trained_images(work)}",
              "--output_path=int8.jsonl", cwd=work))
    assert captions_of(work / "int8.jsonl") == LEARNT


def test_a_change_of_quantization_is_not_resumed(tmp_path):
    output_dir = tmp_path / "out"
    (output_dir / "checkpoint-10").mkdir(parents=True)
    (output_dir / "checkpoint-10" / "trainer_state.json").write_text("{}")
    (output_dir / "run_config.json").write_text(json.dumps({"quantization": "4bit"}))
    (tmp_path / "data_vl.json").write_text("[]")
    with pytest.raises(PipelineError, match=r"holds an interrupted run with other settings \(quantization differ\)"):
        train.main([f"--json_path={tmp_path / 'data_vl.json'}", f"--output_dir={output_dir}",
                    "--model=not-downloaded/Qwen2-VL-2B-Instruct"])


def test_what_cannot_work_is_refused_before_anything_loads(tmp_path, monkeypatch):
    settings = ["--model=not-downloaded/Qwen2-VL-2B-Instruct", f"--output_dir={tmp_path}/out"]
    with pytest.raises(PipelineError, match=r"^--quantization=3bit: use none, 4bit, 8bit$"):
        train.main([*settings, "--quantization=3bit"])
    with pytest.raises(PipelineError, match="--quantization=4bit cannot be used with --deepspeed"):
        train.main([*settings, "--quantization=4bit", "--deepspeed=zero2"])
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # not installed
    with pytest.raises(PipelineError, match=r"needs bitsandbytes, which is not installed: pip install 'bitsandbytes"):
        train.main([*settings, "--quantization=4bit"])
    broken = tmp_path / "broken" / "bitsandbytes"  # installed, but its native library does not load
    broken.mkdir(parents=True)
    (broken / "__init__.py").write_text("raise OSError('libbitsandbytes_cpu.so: cannot open shared object file')")
    monkeypatch.delitem(sys.modules, "bitsandbytes")
    monkeypatch.syspath_prepend(str(broken.parent))
    with pytest.raises(PipelineError, match=r"which does not load here \(OSError: libbitsandbytes_cpu.so: cannot"):
        check_quantization("8bit")
    cfg = parse_settings(vars(train), ["--quantization=none"])
    check_quantization(cfg.quantization)  # none needs no bitsandbytes
