"""Qwen3.5 (and Qwen3.6/3.8, its architecture): a tiny model with the real Qwen3.5 tokenizer and the official chat
template, which thinks by default. Training supervises the caption alone after the non-thinking prompt, and every
client that calls the template without arguments gets the trained caption, not a thinking block."""
import json
import os
import re
import subprocess

import pytest
from PIL import Image

from captioning import training_samples
from captioning.chat import (NEVER_THINKS, TEMPLATE_ARGUMENTS, THINKS_ONLY_WHEN_ASKED, build_messages,
                             without_thinking_by_default)
from captioning.errors import PipelineError
from captioning.models import FAMILIES, model_family
from conftest import COLOR_CAPTIONS, REPO, TRAINED, check, run, trained_on_the_colours
from testkit.outside_tools import llama_cpp_tool

ONE_THREAD = {"OMP_NUM_THREADS": "1"}  # the linear attention's reference path: far slower on two threads


def test_a_qwen35_folder_is_the_qwen35_family_with_lora_on_both_kinds_of_attention(qwen35_model):
    family = model_family(qwen35_model)
    assert family is FAMILIES["qwen3_5"] and family.side_multiple == 32
    assert model_family("Qwen/Qwen3.6-4B").name == model_family("Qwen/Qwen3.5-2B").name == "Qwen3.5"
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(qwen35_model)
    targeted = get_peft_model(model, LoraConfig(target_modules=family.lora_target_modules, r=4)).targeted_module_names
    assert all(".language_model." in name for name in targeted)
    assert {name.rsplit(".", 1)[-1] for name in targeted} == {
        "q_proj", "k_proj", "v_proj", "o_proj", "in_proj_qkv", "in_proj_z", "out_proj", "gate_proj", "up_proj",
        "down_proj"}  # not in_proj_a/in_proj_b, not the vision tower's qkv/proj/linear_fc


def test_a_mixture_of_experts_qwen35_is_refused_naming_the_dense_sizes(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen3_5_moe"}))
    with pytest.raises(PipelineError, match="mixture-of-experts models are not supported.*0.8B, 2B, 4B or 9B"):
        model_family(str(tmp_path))


def test_the_official_template_thinks_by_default_and_the_loaded_one_only_when_asked(qwen35_model):
    from transformers import AutoProcessor

    official = AutoProcessor.from_pretrained(qwen35_model)
    prompt = build_messages(None, "COCO Yes:")
    assert official.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False).endswith(
        "<|im_start|>assistant\n<think>\n")
    loaded = without_thinking_by_default(AutoProcessor.from_pretrained(qwen35_model))
    without_arguments = loaded.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
    assert without_arguments.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert without_arguments == official.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False,
                                                             **TEMPLATE_ARGUMENTS)
    assert loaded.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False,
                                      enable_thinking=True).endswith("assistant\n<think>\n")  # still there, if asked


def test_a_template_whose_thinking_cannot_be_switched_off_is_refused(qwen35_model):
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(qwen35_model)
    processor.chat_template = "{% if enable_thinking %}<think>{% endif %}"
    with pytest.raises(PipelineError, match="thinking mode that this project does not know how to switch off"):
        without_thinking_by_default(processor)


def test_only_the_caption_and_its_end_are_supervised_after_the_non_thinking_prompt(qwen35_model):
    from transformers import AutoProcessor

    processor = without_thinking_by_default(AutoProcessor.from_pretrained(qwen35_model))
    tokenizer = processor.tokenizer
    caption = "A man riding a wave on top of a surfboard."
    image = Image.new("RGB", (96, 64), "red")
    answer = training_samples.answer_token_ids(processor, "COCO Yes:", caption)
    sample = training_samples.encode_sample(processor, image, "COCO Yes:", answer)

    supervised = sample["labels"][sample["labels"] != -100].tolist()
    assert supervised == tokenizer(caption, add_special_tokens=False)["input_ids"] + [248046]  # <|im_end|>
    assert tokenizer.decode(supervised) == caption + "<|im_end|>"  # no "</think>" in what the model learns
    whole = processor.apply_chat_template(build_messages(image, "COCO Yes:", caption), tokenize=False,
                                          **TEMPLATE_ARGUMENTS)
    assert whole.endswith("<think>\n\n</think>\n\n" + caption + "<|im_end|>\n")
    encoded = processor(text=[whole.removesuffix("\n")], images=[image], return_tensors="pt")
    assert sample["input_ids"].tolist() == encoded["input_ids"][0].tolist()
    assert (sample["image_grid_thw"] == encoded["image_grid_thw"]).all()


@pytest.fixture(scope="module")
def trained(qwen35_model, tmp_path_factory):
    """The tiny Qwen3.5 trained through the scripts on the colour photos of several shapes, and merged."""
    work = tmp_path_factory.mktemp("qwen35_run")
    trained_on_the_colours(work, qwen35_model, "--image_size=64", "--dataloader_num_workers=0", env=ONE_THREAD)
    check(run("merge.py", cwd=work, env=ONE_THREAD))
    return work, [str(work / "coco_2014_caption" / f"{color}.jpg") for color in TRAINED]


def test_qwen35_learns_its_captions_and_serves_them_without_thinking(trained):
    """infer.py gives each training caption, and so does a plain transformers client of the merged folder that
    calls the template without arguments."""
    work, photos = trained
    run_config = json.loads((work / "output" / "Qwen2-VL-2B" / "run_config.json").read_text())
    assert (run_config["family"], run_config["image_size"]) == ("Qwen3.5", 64)
    check(run("infer.py", f"--images={','.join(photos)}", "--output_path=adapter.jsonl", cwd=work,
              env=ONE_THREAD))
    captions = [json.loads(line)["caption"] for line in (work / "adapter.jsonl").read_text().splitlines()]
    assert captions == [COLOR_CAPTIONS[color] for color in TRAINED]

    merged = work / "output" / "Qwen2-VL-2B-merged"
    client = check(run(os.path.join("tests", "caption_as_a_client.py"), str(merged), "COCO Yes:", *photos,
                       cwd=REPO, env=ONE_THREAD))
    served = json.loads(client.stdout.strip().splitlines()[-1])["captions"]
    for color, photo in zip(TRAINED, photos):
        assert served[photo]["model"] == served[photo]["pipeline"] == COLOR_CAPTIONS[color], photo
    assert "enable_thinking is defined and enable_thinking) %}" in (merged / "chat_template.jinja").read_text()


@pytest.fixture(scope="module")
def exported(trained, llama_cpp):
    work, _ = trained
    exporting = check(run("export_gguf.py", f"--llama_cpp={llama_cpp}", "--outtypes=f16", cwd=work))
    return work / "output" / "Qwen2-VL-2B-gguf", exporting.stdout


def test_qwen35_exports_to_gguf_with_a_template_that_does_not_think(exported):
    from gguf import GGUFReader

    gguf_dir, _ = exported
    text = GGUFReader(gguf_dir / "model-f16.gguf")
    assert text.fields["general.architecture"].contents() == text.fields["tokenizer.ggml.pre"].contents() == "qwen35"
    assert text.fields["tokenizer.ggml.eos_token_id"].contents() == 248046  # <|im_end|>
    template = text.fields["tokenizer.chat_template"].contents()  # llama-mtmd-cli passes it enable_thinking=true
    assert NEVER_THINKS in template and THINKS_ONLY_WHEN_ASKED not in template and "<|vision_start|>" in template
    mmproj = GGUFReader(gguf_dir / "mmproj-f16.gguf")
    assert mmproj.fields["clip.projector_type"].contents() == "qwen3vl_merger"
    assert mmproj.fields["clip.vision.image_size"].contents() == 64
    modelfile = (gguf_dir / "Modelfile").read_text()  # Ollama's turns: no system turn, the empty thinking block
    assert '{{ end }}<|im_start|>assistant\n<think>\n\n</think>\n\n"""' in modelfile and "SYSTEM" not in modelfile


@pytest.mark.slow
def test_llama_mtmd_cli_captions_the_qwen35_gguf_as_infer_does(trained, exported, llama_cpp):
    """llama-mtmd-cli with the options export_gguf.py prints applies the GGUF's own template (--jinja; without it, its
    built-in ChatML leaves out the empty thinking block), which answers after that block although llama-mtmd-cli
    asks it to think: the trained caption."""
    work, photos = trained
    gguf_dir, exporting = exported
    [bounds] = re.findall(r"--jinja --temp 0 (--image-min-tokens \d+ --image-max-tokens \d+)", exporting)
    cli = llama_cpp_tool("llama-mtmd-cli")
    for color, photo in zip(TRAINED, photos):
        captioned = subprocess.run([cli, "-m", gguf_dir / "model-f16.gguf", "--mmproj", gguf_dir / "mmproj-f16.gguf",
                                    "--image", photo, "-p", "COCO Yes:", "--jinja", "--temp", "0", "-n", "16",
                                    *bounds.split()],
                                   capture_output=True, text=True, timeout=300, env={**os.environ, **ONE_THREAD})
        assert captioned.returncode == 0, captioned.stderr[-3000:]
        assert captioned.stdout.strip() == COLOR_CAPTIONS[color], color + captioned.stdout + captioned.stderr[-2000:]
