"""The four scripts in sequence, as a user runs them, on the tiny model: the model learns the captions."""
import glob
import json
import os
import re
import socket
import subprocess
import sys
import time

import pytest
import yaml
from PIL import Image

import train
from captioning.settings import parse_settings
from conftest import REPO, COLOR_CAPTIONS, TRAINED, check, chromium, copy_of, make_imagefolder, run
from testkit.outside_tools import OLDER_TRANSFORMERS, transformers_release
from testkit.tiny_models import BUILDERS



@pytest.fixture(scope="module")
def trained_run(colour_run, tmp_path_factory):
    work = copy_of(colour_run, tmp_path_factory, "pipeline")
    return work, (work / "train.log").read_text()


def test_run_config_records_every_setting_and_replays_them(trained_run):
    work, _ = trained_run
    run_config = json.loads((work / "output" / "Qwen2-VL-2B" / "run_config.json").read_text())
    assert run_config["save_total_limit"] == 5 and run_config["swanlab_mode"] == "local"  # a TrainingArguments field
    replayed = parse_settings(vars(train), [f"--config={work}/output/Qwen2-VL-2B/run_config.json"],
                              train.training_arguments)
    assert vars(replayed) == {name: run_config[name] for name in vars(replayed)}
    assert set(run_config) - set(vars(replayed)) == {"family", "prompt", "train_json", "test_json", "swanlab_mode_used",
                                                     "swanlab_run_id", "world_size", "micro_batch_size_used",
                                                     "gradient_checkpointing_used", "image_features_cached",
                                                     "precision_used", "attention_used"}
    assert (run_config["precision_used"], run_config["attention_used"]) == ("fp32", "sdpa")  # on a CPU


def test_each_step_writes_what_the_next_one_reads(trained_run):
    work, training = trained_run
    assert len(os.listdir(work / "coco_2014_caption")) == 6
    conversations = json.loads((work / "data_vl.json").read_text())
    assert len(conversations) == 6
    train_images = {c["conversations"][0]["value"] for c in json.loads((work / "data_vl_train.json").read_text())}
    test_images = {c["conversations"][0]["value"] for c in json.loads((work / "data_vl_test.json").read_text())}
    assert len(train_images) == 4 and len(test_images) == 2 and not train_images & test_images

    output = work / "output" / "Qwen2-VL-2B"
    for name in ("adapter_config.json", "adapter_model.safetensors", "run_config.json", "tokenizer.json",
                 "processor_config.json", "chat_template.jinja"):
        assert (output / name).is_file(), name
    assert sorted(p for p in os.listdir(output) if p.startswith("checkpoint-")) == ["checkpoint-100", "checkpoint-150"]
    run_config = json.loads((output / "run_config.json").read_text())
    assert (run_config["prompt"], run_config["image_size"], run_config["learning_rate"]) == ("COCO Yes:", 56, 5e-3)
    # SwanLab's local run holds the settings used and the held-out images with their generated captions
    [swanlab_run] = glob.glob(str(work / "swanlog" / "run-*"))
    config = yaml.safe_load(open(os.path.join(swanlab_run, "files", "config.yaml")))
    assert (config["lora_dropout"]["value"], config["prompt"]["value"]) == (0.05, "COCO Yes:")
    media = [json.loads(line) for path in glob.glob(os.path.join(swanlab_run, "logs", "*", "*.log"))
             for line in open(path) if '"caption"' in line]
    assert len(media) == 1 and len(media[0]["data"]) == 2 and all(item["caption"] for item in media[0]["more"])

    # after training, the held-out images are captioned and printed, as the recipe does
    for color in ("white", "black"):
        assert f"coco_2014_caption/{color}.jpg: " in training


def test_training_lowers_the_loss(trained_run):
    work, _ = trained_run
    state = json.loads((work / "output" / "Qwen2-VL-2B" / "checkpoint-150" / "trainer_state.json").read_text())
    losses = [entry["loss"] for entry in state["log_history"] if "loss" in entry]
    assert len(losses) == 16  # step 1, then every 10 steps
    assert losses[-1] < losses[0] - 0.5, losses


def test_infer_returns_exactly_the_trained_captions(trained_run):
    work, _ = trained_run
    images = ",".join(str(work / "coco_2014_caption" / f"{color}.jpg") for color in TRAINED)
    result = check(run("infer.py", f"--images={images}", "--batch_size=3", cwd=work))
    written = work / "output" / "Qwen2-VL-2B" / "predictions.jsonl"  # next to the newest adapter
    records = [json.loads(line) for line in written.read_text().splitlines()]
    assert [(os.path.basename(r["image_path"]), r["caption"]) for r in records] == [
        (f"{color}.jpg", COLOR_CAPTIONS[color]) for color in TRAINED
    ]
    assert {(r["adapter"], os.path.isabs(r["model"])) for r in records} == {(str(written.parent), True)}
    assert f"wrote 4 captions to {os.path.join('output', 'Qwen2-VL-2B', 'predictions.jsonl')}" in result.stdout
    assert f"{images.split(',')[0]}: {COLOR_CAPTIONS['red']}" in result.stdout


def test_infer_defaults_to_the_held_out_images_and_survives_bad_ones(trained_run, tiny_model):
    work, _ = trained_run
    check(run("infer.py", "--output_path=held_out.jsonl", cwd=work))
    records = [json.loads(line) for line in (work / "held_out.jsonl").read_text().splitlines()]
    assert [os.path.basename(r["image_path"]) for r in records] == ["white.jpg", "black.jpg"]

    (work / "broken.jpg").write_bytes(b"not a jpeg")
    result = check(run("infer.py", "--images=missing.jpg,broken.jpg,coco_2014_caption/red.jpg",
                       "--output_path=mixed.jsonl", "--checkpoint=output/Qwen2-VL-2B/checkpoint-150", cwd=work))
    assert "skipped: image not found: missing.jpg" in result.stdout
    assert "skipped: cannot read image broken.jpg" in result.stdout
    records = [json.loads(line) for line in (work / "mixed.jsonl").read_text().splitlines()]
    assert records == [{"image_path": "coco_2014_caption/red.jpg", "caption": COLOR_CAPTIONS["red"],
                        "model": str(tiny_model), "adapter": str(work / "output" / "Qwen2-VL-2B" / "checkpoint-150")}]


@pytest.fixture(scope="module")
def merged_dir(trained_run):
    work, _ = trained_run
    check(run("merge.py", "--dtype=float32", cwd=work))
    return work / "output" / "Qwen2-VL-2B-merged"


def test_merged_model_equals_base_plus_adapter_and_needs_no_peft(trained_run, tiny_model, merged_dir):
    work, _ = trained_run
    for name in ("model.safetensors", "config.json", "generation_config.json", "tokenizer.json", "chat_template.jinja",
                 "processor_config.json", "run_config.json"):
        assert (merged_dir / name).is_file(), name

    import torch
    from peft import PeftModel
    from transformers import AutoProcessor, Qwen2VLForConditionalGeneration

    from captioning.chat import build_messages
    from captioning.images import ImageGeometry, load_image

    processor = AutoProcessor.from_pretrained(merged_dir)
    image = load_image(str(work / "coco_2014_caption" / "red.jpg"), ImageGeometry(56, 28))
    text = processor.apply_chat_template(build_messages(image, "COCO Yes:", "a red square"), tokenize=False)
    inputs = processor(text=[text], images=[image], return_tensors="pt")
    with torch.no_grad():
        merged_logits = Qwen2VLForConditionalGeneration.from_pretrained(merged_dir)(**inputs).logits
        adapter = PeftModel.from_pretrained(Qwen2VLForConditionalGeneration.from_pretrained(tiny_model),
                                            str(work / "output" / "Qwen2-VL-2B"))
        adapter_logits = adapter(**inputs).logits
    assert torch.allclose(merged_logits, adapter_logits, atol=1e-4)
    assert not torch.allclose(merged_logits, Qwen2VLForConditionalGeneration.from_pretrained(tiny_model)(**inputs).logits,
                              atol=1e-2)  # the adapter did change the model

    plain = subprocess.run([sys.executable, "-c", (
        "import sys\n"
        "from transformers import AutoProcessor, Qwen2VLForConditionalGeneration\n"
        f"Qwen2VLForConditionalGeneration.from_pretrained({str(merged_dir)!r}); AutoProcessor.from_pretrained({str(merged_dir)!r})\n"
        "assert 'peft' not in sys.modules\n")], capture_output=True, text=True)
    assert plain.returncode == 0, plain.stderr[-3000:]

    images = ",".join(str(work / "coco_2014_caption" / f"{color}.jpg") for color in COLOR_CAPTIONS)
    check(run("infer.py", f"--model={merged_dir}", f"--images={images}", "--output_path=merged.jsonl", cwd=work))
    check(run("infer.py", f"--images={images}", "--output_path=adapter.jsonl", cwd=work))
    def captions(name):
        return [(record["image_path"], record["caption"]) for record in map(json.loads, (work / name).open())]

    assert captions("merged.jsonl") == captions("adapter.jsonl")
    assert (images.split(",")[0], COLOR_CAPTIONS["red"]) in captions("merged.jsonl")


def test_merged_and_adapter_folders_carry_the_training_image_size_and_the_files_older_readers_need(
        trained_run, merged_dir, tiny_model):
    work, _ = trained_run
    for folder in (merged_dir, work / "output" / "Qwen2-VL-2B"):
        preprocessor = json.loads((folder / "preprocessor_config.json").read_text())
        assert (preprocessor["min_pixels"], preprocessor["max_pixels"]) == (28 * 28, 56 * 56)  # one merged patch
        assert preprocessor["size"] == {"shortest_edge": 28 * 28, "longest_edge": 56 * 56}
        processor = json.loads((folder / "processor_config.json").read_text())["image_processor"]
        assert processor["size"] == {"shortest_edge": 28 * 28, "longest_edge": 56 * 56}
        for name in ("vocab.json", "merges.txt"):  # kept from the base model, as on the hub
            assert (folder / name).read_bytes() == open(os.path.join(tiny_model, name), "rb").read(), name
        modes = {path.name: oct(path.stat().st_mode & 0o777) for path in folder.iterdir() if path.is_file()}
        assert set(modes.values()) == {"0o644"}, modes
    config = json.loads((merged_dir / "config.json").read_text())
    assert config["text_config"]["rope_scaling"] == config["rope_scaling"] == {"type": "mrope",
                                                                               "mrope_section": [2, 3, 3]}
    assert config["text_config"]["tie_word_embeddings"] is True
    checkpoint = work / "output" / "Qwen2-VL-2B" / "checkpoint-150"
    processor = json.loads((checkpoint / "processor_config.json").read_text())
    assert processor["image_processor"]["size"]["longest_edge"] == 56 * 56
    assert oct((checkpoint / "adapter_model.safetensors").stat().st_mode & 0o777) == "0o644"


def full_size_images(work):
    """Photos as users give them to a served model: far larger than the 56x56 training size."""
    paths = {}
    for color, size in (("red", (640, 640)), ("blue", (640, 480))):
        paths[color] = str(work / f"full_size_{color}.jpg")
        Image.new("RGB", size, color).save(paths[color])
    return paths


def caption_as_a_client(merged_dir, images, pythonpath=None):
    """{image: {"image_grid_thw", "model", "pipeline"}} from tests/caption_as_a_client.py, and the transformers
    version that made them."""
    env = {**os.environ, **({"PYTHONPATH": pythonpath} if pythonpath else {})}
    result = subprocess.run([sys.executable, os.path.join(os.path.dirname(__file__), "caption_as_a_client.py"),
                             str(merged_dir), "COCO Yes:", *images], capture_output=True, text=True, env=env,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-5000:]
    answer = json.loads(result.stdout.splitlines()[-1])
    return answer["captions"], answer["transformers"]


def test_merged_model_captions_every_photo_in_transformers_as_infer_does(trained_run, merged_dir):
    """The trained photos (each of another shape) and full-size ones, each given to transformers at its own size:
    the same grid as training's and the same caption as infer.py's."""
    from captioning.images import ImageGeometry

    work, _ = trained_run
    trained = {color: str(work / "coco_2014_caption" / f"{color}.jpg") for color in TRAINED}
    full_size = full_size_images(work)
    photos = [*trained.values(), *full_size.values()]
    check(run("infer.py", f"--model={merged_dir}", f"--images={','.join(photos)}", "--output_path=all.jsonl",
              cwd=work))
    by_infer = {record["image_path"]: record["caption"]
                for record in map(json.loads, (work / "all.jsonl").read_text().splitlines())}
    assert [by_infer[trained[color]] for color in TRAINED] == [COLOR_CAPTIONS[color] for color in TRAINED]
    assert by_infer[full_size["red"]] == COLOR_CAPTIONS["red"]  # 640x640 is sized 56x56, as the red square was

    geometry = ImageGeometry(56, 28)
    by_client, _ = caption_as_a_client(merged_dir, photos)
    for path in photos:
        width, height = geometry.size_of(*Image.open(path).size)
        assert by_client[path]["image_grid_thw"] == [[1, height // 14, width // 14]], path  # training's grid
        assert by_client[path]["model"] == by_client[path]["pipeline"] == by_infer[path], path
    assert len({str(by_client[path]["image_grid_thw"]) for path in photos}) >= 4  # shapes that differ


def test_verify_shows_each_engine_agreeing_and_why_it_skipped_the_others(trained_run, merged_dir):
    """verify.py after merge.py: transformers on the merged folder gives infer.py's captions of the training photos
    (each of another shape), scored against their captions; the engines not here are named with what to do."""
    work, _ = trained_run
    result = check(run("verify.py", "--images=data_vl_train.json", "--max_new_tokens=16", "--report_dir=verified",
                       f"--merged_dir={merged_dir}", "--gguf_dir=no-gguf-here", cwd=work))
    rows = {row["engine"]: row for row in json.loads((work / "verified" / "verify.json").read_text())["engines"]}
    assert [(row["equal"], row["of"]) for row in rows.values()] == [(4, 4), (4, 4)]  # infer.py, transformers
    assert rows["transformers (merged)"]["CIDEr-D"] == rows["infer.py (adapter)"]["CIDEr-D"] > 1  # its captions
    assert "| transformers (merged)        |        4/4" in result.stdout
    skipped = json.loads((work / "verified" / "verify.json").read_text())["skipped"]
    assert skipped["vLLM (merged)"].startswith("vLLM is not installed here: pip install vllm")
    assert skipped["server"].startswith("no --server given: start one (vllm serve MERGED_DIR")
    assert skipped["llama-mtmd-cli (GGUF)"].startswith("llama-mtmd-cli is not on PATH")
    page = (work / "verified" / "verify.html").read_text()
    assert page.count("<img src='data:image/jpeg;base64,") == 4 and "class=differs" not in page


def test_verify_catches_a_model_served_without_its_training(trained_run, tiny_model, tmp_path, file_server):
    """The base model where the merged one belongs (an adapter served without its LoRA): a non-zero exit that shows
    the first caption that differs beside infer.py's. A server that answers with an error is a failure, not a skip."""
    work, _ = trained_run
    result = run("verify.py", "--images=data_vl_train.json", "--max_new_tokens=16", f"--report_dir={tmp_path}",
                 f"--merged_dir={tiny_model}", f"--server={file_server.url}", cwd=work)
    assert result.returncode == 1
    assert "transformers (merged) gave other captions than infer.py" in result.stderr
    assert "\nerror: server failed (the table above says why); transformers (merged) gave" in result.stderr
    assert f"FAILED server: {file_server.url} answered HTTP 404: " in result.stdout
    assert re.search(r"transformers \(merged\) differs first on \S*coco_2014_caption/red\.jpg:", result.stdout)
    assert f"  infer.py: {COLOR_CAPTIONS['red']!r}\n  transformers (merged): '" in result.stdout
    row = json.loads((tmp_path / "verify.json").read_text())["engines"][1]
    assert row["equal"] < row["of"] == 4 and row["first_difference"]["engine"] != row["first_difference"]["reference"]


@pytest.mark.slow
@pytest.mark.parametrize("spec", OLDER_TRANSFORMERS, ids=["4.57", "vLLM's pin"])
def test_merged_model_captions_full_size_images_in_older_transformers(trained_run, merged_dir, spec):
    work, _ = trained_run
    photos = [str(work / "coco_2014_caption" / f"{color}.jpg") for color in TRAINED]
    by_client, version = caption_as_a_client(merged_dir, photos, pythonpath=transformers_release(spec))
    assert version != "5.24.0"
    by_newest, _ = caption_as_a_client(merged_dir, photos)
    assert by_client == by_newest  # the same grids and captions
    assert [by_client[path]["model"] for path in photos] == [COLOR_CAPTIONS[color] for color in TRAINED]


@pytest.mark.skipif(not chromium(), reason="Chromium is not installed: .ci/run installs it")
def test_compare_scores_base_and_fine_tuned_and_writes_a_report_that_renders(trained_run, tmp_path):
    work, _ = trained_run
    result = check(run("compare.py", "--max_new_tokens=16", "--swanlab_mode=local", cwd=work))
    assert "CIDEr-D" in result.stdout and "images/s" in result.stdout
    report_dir = work / "output" / "Qwen2-VL-2B" / "eval"
    metrics = json.loads((report_dir / "metrics.json").read_text())
    assert set(metrics["metrics"]) == {"base", "fine_tuned"}
    assert [os.path.basename(image["image_path"]) for image in metrics["images"]] == ["white.jpg", "black.jpg"]
    assert metrics["images"][0]["references"] == [COLOR_CAPTIONS["white"]]
    assert metrics["approximate"] is None and metrics["tokenizer"] == "PTB (Java)"  # Java from the requirements
    for scores in metrics["metrics"].values():
        assert scores["SPICE"] is None and all(scores[name] is not None for name in ("BLEU-4", "METEOR", "CIDEr-D"))

    browser = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-sync",
               "--disable-background-networking", "--disable-component-update", f"--user-data-dir={tmp_path}/profile"]
    page = (report_dir / "report.html").as_uri()
    dom = subprocess.run([*browser, "--dump-dom", page], capture_output=True, text=True, timeout=120).stdout
    assert dom.count("class=\"image-row\"") == 2 and dom.count("<tr><th>CIDEr-D</th>") == 1
    subprocess.run([*browser, f"--screenshot={tmp_path}/report.png", "--window-size=1200,900", page],
                   capture_output=True, timeout=120)
    from PIL import Image, ImageStat
    with Image.open(tmp_path / "report.png") as screenshot:
        assert screenshot.size == (1200, 900) and max(ImageStat.Stat(screenshot.convert("L")).stddev) > 10


def test_compare_refuses_training_images(trained_run):
    work, _ = trained_run
    result = run("compare.py", "--eval_json=data_vl_train.json", "--swanlab_mode=disabled", cwd=work)
    assert result.returncode == 1
    assert "evaluation images are also training images" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.slow  # a minute each; make test checks every family in process (test_train.py, test_speed.py, ...)
@pytest.mark.parametrize("family, name, side", [("qwen2_5_vl", "Qwen2.5-VL", 56), ("qwen3_vl", "Qwen3-VL", 64)])
def test_a_newer_family_runs_the_four_steps_learns_its_captions_and_merges(family, name, side, tmp_path):
    """The same steps as above for Qwen2.5-VL and Qwen3-VL: only --model changes."""
    model = BUILDERS[family](str(tmp_path / family))
    check(run("data2csv.py", f"--source={make_imagefolder(tmp_path / 'source')}", cwd=tmp_path))
    check(run("csv2json.py", cwd=tmp_path))
    check(run("train.py", f"--model={model}", "--test_size=2", f"--image_size={side}", "--max_steps=150",
              "--learning_rate=5e-3", "--per_device_train_batch_size=2", "--gradient_accumulation_steps=1",
              "--save_steps=1000", "--swanlab_mode=disabled", cwd=tmp_path))
    run_config = json.loads((tmp_path / "output" / "Qwen2-VL-2B" / "run_config.json").read_text())
    assert (run_config["family"], run_config["image_size"]) == (name, side)

    images = ",".join(str(tmp_path / "coco_2014_caption" / f"{color}.jpg") for color in TRAINED)
    check(run("infer.py", f"--images={images}", "--output_path=adapter.jsonl", cwd=tmp_path))
    check(run("merge.py", cwd=tmp_path))
    check(run("infer.py", "--model=output/Qwen2-VL-2B-merged", f"--images={images}", "--output_path=merged.jsonl",
              cwd=tmp_path))
    for written in ("adapter.jsonl", "merged.jsonl"):
        captions = [json.loads(line)["caption"] for line in (tmp_path / written).read_text().splitlines()]
        assert captions == [COLOR_CAPTIONS[color] for color in TRAINED], written
    from transformers import AutoProcessor

    merged = tmp_path / "output" / "Qwen2-VL-2B-merged"  # its processor files carry training's image size
    patch = side // 2  # one merged patch: the fewest pixels the processor sizes an image to
    assert AutoProcessor.from_pretrained(merged).image_processor.size == {"shortest_edge": patch * patch,
                                                                          "longest_edge": side * side}
    preprocessor = json.loads((merged / "preprocessor_config.json").read_text())
    assert (preprocessor["min_pixels"], preprocessor["max_pixels"]) == (patch * patch, side * side)
    check(run("compare.py", "--java=never", "--swanlab_mode=disabled", cwd=tmp_path))
    metrics = json.loads((tmp_path / "output" / "Qwen2-VL-2B" / "eval" / "metrics.json").read_text())
    assert len(metrics["images"]) == 2 and metrics["metrics"]["fine_tuned"]["BLEU-1"] is not None
    assert metrics["approximate"].startswith("approximate: --java=never, so BLEU, ROUGE-L and CIDEr-D use a Python")


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.skipif(not chromium(), reason="Chromium is not installed: .ci/run installs it")
def test_demo_page_captions_uploads_in_a_browser_as_infer_does(trained_run, tmp_path):
    from playwright.sync_api import sync_playwright

    work, _ = trained_run
    images = [str(work / "coco_2014_caption" / f"{color}.jpg") for color in ("red", "white")]
    (tmp_path / "notes.txt").write_text("not an image")
    check(run("infer.py", f"--images={','.join(images)}", "--max_new_tokens=16",
                         f"--output_path={tmp_path}/predictions.jsonl", cwd=work))
    expected = {os.path.basename(record["image_path"]): record["caption"]
                for record in map(json.loads, open(tmp_path / "predictions.jsonl"))}

    port = free_port()
    demo = subprocess.Popen([sys.executable, os.path.join(REPO, "demo.py"), f"--port={port}", "--max_new_tokens=16"],
                            cwd=work, stdout=open(tmp_path / "demo.log", "w"), stderr=subprocess.STDOUT)
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=chromium(), args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            wait_for_page(page, f"http://127.0.0.1:{port}", demo, tmp_path / "demo.log")
            page.set_input_files("#images input[type=file]", [*images, str(tmp_path / "notes.txt")])
            page.wait_for_function(  # the uploads are listed (name, then extension) once they reached the server
                "document.querySelector('#images').innerText.split('.txt').length == 2", timeout=120_000)
            page.click("#caption")
            page.get_by_text("Skipped notes.txt: not an image that can be read.").wait_for(timeout=120_000)
            page.locator("#captions td.fine_tuned").nth(1).wait_for(timeout=120_000)
            rows = page.locator("#captions tr").all()[1:]
            shown = {row.locator("td.file").inner_text(): (row.locator("td.base").inner_text(),
                                                            row.locator("td.fine_tuned").inner_text()) for row in rows}
            listed = page.locator("#captions p.skipped").inner_text()  # still there once the notice has gone
            page.screenshot(path=str(tmp_path / "demo.png"), full_page=True)
            browser.close()
    finally:
        demo.terminate()
        demo.wait(timeout=60)
    assert {name: fine_tuned for name, (_, fine_tuned) in shown.items()} == expected
    assert listed == "Skipped, not an image that can be read: notes.txt"
    assert shown["red.jpg"][1] == COLOR_CAPTIONS["red"] and all(base for base, _ in shown.values())  # or "(empty caption)"
    with Image.open(tmp_path / "demo.png") as screenshot:
        assert screenshot.width == 1200
    print(f"screenshot: {tmp_path / 'demo.png'}")


def wait_for_page(page, url, server, log, timeout=180):
    """Open url once the server answers (the demo loads the models first)."""
    deadline = time.time() + timeout
    while True:
        try:
            page.goto(url)
            return
        except Exception:
            if server.poll() is not None or time.time() > deadline:
                raise AssertionError(f"the demo did not start:\n{log.read_text()[-3000:]}")
            time.sleep(1)
