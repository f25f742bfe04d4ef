"""The fast path computes what the recipe's path computes: same inputs, same loss on the same batch, and
gradient checkpointing changes nothing but memory and time."""
import pytest
import torch
from PIL import Image

import train
from bench.bench import recipe_collator, recipe_process_func

CAPTIONS = ["a red square on a table", "a green field under the sky", "a blue boat", "a yellow cat sleeping"]


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
        ours = train.encode_sample(tiny_processor, train.load_image(str(path), 56), "COCO Yes:", caption)
        encoded.append((recipe, ours))
    return encoded


def test_on_the_fly_preprocessing_gives_the_recipe_s_tensors(samples, tiny_processor):
    im_end = tiny_processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    for recipe, ours in samples:
        assert torch.equal(recipe["pixel_values"], ours["pixel_values"])  # the .tolist() round trip loses nothing
        assert recipe["image_grid_thw"].tolist() == ours["image_grid_thw"][0].tolist()
        # the same tokens, except the one the model learns to stop with: the recipe supervises the pad token
        assert torch.equal(recipe["input_ids"][:-1], ours["input_ids"][:-1])
        assert (recipe["labels"][-1].item(), ours["labels"][-1].item()) == (tiny_processor.tokenizer.pad_token_id,
                                                                            im_end)


def test_the_collators_give_the_same_loss_on_the_same_batch(samples, tiny_model, tiny_processor):
    from transformers import Qwen2VLForConditionalGeneration

    model = Qwen2VLForConditionalGeneration.from_pretrained(tiny_model).eval()
    ours = [sample for _, sample in samples]
    theirs = [{key: value[0] if key in ("image_grid_thw",) else value for key, value in sample.items()}
              for sample in ours]  # the recipe's per-sample layout: image_grid_thw squeezed
    with torch.no_grad():
        fast = model(**train.CaptionCollator(tiny_processor.tokenizer.pad_token_id)(ours)).loss
        recipe = model(**recipe_collator(tiny_processor)(theirs)).loss
    assert fast.item() == pytest.approx(recipe.item(), abs=1e-6)


def test_gradient_checkpointing_changes_neither_loss_nor_gradients(samples, tiny_model, tiny_processor):
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen2VLForConditionalGeneration

    batch = train.CaptionCollator(tiny_processor.tokenizer.pad_token_id)([sample for _, sample in samples])
    results = []
    for checkpointing in (True, False):
        torch.manual_seed(0)
        model = Qwen2VLForConditionalGeneration.from_pretrained(tiny_model)
        if checkpointing:
            model.enable_input_require_grads()
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model = get_peft_model(model, LoraConfig(target_modules=train.LORA_TARGET_MODULES, r=8, lora_dropout=0,
                                                 init_lora_weights=False))
        model.train()
        loss = model(**batch).loss
        loss.backward()
        results.append((loss.item(), [p.grad.clone() for p in model.parameters() if p.requires_grad]))
    (loss_with, grads_with), (loss_without, grads_without) = results
    assert loss_with == pytest.approx(loss_without, abs=1e-6)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(grads_with, grads_without))


def test_the_benchmark_runs_end_to_end_on_a_cpu(tmp_path):
    import json

    from conftest import run

    result = run("bench/bench.py", "--images=32", "--train_steps=1", "--warmup_steps=1", "--caption_images=2",
                 "--max_new_tokens=4", f"--output={tmp_path}/results.json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-5000:]
    results = json.loads((tmp_path / "results.json").read_text())
    for group, paths in {"data": ("recipe", "project"), "train": ("recipe", "project"),
                         "caption": ("one_at_a_time", "batched")}.items():
        assert set(results[group]) == set(paths), group
    assert results["data"]["recipe"]["first_batch_pixel_rows"] == results["data"]["project"]["first_batch_pixel_rows"]
    assert results["caption"]["one_at_a_time"]["captions"] == results["caption"]["batched"]["captions"]
    assert "| training: samples/s" in result.stdout and "captions identical batched and one at a time: yes" in result.stdout
