"""train.py's parts: split by image, the label mask, the collator with mixed image sizes, skipping long samples."""
import json
import os

import pytest
import torch
from PIL import Image

import train
from captioning.data import read_conversations
from captioning.errors import PipelineError
from captioning.images import ImageGeometry
from captioning.tracking import start_swanlab, swanlab_run_mode
from captioning import training_samples
from captioning.models import model_family
from captioning.training_samples import CaptionCollator, CaptionDataset


def sample(image_path, caption, prompt="COCO Yes:"):
    return {"image_path": image_path, "prompt": prompt, "caption": caption}


def encode(processor, image, caption, prompt="COCO Yes:"):
    answer = training_samples.answer_token_ids(processor, prompt, caption)
    return training_samples.encode_sample(processor, image, prompt, answer)


def test_split_holds_out_the_last_distinct_images_with_all_their_captions():
    samples = [sample("a", "1"), sample("b", "2"), sample("a", "3"), sample("c", "4"), sample("d", "5"),
               sample("c", "6"), sample("b", "7")]
    train_part, test_part = train.split_by_image(samples, test_size=2)
    assert [s["caption"] for s in test_part] == ["4", "5", "6"]  # images c and d, every caption of them
    assert [s["caption"] for s in train_part] == ["1", "2", "3", "7"]
    assert not {s["image_path"] for s in train_part} & {s["image_path"] for s in test_part}

    with pytest.raises(PipelineError, match="4 distinct images, but test_size=4"):
        train.split_by_image(samples, test_size=4)


def test_reads_the_prompt_and_image_from_the_recipe_json(tmp_path):
    entries = [{"id": "identity_1", "conversations": [
        {"from": "user", "value": "COCO Yes: <|vision_start|>/data/x.jpg<|vision_end|>"},
        {"from": "assistant", "value": "A cat."}]}]
    (tmp_path / "data.json").write_text(json.dumps(entries))
    [read] = read_conversations(str(tmp_path / "data.json"))
    assert (read["image_path"], read["prompt"], read["caption"]) == ("/data/x.jpg", "COCO Yes:", "A cat.")


def test_only_the_caption_and_end_of_turn_are_supervised(family_processor, family_side):
    tokenizer = family_processor.tokenizer
    caption = "a red square on a table"
    encoded = encode(family_processor, Image.new("RGB", (family_side, family_side), "red"), caption)

    expected = tokenizer(caption, add_special_tokens=False)["input_ids"] + [tokenizer.convert_tokens_to_ids("<|im_end|>")]
    labels, input_ids = encoded["labels"].tolist(), encoded["input_ids"].tolist()
    prompt_length = len(labels) - len(expected)
    assert labels == [-100] * prompt_length + expected
    assert input_ids[prompt_length:] == expected
    prompt = tokenizer.decode(input_ids[:prompt_length])
    assert prompt.endswith("COCO Yes:<|im_end|>\n<|im_start|>assistant\n")
    assert input_ids.count(tokenizer.convert_tokens_to_ids("<|image_pad|>")) == 4  # 4x4 patches merged 2x2
    assert len(encoded["attention_mask"]) == len(input_ids) == len(encoded["mm_token_type_ids"])


def per_sample_losses(model, batch):
    logits = model(**{k: v for k, v in batch.items() if k not in ("labels", "logits_to_keep", "shift_labels")}).logits[:, :-1]
    labels = batch["labels"][:, 1:]
    token_losses = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels, reduction="none")
    mask = labels != -100
    return (token_losses * mask).sum(1) / mask.sum(1)


def test_a_batch_of_two_image_sizes_gives_each_sample_its_own_loss(family_model, family_processor, family_side):
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(family_model).eval()
    collate = CaptionCollator(family_processor.tokenizer.pad_token_id, model_family(family_model))
    small = encode(family_processor, Image.new("RGB", (family_side, family_side), "red"), "a red square")
    large = encode(family_processor, Image.new("RGB", (family_side * 2, family_side * 3 // 2), "blue"),
                   "a blue boat on the water, far away")
    batch = collate([small, large])
    assert batch["pixel_values"].shape[0] == small["pixel_values"].shape[0] + large["pixel_values"].shape[0]
    assert batch["image_grid_thw"].tolist() == [[1, 4, 4], [1, 6, 8]]  # (frames, rows, columns) of patches

    with torch.no_grad():
        together = per_sample_losses(model, batch)
        alone = [model(**collate([s])).loss for s in (small, large)]
    assert together.tolist() == pytest.approx([loss.item() for loss in alone], abs=1e-5)


def test_samples_too_long_or_without_image_are_skipped_and_reported(tmp_path, tiny_processor):
    image = str(tmp_path / "a.jpg")
    Image.new("RGB", (56, 56)).save(image)
    prompt = training_samples.prompt_inputs(tiny_processor, Image.new("RGB", (56, 56)), "COCO Yes:")
    prompt_length = prompt["input_ids"].shape[1]
    short = "a cat"
    max_length = prompt_length + len(training_samples.answer_token_ids(tiny_processor, "COCO Yes:", short))
    dataset = CaptionDataset(
        [sample(image, short), sample(image, "a very long caption " * 20), sample(str(tmp_path / "gone.jpg"), short)],
        tiny_processor, ImageGeometry(56, 28), max_length=max_length,
    )
    assert [s["caption"] for s in dataset.samples] == [short]
    assert len(dataset[0]["input_ids"]) == max_length
    long_length = max_length - len(training_samples.answer_token_ids(tiny_processor, "COCO Yes:", short)) + len(
        training_samples.answer_token_ids(tiny_processor, "COCO Yes:", "a very long caption " * 20))
    assert dataset.skipped[0] == f"{long_length} tokens > max_length={max_length}: {image}"
    assert dataset.skipped[1] == f"image not found: {tmp_path}/gone.jpg"


def test_lora_adapts_only_the_language_model(family_model):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(family_model)
    family = model_family(family_model)
    layers = {name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)
              and ".language_model." in name and name.rsplit(".", 1)[-1] in family.lora_layers}
    lora = get_peft_model(model, LoraConfig(target_modules=family.lora_target_modules, r=4))
    adapted = {name.removeprefix("base_model.model.").removesuffix(".lora_A") for name, _ in lora.named_modules()
               if name.endswith("lora_A")}
    assert adapted == layers  # each of the family's layers in the language model: never Qwen2.5-VL's vision MLPs
    assert sum(name.endswith("mlp.down_proj") for name in adapted) == model.config.text_config.num_hidden_layers


def test_the_family_comes_from_config_json_and_sets_the_image_size(family_model, tmp_path):
    from captioning.models import FAMILIES, checked_image_size, model_family

    family = model_family(family_model)
    with open(os.path.join(family_model, "config.json")) as file:
        assert family == FAMILIES[json.load(file)["model_type"]]
    assert checked_image_size(0, family) == {"Qwen2-VL": 280, "Qwen2.5-VL": 280, "Qwen3-VL": 288,
                                                 "Qwen3.5": 288}[family.name]
    assert model_family("Qwen/Qwen2.5-VL-3B-Instruct").name == "Qwen2.5-VL"  # a hub id, before it is downloaded
    (tmp_path / "config.json").write_text('{"model_type": "llava"}')
    with pytest.raises(PipelineError, match=r"holds a 'llava' model; this project fine-tunes Qwen2-VL, Qwen2.5-VL, "
                                            r"Qwen3-VL"):
        model_family(str(tmp_path))


def test_swanlab_follows_its_environment_variables(monkeypatch):
    import swanlab

    monkeypatch.delenv("SWANLAB_PROJ_NAME", raising=False)  # so that the one set below is removed afterwards
    monkeypatch.setenv("SWANLAB_MODE", "offline")
    monkeypatch.setenv("SWANLAB_PROJECT", "my-project")
    assert swanlab_run_mode("auto") == "offline"
    assert swanlab_run_mode("disabled") == "disabled"  # a setting given outright wins
    assert "SWANLAB_PROJECT" not in os.environ and os.environ["SWANLAB_PROJ_NAME"] == "my-project"
    swanlab.Settings()  # which SWANLAB_PROJECT=my-project would stop with a SettingsError
    calls = []
    monkeypatch.setattr(swanlab, "init", lambda **kwargs: calls.append(kwargs))
    start_swanlab("offline", "Qwen2-VL-finetune", "Qwen2-VL-finetune", "run", {}, "abc123")
    start_swanlab("offline", "chosen", "Qwen2-VL-finetune", "run", {})
    assert [(call["project"], call["id"], call["resume"]) for call in calls] == [
        ("my-project", "abc123", "allow"), ("chosen", None, None)]
    monkeypatch.setenv("SWANLAB_MODE", "web")
    with pytest.raises(PipelineError, match="SWANLAB_MODE=web: use cloud, local, offline or disabled"):
        swanlab_run_mode("auto")


def test_swanlab_modes():
    assert swanlab_run_mode("cloud") == "online"
    assert swanlab_run_mode("local") == "local"
    assert swanlab_run_mode("disabled") == "disabled"
    with pytest.raises(PipelineError, match="use auto, cloud, local, offline or disabled"):
        swanlab_run_mode("loud")
