"""train_rl.py, the reinforcement stage after train.py: its settings refused before anything loads, its rise in
CIDEr-D against a noise-rewarded control, its run folder through every script, resuming, torchrun, every family."""
import json
import os
import re
import signal
import subprocess
import sys

import pytest
import torch
from PIL import Image, ImageColor
from safetensors.torch import load_file

import train_rl
from captioning.checkpoints import finished_writing
from captioning.data import references_by_image
from captioning.errors import PipelineError
from captioning.generation import BaseAndFineTuned
from captioning.metrics import cider_d
from captioning.precision import compute_choice
from captioning.self_critical import group_advantages, tokens_no_caption_holds
from captioning.settings import parse_settings
from conftest import REPO, check, run, start_and_wait_for

# colours with two references each, photos of several shapes; the last two are held out (test_size=2)
TWO_REFERENCES = {
    "red": ("a red square on a table", "a red box on a wooden table"),
    "green": ("a green field under the sky", "green grass under a blue sky"),
    "blue": ("a blue boat on the water", "a small blue boat on a lake"),
    "yellow": ("a yellow cat sleeping", "a yellow cat asleep on a bed"),
    "orange": ("an orange on a plate", "a ripe orange on a white plate"),
    "purple": ("a purple flower in a vase", "purple flowers in a glass vase"),
    "pink": ("a pink cake with candles", "a birthday cake with pink icing"),
    "brown": ("a brown dog on the grass", "a brown dog lying in the grass"),
    "white": ("a white wall", "a plain white wall"),
    "black": ("a black night", "the night sky is black"),
}
SHAPES = [(64, 48), (48, 96), (160, 40), (56, 56), (90, 30), (30, 90), (72, 40), (40, 72), (80, 60), (60, 80)]
# train.py until its greedy captions are partly right (a greedy CIDEr-D of about 2.8 on the training images)
PARTLY_TRAINED = ["--test_size=2", "--max_steps=200", "--learning_rate=5e-3", "--per_device_train_batch_size=2",
                  "--gradient_accumulation_steps=1", "--save_steps=1000", "--swanlab_mode=disabled",
                  "--logging_steps=50"]
# a tiny random-weight model's distribution stays nearly flat: at temperature 1 its samples are noise that never
# ends, so its tests sample at 0.05 (../shared/FIELD_NOTES.md)
TINY_RL = ["--temperature=0.05", "--learning_rate=1e-4", "--java=never", "--swanlab_mode=disabled"]
SFT, RL = "output/Qwen2-VL-2B", "output/Qwen2-VL-2B-rl"


def write_two_reference_data(work):
    """data_vl.json as csv2json.py writes it: every colour photo twice, once with each of its references."""
    (work / "images").mkdir(parents=True, exist_ok=True)
    entries = []
    for (name, references), shape in zip(TWO_REFERENCES.items(), SHAPES):
        path = str(work / "images" / f"{name}.png")
        Image.new("RGB", shape, ImageColor.getrgb(name)).save(path)
        for reference in references:
            entries.append({"id": f"identity_{len(entries) + 1}", "conversations": [
                {"from": "user", "value": f"COCO Yes: <|vision_start|>{path}<|vision_end|>"},
                {"from": "assistant", "value": reference}]})
    (work / "data_vl.json").write_text(json.dumps(entries), encoding="utf-8")


def partly_trained(work, model, image_size=56, *settings):
    write_two_reference_data(work)
    check(run("train.py", f"--model={model}", *PARTLY_TRAINED, f"--image_size={image_size}", *settings, cwd=work))
    return work


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory, tiny_model):
    return partly_trained(tmp_path_factory.mktemp("rl") / "run", tiny_model)


def greedy_cider_d(work, output_dir):
    """Greedy CIDEr-D of an adapter's captions of the training images against their references, and the captions."""
    references = references_by_image(work / "data_vl_train.json")
    models = BaseAndFineTuned("", "", str(work / output_dir), compute_choice())
    captions = dict(models.caption("fine_tuned", list(references), 32, 8, show_progress=False))
    return cider_d(references, captions, use_java=False), captions


def rl(work, *settings, control=False):
    """train_rl.py on work's train.py run, rewarded by CIDEr-D, or by noise when control."""
    wrapper = [os.path.join(REPO, "tests", "rewarded_by_noise.py")] if control else []
    return subprocess.run([sys.executable, *wrapper, os.path.join(REPO, "train_rl.py"), *TINY_RL, *settings],
                          cwd=work, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"})


def trained_further(output_dir, sft_dir):
    """Whether output_dir's adapter is sft_dir's LoRA trained further: the same weights by name and shape, changed."""
    trained, started_from = (load_file(os.path.join(folder, "adapter_model.safetensors"))
                             for folder in (output_dir, sft_dir))
    return ({name: weight.shape for name, weight in trained.items()} ==
            {name: weight.shape for name, weight in started_from.items()} and
            any(not torch.equal(trained[name], started_from[name]) for name in trained))


def logged(output_dir):
    with open(os.path.join(output_dir, "trainer_state.json"), encoding="utf-8") as file:
        return json.load(file)["log_history"]


# ----------------------------------------------------------------------------- settings refused before anything loads

@pytest.mark.parametrize("setting, says", [
    ("--num_generations=1", "each image needs at least 2 sampled captions"),
    ("--temperature=0", "the captions must be sampled, at a temperature above 0"),
    ("--reward=bleu", "--reward=bleu: use cider"),
    ("--beta=-0.1", "--beta=-0.1: use 0"),
    ("--deepspeed=zero4", "--deepspeed=zero4: use zero2, zero3 or the path of a DeepSpeed JSON config"),
    ("--sft_dir=nothing-here", "nothing-here holds no finished train.py run (no adapter_config.json): run train.py"),
])
def test_bad_settings_are_refused_before_anything_loads(tmp_path, setting, says):
    result = run("train_rl.py", setting, cwd=tmp_path)
    assert result.returncode == 1 and says in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "output").exists()


def finished_train_run(work, training_data, **run_config):
    """The files train_rl.py reads of a train.py run before anything loads."""
    sft = work / "output" / "Qwen2-VL-2B"
    sft.mkdir(parents=True)
    (sft / "adapter_config.json").write_text("{}")
    (work / "data_vl_train.json").write_text(json.dumps(training_data))
    (sft / "run_config.json").write_text(json.dumps({"train_json": str(work / "data_vl_train.json"), **run_config}))


def test_a_train_run_without_training_captions_is_refused(tmp_path):
    finished_train_run(tmp_path, [])
    result = run("train_rl.py", cwd=tmp_path)
    assert result.returncode == 1
    assert "data_vl_train.json has no training captions to reward against" in result.stderr


def test_a_4bit_train_run_under_deepspeed_is_refused(tmp_path):
    finished_train_run(tmp_path, [{"id": "identity_1", "conversations": [
        {"from": "user", "value": "COCO Yes: <|vision_start|>red.png<|vision_end|>"},
        {"from": "assistant", "value": "a red square"}]}], quantization="4bit")
    result = run("train_rl.py", "--deepspeed=zero2", cwd=tmp_path)
    assert result.returncode == 1 and "--quantization=4bit cannot be used with --deepspeed" in result.stderr


def test_a_gpu_out_of_memory_names_the_settings_that_size_a_step(monkeypatch):
    def out_of_memory(trainer, resume_from):  # as torch raises it on a GPU
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(train_rl, "train_until_done", out_of_memory)
    cfg = parse_settings(vars(train_rl), ["--num_generations=16", "--max_new_tokens=48"])
    with pytest.raises(PipelineError) as raised:
        train_rl.train(cfg, trainer=None, resume_from=None)
    assert str(raised.value).startswith("the GPU ran out of memory sampling and scoring 4 images x 16 captions of up "
                                        "to 48 tokens. Run again with a smaller --max_new_tokens to continue")
    assert "--per_device_train_batch_size" in str(raised.value) and "--num_generations" in str(raised.value)


def test_a_group_whose_rewards_are_all_equal_contributes_nothing_and_never_a_nan():
    rewards = torch.tensor([2.0, 2.0, 2.0, 0.0, 1.0, 5.0])
    for scale in (False, True):
        advantages = group_advantages(rewards, 3, scale)
        assert advantages[:3].tolist() == [0.0, 0.0, 0.0] and not advantages.isnan().any()
        assert advantages[3:].sum().item() == pytest.approx(0, abs=1e-5) and advantages[5] > 0 > advantages[3]


def test_sampling_never_emits_a_vision_token(tiny_processor):
    tokenizer = tiny_processor.tokenizer
    banned, ids = set(tokens_no_caption_holds(tokenizer)), tokenizer.convert_tokens_to_ids
    assert {ids("<|image_pad|>"), ids("<|vision_start|>"), ids("<|vision_end|>"), ids("<|video_pad|>")} <= banned
    assert ids("<|im_end|>") not in banned and ids("a") not in banned


# ----------------------------------------------------------------------------- learning

@pytest.mark.slow  # four runs of 80 steps: about 2 minutes
@pytest.mark.parametrize("seed", [1, 2])
def test_rl_raises_greedy_cider_d_by_more_than_a_noise_reward_does(sft_run, seed):
    """From train.py's partly right adapter, 80 steps of 4 images x 8 captions raise the greedy CIDEr-D of the
    training images; the same run rewarded by noise rises less (measured: 2.82 -> 4.12 and 4.01 against 3.43 and
    3.12, seeds 1 and 2)."""
    settings = ["--max_steps=80", "--eval_steps=1000", "--logging_steps=40", f"--seed={seed}"]
    check(rl(sft_run, *settings, f"--output_dir=output/cider-{seed}"))
    check(rl(sft_run, *settings, f"--output_dir=output/noise-{seed}", control=True))
    start, _ = greedy_cider_d(sft_run, SFT)
    rewarded, captions = greedy_cider_d(sft_run, f"output/cider-{seed}")
    noise, _ = greedy_cider_d(sft_run, f"output/noise-{seed}")
    assert rewarded - start > 0.8, (start, rewarded, captions)
    assert rewarded - start > noise - start + 0.3, (start, rewarded, noise)
    rewards = [entry["reward"] for entry in logged(sft_run / f"output/cider-{seed}") if "reward" in entry]
    assert rewards[-1] > rewards[0] + 0.5  # the mean sampled reward rose too (measured: +2.6 and +0.9)


# ----------------------------------------------------------------------------- the run folder

@pytest.fixture(scope="module")
def rl_run(sft_run):
    result = check(rl(sft_run, "--max_steps=4", "--num_generations=4", "--save_steps=2", "--eval_steps=2",
                      "--logging_steps=1"))
    return sft_run, result


def test_the_run_shows_its_plan_progress_and_held_out_captions(rl_run):
    work, result = rl_run
    assert ("plan: 8 training images (2.0 references each), 4 steps of 4 images x 4 captions sampled at temperature "
            "0.05 (transformers), reward cider") in result.stdout
    history = logged(work / RL)
    steps = [entry for entry in history if "reward" in entry]
    assert len(steps) == 4 and all(0 <= entry["ended"] <= 1 and entry["caption_words"] > 0 and
                                   entry["reward_spread"] >= 0 for entry in steps)
    assert [entry["step"] for entry in history if "eval_cider_d" in entry] == [0, 2, 4]
    assert f"{work}/images/white.png: " in result.stdout and f"{work}/images/black.png: " in result.stdout
    run_config = json.loads((work / RL / "run_config.json").read_text())
    assert run_config["started_from"] == str(work / SFT) and run_config["prompt"] == "COCO Yes:"
    assert run_config["model"] == json.loads((work / SFT / "run_config.json").read_text())["model"]
    assert sorted(os.listdir(work / RL / "checkpoint-4")) == sorted(os.listdir(work / SFT / "checkpoint-200"))
    assert not (work / RL / "reference").exists()
    # the same LoRA, trained further: what serves train.py's adapter (vLLM's LoRARequest, merge.py, GGUF) serves this
    assert (json.loads((work / RL / "adapter_config.json").read_text()) ==
            json.loads((work / SFT / "adapter_config.json").read_text()))
    assert trained_further(work / RL, work / SFT)


def test_the_rl_folder_gives_the_same_captions_in_every_script(rl_run):
    """infer.py, compare.py (base, train.py and train_rl.py side by side), merge.py and verify.py take the folder as
    they take train.py's, and give the same captions."""
    work, _ = rl_run
    check(run("infer.py", f"--output_dir={RL}", "--output_path=rl.jsonl", "--max_new_tokens=32", cwd=work))
    inferred = {row["image_path"]: row["caption"]
                for row in map(json.loads, (work / "rl.jsonl").read_text().splitlines())}
    compared = check(run("compare.py", f"--output_dir={RL}", "--max_new_tokens=32", "--java=never",
                         "--swanlab_mode=disabled", cwd=work))
    assert re.search(r"^metric +base model +train\.py +train_rl\.py$", compared.stdout, re.MULTILINE)
    report = json.loads((work / RL / "eval" / "metrics.json").read_text())
    assert report["models"] == {"base": "base model", "started_from": "train.py", "fine_tuned": "train_rl.py"}
    assert {row["image_path"]: row["fine_tuned"] for row in report["images"]} == inferred
    sft_captions = {row["image_path"]: row["started_from"] for row in report["images"]}
    sft = BaseAndFineTuned("", "", str(work / SFT), compute_choice())  # as infer.py captions with train.py's adapter
    assert sft_captions == dict(sft.caption("fine_tuned", list(sft_captions), 32, 8, show_progress=False))
    page = (work / RL / "eval" / "report.html").read_text()
    assert "<th>base model</th><th>train.py</th><th>train_rl.py</th>" in page

    check(run("merge.py", f"--output_dir={RL}", "--dtype=float32", cwd=work))
    verified = check(run("verify.py", f"--output_dir={RL}", "--images=data_vl_train.json", "--max_new_tokens=16",
                         "--report_dir=verified", f"--merged_dir={RL}-merged", "--gguf_dir=no-gguf-here", cwd=work))
    rows = {row["engine"]: row for row in json.loads((work / "verified" / "verify.json").read_text())["engines"]}
    assert rows["transformers (merged)"]["equal"] == rows["transformers (merged)"]["of"] == 8, verified.stdout


def test_a_second_run_into_a_finished_rl_folder_is_refused(rl_run):
    work, _ = rl_run
    again = rl(work, "--max_steps=4")
    assert again.returncode == 1 and "already holds a finished training run" in again.stderr


@pytest.mark.slow  # two runs and a kill: about 25 s beside the plain tests' budget
def test_a_killed_rl_run_resumes_from_its_checkpoint_and_finishes(sft_run, tmp_path):
    output_dir = sft_run / "output" / "killed-rl"
    settings = [*TINY_RL, "--max_steps=6", "--save_steps=2", "--num_generations=2", "--eval_steps=1000",
                f"--output_dir={output_dir}"]
    process = start_and_wait_for([sys.executable, os.path.join(REPO, "train_rl.py"), *settings],
                                 lambda: finished_writing(output_dir / "checkpoint-2"), cwd=sft_run,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    assert not (output_dir / "adapter_config.json").exists()
    resumed = check(run("train_rl.py", *settings, cwd=sft_run))
    assert f"resuming the interrupted run from {output_dir}/checkpoint-" in resumed.stdout
    assert json.loads((output_dir / "trainer_state.json").read_text())["global_step"] == 6
    assert (output_dir / "adapter_config.json").exists()


@pytest.mark.slow  # two processes starting torch and the model: 20 s, and 40 s under ZeRO-3 (100 s beside other tests)
@pytest.mark.parametrize("deepspeed", ["", "zero3"])
def test_two_processes_with_torchrun_split_the_images_and_save_one_adapter(sft_run, deepspeed):
    """As plain data parallel, and under DeepSpeed ZeRO-3 (each process holds a slice of every weight, so all of them
    sample and caption the held-out images together), with the KL's reference adapter."""
    output_dir = sft_run / "output" / f"torchrun-rl{deepspeed}"
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             os.path.join(REPO, "train_rl.py"), *TINY_RL, "--max_steps=2", "--num_generations=2",
                             "--per_device_train_batch_size=2", "--eval_steps=2", "--beta=0.1", "--max_new_tokens=16",
                             f"--deepspeed={deepspeed}", f"--output_dir={output_dir}"],
                            cwd=sft_run, capture_output=True, text=True, timeout=900)
    check(result)
    assert "2 steps of 4 images x 2 captions" in result.stdout  # 2 images, whole groups, on each process
    assert result.stdout.count("saved the adapter") == 1
    assert (output_dir / "adapter_config.json").exists() and not (output_dir / "reference").exists()
    assert json.loads((output_dir / "run_config.json").read_text())["world_size"] == 2
    assert [entry["step"] for entry in logged(output_dir) if "eval_cider_d" in entry] == [0, 2]
    assert trained_further(output_dir, sft_run / SFT)  # whole weights gathered from ZeRO-3's slices


# ----------------------------------------------------------------------------- every family

@pytest.mark.slow  # train.py then train_rl.py per family: about half a minute each
def test_every_family_trains_further_and_saves_one_adapter(family_model, family_side, tmp_path):
    work = partly_trained(tmp_path, family_model, family_side, "--max_steps=20")  # a train.py run is all it needs
    result = check(rl(work, "--max_steps=2", "--num_generations=2", "--eval_steps=1", "--beta=0.1",
                      "--logging_steps=1", "--max_new_tokens=16"))
    history = logged(work / RL)
    assert all(entry["kl"] >= 0 for entry in history if "reward" in entry)
    assert (work / RL / "adapter_config.json").exists() and not (work / RL / "reference").exists()
    assert "<think>" not in result.stdout


@pytest.mark.slow  # the real Qwen3.5 tokenizer and template (a vocabulary of 248k tokens): about a minute
def test_qwen35_with_its_thinking_template_samples_captions_without_a_thinking_block(qwen35_model, tmp_path):
    """train_rl.py prompts Qwen3.5 as infer.py does, answering after the template's empty thinking block, and never
    samples a thinking tag. (Its rise in CIDEr-D is shown on the tiny Qwen2-VL: with a vocabulary of 248k tokens
    the tiny Qwen3.5 needs 150 steps of 5 seconds on this CPU, docs/guide.md.)"""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(qwen35_model)
    vocabulary = tokenizer.get_vocab()
    assert {vocabulary["<think>"], vocabulary["</think>"]} <= set(tokens_no_caption_holds(tokenizer))
    work = tmp_path / "run"
    write_two_reference_data(work)
    check(run("train.py", f"--model={qwen35_model}", *PARTLY_TRAINED, "--max_steps=100", "--image_size=64", cwd=work))
    result = check(rl(work, "--max_steps=2", "--num_generations=4", "--max_new_tokens=16", "--logging_steps=1"))
    steps = [entry for entry in logged(work / RL) if "reward" in entry]
    assert len(steps) == 2 and all(entry["caption_words"] > 0 for entry in steps)
    held_out = [line for line in result.stdout.splitlines() if line.startswith(f"{work}/images/")]
    assert len(held_out) == 2 and not any("think>" in line for line in held_out)
