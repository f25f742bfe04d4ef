"""The fast path computes what the recipe's path computes: same inputs, same loss on the same batch, and
gradient checkpointing, cached image features, micro-batch sizes and length grouping change nothing but speed."""
import json
import os
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from bench.bench import recipe_collator, recipe_loader, recipe_process_func
from captioning import feature_cache, step_plan, training_samples
from captioning.chat import IGNORE_INDEX
from captioning.errors import PipelineError
from captioning.images import ImageGeometry, load_image
from captioning.models import FAMILIES, model_family
from captioning.precision import Compute
from captioning.trainer import LengthGroupedSampler
from captioning.training_samples import CaptionCollator, CaptionDataset

QWEN2_VL = FAMILIES["qwen2_vl"]
SQUARE = ImageGeometry(56, 28, square=True)  # the recipe's resize, which the recipe path is compared with
CAPTIONS = ["a red square on a table", "a green field under the sky", "a blue boat", "a yellow cat sleeping"]
CPU_FP32 = Compute("cpu", "fp32", "sdpa")


class FakeGpuMemory:
    """step_plan.GpuMemory's readings for a GPU of total bytes, whose peak in a try is what peak_of() says of it."""

    def __init__(self, total, peak_of=lambda: 0):
        self.total_bytes, self.peak_of = total, peak_of

    def total(self):
        return self.total_bytes

    def start(self):
        pass

    def peak(self):
        return self.peak_of()


@pytest.fixture(scope="module")
def samples(tmp_path_factory, tiny_processor):
    folder = tmp_path_factory.mktemp("fast_path")
    encoded = []
    for number, (color, caption) in enumerate(zip(["red", "green", "blue", "yellow"], CAPTIONS)):
        path = folder / f"{number}.jpg"
        Image.new("RGB", (80, 60), color).save(path)
        example = {"conversations": [{"from": "user", "value": f"COCO Yes: <|vision_start|>{path}<|vision_end|>"},
                                     {"from": "assistant", "value": caption}]}
        recipe = recipe_process_func(example, tiny_processor, image_size=56)
        ours = training_samples.encode_sample(tiny_processor, load_image(str(path), SQUARE), "COCO Yes:",
                                   training_samples.answer_token_ids(tiny_processor, "COCO Yes:", caption))
        encoded.append((recipe, ours))
    return encoded


@pytest.fixture(scope="module")
def dataset(tiny_processor, tmp_path_factory):
    folder = tmp_path_factory.mktemp("cache")
    entries = []
    for number, caption in enumerate(CAPTIONS + [caption + " again" for caption in CAPTIONS]):
        path = folder / f"{number % 4}.png"  # four shapes: 56x56, 28x84, 56x56 and 112x28 as the processor sizes them
        Image.new("RGB", CACHE_SHAPES[number % 4], (60 * (number % 4), 255 - 50 * (number % 4), 90)).save(path)
        entries.append({"image_path": str(path), "prompt": "COCO Yes:", "caption": caption})  # each image twice
    return CaptionDataset(entries, tiny_processor, ImageGeometry(56, 28), max_length=8192)


CACHE_SHAPES = [(70, 50), (40, 90), (56, 56), (120, 30)]


def lora_model(tiny_model, checkpointing=False):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText

    torch.manual_seed(0)
    model = get_peft_model(AutoModelForImageTextToText.from_pretrained(tiny_model),
                           LoraConfig(target_modules=model_family(tiny_model).lora_target_modules, r=8, lora_dropout=0,
                                      init_lora_weights=False))
    step_plan.set_gradient_checkpointing(model, checkpointing)
    return model


def loss_and_gradients(model, batch):
    model.zero_grad()
    loss = model(**batch).loss
    loss.backward()
    return loss.item(), [p.grad.clone() for p in model.parameters() if p.requires_grad]


def test_on_the_fly_preprocessing_gives_the_recipe_s_tensors(samples, tiny_processor):
    im_end = tiny_processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    for recipe, ours in samples:
        assert torch.equal(recipe["pixel_values"], ours["pixel_values"])  # the .tolist() round trip loses nothing
        assert recipe["image_grid_thw"].tolist() == ours["image_grid_thw"][0].tolist()
        # the same tokens, except the one the model learns to stop with: the recipe supervises the pad token
        assert torch.equal(recipe["input_ids"][:-1], ours["input_ids"][:-1])
        assert (recipe["labels"][-1].item(), ours["labels"][-1].item()) == (tiny_processor.tokenizer.pad_token_id,
                                                                            im_end)


def test_the_recipe_s_datasets_path_runs_after_a_qwen_vl_processor_is_loaded(tiny_processor, tmp_path):
    """The benchmark's recipe path: datasets.map and torch formatting, with torchvision imported by the processor's
    video processor (datasets 4.1-4.8.3 then import torchvision.io.VideoReader, which torchvision 0.29 removed)."""
    import sys

    assert "torchvision" in sys.modules  # what sends datasets' formatters to torchvision
    path = tmp_path / "0.jpg"
    Image.new("RGB", (80, 60), "red").save(path)
    entry = {"id": "0", "conversations": [{"from": "user", "value": f"COCO Yes: <|vision_start|>{path}<|vision_end|>"},
                                         {"from": "assistant", "value": CAPTIONS[0]}]}
    (tmp_path / "data_vl.json").write_text(json.dumps([entry]))
    batch = next(iter(recipe_loader(SimpleNamespace(work_dir=str(tmp_path), image_size=56), tiny_processor, count=1)))
    assert batch["pixel_values"].shape == (1, 4 * 4, 1176) and batch["labels"][0, -1] == tiny_processor.tokenizer.pad_token_id


def test_the_collators_give_the_same_loss_on_the_same_batch(samples, tiny_model, tiny_processor):
    from transformers import Qwen2VLForConditionalGeneration

    model = Qwen2VLForConditionalGeneration.from_pretrained(tiny_model).eval()
    ours = [sample for _, sample in samples]
    theirs = [{key: value[0] if key in ("image_grid_thw",) else value for key, value in sample.items()}
              for sample in ours]  # the recipe's per-sample layout: image_grid_thw squeezed
    with torch.no_grad():
        fast = model(**CaptionCollator(tiny_processor.tokenizer.pad_token_id, QWEN2_VL)(ours)).loss
        recipe = model(**recipe_collator(tiny_processor)(theirs)).loss
    assert fast.item() == pytest.approx(recipe.item(), abs=1e-6)


def test_logits_only_for_supervised_tokens_give_the_same_loss_and_gradients(samples, tiny_model, tiny_processor):
    model = lora_model(tiny_model)
    batch = CaptionCollator(tiny_processor.tokenizer.pad_token_id, QWEN2_VL)([sample for _, sample in samples])
    answer_tokens = int((batch["labels"] != IGNORE_INDEX).sum())
    assert batch["logits_to_keep"].sum() == len(batch["shift_labels"]) == answer_tokens
    assert model(**batch).logits.shape[0] == answer_tokens  # not batch x sequence x vocabulary
    full = {key: value for key, value in batch.items() if key not in ("logits_to_keep", "shift_labels")}
    (loss_kept, grads_kept), (loss_full, grads_full) = loss_and_gradients(model, batch), loss_and_gradients(model, full)
    assert loss_kept == pytest.approx(loss_full, abs=1e-6)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(grads_kept, grads_full))


def test_gradient_checkpointing_changes_neither_loss_nor_gradients(samples, tiny_model, tiny_processor):
    batch = CaptionCollator(tiny_processor.tokenizer.pad_token_id, QWEN2_VL)([sample for _, sample in samples])
    results = []
    for checkpointing in (True, False):
        model = lora_model(tiny_model, checkpointing)
        model.train()
        loss = model(**batch).loss
        loss.backward()
        results.append((loss.item(), [p.grad.clone() for p in model.parameters() if p.requires_grad]))
    (loss_with, grads_with), (loss_without, grads_without) = results
    assert loss_with == pytest.approx(loss_without, abs=1e-6)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(grads_with, grads_without))


@pytest.mark.parametrize("size, parameters", [("2b", 2.209e9), ("qwen2.5-vl-3b", 3.755e9), ("qwen3-vl-2b", 2.128e9),
                                              ("qwen3.5-0.8b", 0.853e9), ("qwen3.5-2b", 2.213e9),
                                              ("qwen3.5-4b", 4.539e9)])
def test_the_benchmark_builds_each_family_s_published_shape(size, parameters, monkeypatch, tmp_path):
    """On the meta device, so nothing is allocated: the parameter counts the model cards give (2.21B, 3.75B, 2.13B);
    for Qwen3.5, the counts its published shapes give (0.85B, 2.21B, 4.54B, which its cards name 0.8B, 2B, 4B)."""
    import bench.bench as bench
    from testkit import tiny_models

    built = []
    monkeypatch.setattr(tiny_models, "save_tiny", lambda model, *args: built.append(model))
    monkeypatch.setattr(tiny_models, "lay_out_as_on_the_hub", lambda *args: None)
    shape = bench.SIZES[size]
    with torch.device("meta"):
        tiny_models.BUILDERS[shape["family"]](str(tmp_path), text=shape["text"], vision=shape["vision"],
                                               vocab_size=shape["vocab_size"], dtype=torch.bfloat16)
    assert sum(parameter.numel() for parameter in built[0].parameters()) == pytest.approx(parameters, rel=1e-3)


@pytest.mark.slow  # two minutes: the benchmark end to end (its paths compared), then train.py and infer.py
def test_the_gpu_check_runs_dry_on_a_cpu(tmp_path):
    from conftest import run

    result = run("bench/gpu_check.py", "--dry_run=true", f"--output={tmp_path}/check.json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-5000:]
    results = json.loads((tmp_path / "check.json").read_text())
    assert results["machine"]["gpu"] is None and results["wheels"] == []
    bench = results["bench"]
    assert bench["exit"] == 0 and bench["train"]["project"]["samples_per_s"] > 0
    for group, paths in {"data": ("recipe", "project"), "train": ("recipe", "project"),
                         "caption": ("one_at_a_time", "batched")}.items():
        assert set(bench[group]) == set(paths), group
    assert bench["data"]["recipe"]["first_batch_pixel_rows"] == bench["data"]["project"]["first_batch_pixel_rows"]
    captions = bench["caption"]["batched"]["captions"]
    assert len(set(captions)) > 1 and all(captions)  # each image its own text, not empty or one repeated string
    assert bench["caption"]["one_at_a_time"]["captions"] == captions
    assert "| training: samples/s" in bench["table"] and "captions identical batched and one at a time: yes" in \
        bench["table"]
    # FLOPs counted by torch on a step of each path: the project's skips the vision tower (cached), the prompt's
    # logits and the recomputation, which 6 x parameters x tokens counted for both (0.57 of the recipe's counted at
    # 112 pixels, where the vision tower's share is small; under half at 280)
    recipe, project = (bench["train"][path]["flops_per_token"] for path in ("recipe", "project"))
    assert 0 < project < 0.6 * recipe and "| training: GFLOP per token (counted)" in bench["table"]
    trained = results["train"]
    assert (trained["exit"], trained["precision_used"], trained["image_features_cached"]) == (0, "fp32", True)
    assert trained["plan"].startswith("each step: ") and len(trained["losses"]) == 6
    assert results["infer"]["summary"].startswith("wrote 4 captions")


def test_the_gpu_check_without_a_gpu_says_how_to_run_it_dry(tmp_path):
    from conftest import run

    result = run("bench/gpu_check.py", f"--output={tmp_path}/check.json", cwd=tmp_path)
    assert result.returncode == 1 and "no GPU here: run with --dry_run=true on a CPU" in result.stderr


def test_the_benchmark_s_data_part_runs_at_a_reduced_size(tmp_path):
    import json

    from conftest import run

    result = run("bench/bench.py", "--data_rows=100,1000", "--fetch_images=16", "--fetch_latency=0.02",
                 f"--data_output={tmp_path}/data.json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-5000:]
    results = json.loads((tmp_path / "data.json").read_text())
    assert results["fetch"]["identical"] is True and results["fetch"]["workers"]["workers"] == 16
    assert [(scale["rows"], scale["images"], scale["training_set"]["samples"]) for scale in results["scale"]] == [
        (100, 20, 100), (1000, 200, 1000)]  # every row went through data2csv, csv2json and into the training set
    assert all(scale[step]["peak_rss_mb"] > 0 for scale in results["scale"] for step in ("data2csv", "csv2json"))
    assert "identical images and CSV: yes" in result.stdout and "| 1000 | 200 |" in result.stdout


def test_cached_image_features_give_the_same_loss_and_gradients(dataset, tiny_model, tiny_processor, tmp_path):
    model = lora_model(tiny_model)
    collate = CaptionCollator(tiny_processor.tokenizer.pad_token_id, QWEN2_VL)
    dataset.image_features = None
    loss_computed, grads_computed = loss_and_gradients(model, collate([dataset[i] for i in range(len(dataset))]))
    dataset.image_features = feature_cache.encode_images(model, tiny_processor, dataset, batch_size=3,
                                                 folder=str(tmp_path))
    cached = collate([dataset[i] for i in range(len(dataset))])
    assert "pixel_values" not in cached and len(dataset.image_features) == 4  # each image encoded once
    loss_cached, grads_cached = loss_and_gradients(model, cached)
    dataset.image_features = None
    assert loss_cached == pytest.approx(loss_computed, abs=1e-6)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(grads_cached, grads_computed))


def test_every_family_s_fast_path_gives_the_recipe_path_s_loss_and_gradients(family_model, family_processor,
                                                                             family_side, tmp_path):
    """Cached image features (with Qwen3-VL's deepstack features), logits only for the caption and gradient
    checkpointing, together, against images encoded in the step and logits everywhere, for each family."""
    entries = []
    for number, caption in enumerate(CAPTIONS * 2):
        path = tmp_path / f"{number % 4}.png"
        Image.new("RGB", (70, 50), (60 * (number % 4), 255 - 50 * (number % 4), 90)).save(path)
        entries.append({"image_path": str(path), "prompt": "COCO Yes:", "caption": caption})
    family_dataset = CaptionDataset(entries, family_processor, ImageGeometry(family_side, family_side // 2),
                                          max_length=8192)
    collate = CaptionCollator(family_processor.tokenizer.pad_token_id, model_family(family_model))

    plain_model = lora_model(family_model).train()
    plain = collate([family_dataset[i] for i in range(len(family_dataset))])
    plain = {key: value for key, value in plain.items() if key not in ("logits_to_keep", "shift_labels")}
    loss_plain, grads_plain = loss_and_gradients(plain_model, plain)

    fast_model = lora_model(family_model, checkpointing=True).train()
    family_dataset.image_features = feature_cache.encode_images(fast_model, family_processor, family_dataset, batch_size=3,
                                                        folder=str(tmp_path))
    fast = collate([family_dataset[i] for i in range(len(family_dataset))])
    assert "pixel_values" not in fast and fast["logits_to_keep"].sum() < fast["labels"].numel()
    loss_fast, grads_fast = loss_and_gradients(fast_model, fast)
    assert loss_fast == pytest.approx(loss_plain, rel=1e-6)  # Qwen3.5's linear attention rounds a little apart
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(grads_fast, grads_plain))


def test_feature_cache_is_used_only_where_it_is_exact_and_pays(dataset, tiny_model):
    model = lora_model(tiny_model)
    cfg = SimpleNamespace(cache_image_features="auto", per_device_train_batch_size=2, gradient_accumulation_steps=1,
                          max_steps=-1, num_train_epochs=1, image_size=56)
    assert feature_cache.use_feature_cache(cfg, dataset, model, None, 1)  # 8 samples show 4 images twice each
    cfg.max_steps = 2  # 2 steps of 2 samples: each image at most once
    assert not feature_cache.use_feature_cache(cfg, dataset, model, None, 1)
    cfg.cache_image_features = "true"
    assert feature_cache.use_feature_cache(cfg, dataset, model, None, 1)
    cfg.cache_image_features = "false"
    assert not feature_cache.use_feature_cache(cfg, dataset, model, None, 1)

    model.get_base_model().model.visual.merger.mlp[0].weight.requires_grad_(True)  # a vision tower that trains
    for choice, expected in (("auto", False), ("true", "the adapter trains part of the vision tower")):
        cfg.cache_image_features = choice
        if expected:
            with pytest.raises(PipelineError, match=expected):
                feature_cache.use_feature_cache(cfg, dataset, model, None, 1)
        else:
            assert not feature_cache.use_feature_cache(cfg, dataset, model, None, 1)


def test_step_plan_prefers_large_micro_batches_then_checkpointing():
    def plan(fits, micro_batch_size="auto", gradient_checkpointing="auto"):
        tried = []

        def recording_fits(size, checkpointing):
            tried.append((size, checkpointing))
            return fits(size, checkpointing)

        cfg = SimpleNamespace(per_device_train_batch_size=4, gradient_accumulation_steps=4,
                              micro_batch_size=micro_batch_size, gradient_checkpointing=gradient_checkpointing)
        return step_plan.step_plan(cfg, recording_fits), tried

    assert plan(lambda size, checkpointing: True) == ((16, False), [(16, False)])
    # activations of a sample take 3 units without checkpointing and 1 with it; the GPU holds 12
    assert plan(lambda size, checkpointing: size * (1 if checkpointing else 3) <= 12) == (
        (4, False), [(16, False), (8, False), (4, False)])
    assert plan(lambda size, checkpointing: size * (1 if checkpointing else 3) <= 10) == (
        (8, True), [(16, False), (8, False), (4, False), (16, True), (8, True)])
    assert plan(lambda size, checkpointing: False)[0] == (1, True)  # the last resort is taken untried
    assert plan(lambda size, checkpointing: False, micro_batch_size="8", gradient_checkpointing="false") == (
        (8, False), [])
    assert plan(lambda size, checkpointing: size <= 2, gradient_checkpointing="true") == (
        (2, True), [(16, True), (8, True), (4, True), (2, True)])
    cfg = SimpleNamespace(per_device_train_batch_size=4, gradient_accumulation_steps=4, micro_batch_size="5",
                          gradient_checkpointing="auto", cache_image_features="auto")
    with pytest.raises(PipelineError, match=r"--micro_batch_size=5: use auto or a number that divides the 16 samples "
                                            r"of a step \(16, 8, 4, 2, 1\)"):
        step_plan.check_step_settings(cfg, None)


def test_the_memory_probe_tries_the_longest_samples_and_leaves_the_model_as_it_was(dataset, tiny_model, tiny_processor):
    model = lora_model(tiny_model)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    tried = []
    forward = model.forward

    def forward_on_a_small_gpu(**batch):  # as if the GPU held 3 samples' activations, or 10 with checkpointing
        tried.append(batch["input_ids"].shape)
        assert model.training  # else gradient checkpointing would not act
        if batch["input_ids"].shape[0] > (10 if model.get_base_model().is_activation_checkpointing else 3):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        return forward(**batch)

    model.forward = forward_on_a_small_gpu
    fits = step_plan.memory_probe(model, dataset, CaptionCollator(tiny_processor.tokenizer.pad_token_id, QWEN2_VL), 1,
                              CPU_FP32, memory=FakeGpuMemory(total=2**40))
    cfg = SimpleNamespace(per_device_train_batch_size=4, gradient_accumulation_steps=2, micro_batch_size="auto",
                          gradient_checkpointing="auto")
    assert step_plan.step_plan(cfg, fits) == (8, True)  # 8 and 4 without checkpointing do not fit; 8 with it does
    longest = max(len(dataset[index]["input_ids"]) for index in range(len(dataset)))
    assert [shape[0] for shape in tried] == [8, 4, 8] and tried[1][1] == longest  # the longest samples first
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(p, before[name]) for name, p in model.named_parameters())


def test_length_grouped_steps_keep_every_sample_once_waste_less_and_repeat_their_order():
    generator = torch.Generator().manual_seed(0)
    lengths = (120 + torch.randint(8, 30, (496,), generator=generator)).tolist()  # a prompt and a COCO caption
    sampler = LengthGroupedSampler(lengths, step_samples=16, seed=3)
    first = list(sampler)
    assert sorted(first) == list(range(496))
    assert list(sampler) == first  # the same epoch, the same order: a resumed run sees what it would have seen
    sampler.set_epoch(1)
    assert sorted(sampler) == list(range(496)) and list(sampler) != first

    def padding(order):
        steps = [[lengths[index] for index in order[start:start + 16]] for start in range(0, 496, 16)]
        return sum(max(step) * len(step) - sum(step) for step in steps)

    shuffled = torch.randperm(496, generator=generator).tolist()
    assert padding(first) < padding(shuffled) / 4


def test_training_the_fast_way_matches_the_recipe_s_way_step_for_step(tmp_path, tiny_model, dataset):
    from conftest import run

    entries = [{"id": f"identity_{number}", "conversations": [
        {"from": "user", "value": f"COCO Yes: <|vision_start|>{sample['image_path']}<|vision_end|>"},
        {"from": "assistant", "value": sample["caption"]}]} for number, sample in enumerate(dataset.samples)]
    (tmp_path / "data_vl.json").write_text(json.dumps(entries))
    # 2 images (4 samples) train: a step takes all 4 samples, so no way of ordering them can change a step
    common = [f"--model={tiny_model}", f"--json_path={tmp_path}/data_vl.json", "--test_size=2", "--image_size=56",
              "--num_train_epochs=4", "--save_steps=4", "--per_device_train_batch_size=2", "--gradient_accumulation_steps=2",
              "--learning_rate=5e-3", "--lora_dropout=0", "--logging_steps=1", "--swanlab_mode=disabled",
              "--dataloader_num_workers=0"]
    losses = {}
    for name, options in {"recipe": ["--micro_batch_size=2", "--cache_image_features=false", "--group_by_length=false",
                                     "--gradient_checkpointing=true"],
                          "fast": []}.items():
        result = run("train.py", *common, *options, f"--output_dir={tmp_path}/{name}", cwd=tmp_path)
        assert result.returncode == 0, result.stderr[-5000:]
        with open(tmp_path / name / "checkpoint-4" / "trainer_state.json") as file:
            losses[name] = [entry["loss"] for entry in json.load(file)["log_history"] if "loss" in entry]
        run_config = json.loads((tmp_path / name / "run_config.json").read_text())
        losses[name + " plan"] = {key: run_config[key] for key in (
            "micro_batch_size_used", "gradient_checkpointing_used", "image_features_cached")}
    assert losses["recipe plan"] == {"micro_batch_size_used": 2, "gradient_checkpointing_used": True,
                                     "image_features_cached": False}
    assert losses["fast plan"] == {"micro_batch_size_used": 4, "gradient_checkpointing_used": False,
                                   "image_features_cached": True}
    assert len(losses["fast"]) == 4 and losses["fast"] == pytest.approx(losses["recipe"], abs=1e-5)


def test_checkpointing_leaves_the_frozen_vision_tower_alone(samples, tiny_model, tiny_processor):
    """transformers hooks the vision tower's input to require grad, which made a checkpointed step backpropagate
    through the frozen tower: 1.52x the plain step's FLOPs, where recomputing the language model costs about 1.33x."""
    from torch.utils.flop_counter import FlopCounterMode

    batch = CaptionCollator(tiny_processor.tokenizer.pad_token_id, QWEN2_VL)([sample for _, sample in samples])
    steps = {}
    for checkpointing in (False, True):
        model = lora_model(tiny_model, checkpointing).train()
        vision_outputs = []
        model.get_base_model().model.visual.register_forward_hook(
            lambda module, inputs, output: vision_outputs.append(output.pooler_output))
        with FlopCounterMode(display=False) as flops:
            loss, grads = loss_and_gradients(model, batch)
        steps[checkpointing] = loss, grads, flops.get_total_flops(), vision_outputs
    (loss_plain, grads_plain, flops_plain, _), (loss_checked, grads_checked, flops_checked, vision) = steps.values()
    assert vision and not any(output.requires_grad for output in vision)
    # measured on this batch: 1.40x now, 1.55x with the vision tower's input hooked
    assert flops_checked / flops_plain < 1.45, flops_checked / flops_plain
    assert loss_checked == pytest.approx(loss_plain, abs=1e-6)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(grads_checked, grads_plain))


def test_the_memory_probe_leaves_room_for_the_optimizer_and_a_margin(dataset, tiny_model, tiny_processor):
    model = lora_model(tiny_model)
    trainable = sum(p.numel() * 4 for p in model.parameters() if p.requires_grad)
    tried = []
    forward = model.forward

    def forward_recording_the_size(**batch):
        tried.append(batch["input_ids"].shape[0])
        return forward(**batch)

    model.forward = forward_recording_the_size
    # weights and activations: 10 units and 1 a sample, where AdamW's two moments take 2 (a unit: the LoRA weights
    # in fp32). 8 samples peak at 18 of the GPU's 20 units: they run, but with the optimizer's 2 they leave none of
    # the 10% margin; 4 samples need 14 + 2
    gpu = FakeGpuMemory(total=20 * trainable, peak_of=lambda: (10 + tried[-1]) * trainable)
    fits = step_plan.memory_probe(model, dataset, CaptionCollator(tiny_processor.tokenizer.pad_token_id, QWEN2_VL), 1,
                              CPU_FP32, memory=gpu)
    cfg = SimpleNamespace(per_device_train_batch_size=4, gradient_accumulation_steps=2, micro_batch_size="auto",
                          gradient_checkpointing="auto")
    assert step_plan.step_plan(cfg, fits) == (4, False)
    assert fits.needed == {(8, False): 20 * trainable, (4, False): 16 * trainable}


def test_cached_features_are_one_memory_mapped_file_that_goes_with_the_run(dataset, tiny_model, tiny_processor,
                                                                           tmp_path):
    model = lora_model(tiny_model)
    features = feature_cache.encode_images(model, tiny_processor, dataset, batch_size=3,
                                   folder=str(tmp_path))
    storages = {feature["image_features"].untyped_storage() for feature in features.values()}
    assert len({storage.data_ptr() for storage in storages}) == 1  # every image's rows in one mapping
    assert next(iter(storages)).filename.startswith(f"{tmp_path}/train-image-features-")
    assert os.listdir(tmp_path) == []  # unlinked once mapped: nothing is left behind, however the run ends


def test_the_feature_cache_is_sized_against_memory_and_disk(dataset, tiny_model, monkeypatch, tmp_path):
    model = lora_model(tiny_model)
    cfg = SimpleNamespace(cache_image_features="auto", per_device_train_batch_size=2, gradient_accumulation_steps=1,
                          max_steps=-1, num_train_epochs=1, image_size=56)
    size = (4 + 3 + 4 + 4) * 64 * 4  # the four images' tokens x width 64 in fp32
    monkeypatch.setattr(feature_cache.tempfile, "gettempdir", lambda: str(tmp_path))

    def readings(memory, disk):
        monkeypatch.setattr(feature_cache.psutil, "virtual_memory", lambda: SimpleNamespace(available=memory))
        monkeypatch.setattr(feature_cache.shutil, "disk_usage", lambda folder: SimpleNamespace(free=disk))
        return feature_cache.use_feature_cache(cfg, dataset, model, None, 1)

    assert readings(3 * size, 10 * size) == (size, str(tmp_path), True)  # one copy per node, held in memory
    assert readings(size, 10 * size) == (size, str(tmp_path), False)  # read back from the local disk
    assert readings(size, size) is None  # no room on the disk either
    cfg.cache_image_features = "true"
    with pytest.raises(PipelineError, match=f"do not fit in the .* free in {tmp_path}: set TMPDIR"):
        readings(size, size)
