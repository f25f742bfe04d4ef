"""Try it: a local web page where you drop your own photos and see the base model's caption beside the fine-tuned one.

    python demo.py                                     # newest adapter in output_dir, at http://127.0.0.1:7860
    python demo.py --checkpoint=output/Qwen2-VL-2B/checkpoint-100
    python demo.py --model=output/Qwen2-VL-2B-merged   # a merged model from merge.py, beside the model it came from

Captions greedily with training's prompt and image size (run_config.json), exactly as infer.py does. The page is
served by Gradio on this machine only; --host=0.0.0.0 opens it to others on your network.
"""
import html
import os

from captioning.errors import PipelineError
from captioning.generation import BaseAndFineTuned
from captioning.images import trained_geometry
from captioning.pages import caption_cell, thumbnail_data_uri
from captioning.scripts import run_script
from captioning.settings import parse_captioning_settings

# ----------------------------------------------------------------------------- settings
output_dir = "output/Qwen2-VL-2B"  # the same in every script: --help
checkpoint = ""  # the same in every script: --help
model = ""  # the same in every script: --help
host = "127.0.0.1"  # 0.0.0.0: reachable from other machines too
port = 7860
batch_size = 8
max_new_tokens = 128
quantization = "none"  # the same in every script: --help
precision = "auto"  # the same in every script: --help
attention = "auto"  # the same in every script: --help
debug = False  # show the full traceback of a failure
# -----------------------------------------------------------------------------

MODELS = {"base": "base model", "fine_tuned": "fine-tuned"}


def side_by_side(captions, geometry, skipped=()):
    """An HTML table: each image as the model saw it, with the base and the fine-tuned caption; below it, the files
    skipped, so they stay listed after the notice goes."""
    rows = "".join(
        f"<tr><td><img src='{thumbnail_data_uri(path, geometry, side=160)}'></td>"
        f"<td class='file'>{html.escape(os.path.basename(path))}</td>"
        + "".join(f"<td class='{key}'>{caption_cell(captions[key][path])}</td>" for key in MODELS)
        + "</tr>"
        for path in captions["fine_tuned"]
    )
    header = "".join(f"<th>{label}</th>" for label in MODELS.values())
    listed = (f"<p class='skipped'>Skipped, not an image that can be read: {html.escape(', '.join(skipped))}</p>"
              if skipped else "")
    return f"<table class='captions'><tr><th>image</th><th>file</th>{header}</tr>{rows}</table>{listed}"


def page(cfg, models):
    import gradio as gr

    settings = models.run_config

    def caption_uploads(files, progress=gr.Progress(track_tqdm=True)):  # Gradio shows caption_files' bars
        paths = list(files or [])
        if not paths:
            raise gr.Error("Drop or pick one or more images first.")
        skipped = []
        captions = {key: dict(models.caption(key, paths, cfg.max_new_tokens, cfg.batch_size, skipped=skipped,
                                             description=f"captioning with the {label}"))
                    for key, label in MODELS.items()}
        not_images = sorted({os.path.basename(path) for path, _ in skipped})
        if not_images:
            gr.Warning(f"Skipped {', '.join(not_images)}: not an image that can be read.")
        if not captions["fine_tuned"]:
            raise gr.Error(f"None of the files is an image that can be read: {', '.join(not_images)}.")
        return side_by_side(captions, trained_geometry(settings), not_images)

    with gr.Blocks(title="Base vs fine-tuned captions", analytics_enabled=False) as blocks:
        gr.Markdown(
            f"## Base vs fine-tuned captions\nFine-tuned: `{models.names['fine_tuned']}` · base: "
            f"`{models.names['base']}` · prompt `{settings['prompt']}` · images {trained_geometry(settings)}, as in "
            "training")
        files = gr.File(label="Drop or pick images", file_count="multiple", elem_id="images")
        button = gr.Button("Caption", variant="primary", elem_id="caption")
        table = gr.HTML(elem_id="captions")
        button.click(caption_uploads, inputs=files, outputs=table)
    return blocks


def main(argv=()):
    cfg, compute = parse_captioning_settings(globals(), argv)
    if not 0 < cfg.port < 65536:
        raise PipelineError(f"--port={cfg.port}: use a port number from 1 to 65535")
    models = BaseAndFineTuned(cfg.model, cfg.checkpoint, cfg.output_dir, compute, cfg.quantization)
    page(cfg, models).launch(server_name=cfg.host, server_port=cfg.port, show_error=True)


if __name__ == "__main__":
    run_script(main)
