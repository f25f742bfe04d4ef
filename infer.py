"""Step 4: caption images with the trained LoRA adapter: a few, or a whole collection on every GPU.

    python infer.py                                    # the held-out test images, newest adapter in output_dir
    python infer.py --images="photos/*.jpg,cat.png" --checkpoint=output/Qwen2-VL-2B/checkpoint-100
    python infer.py --images=my_collection/ --output_path=collection.jsonl      # a folder, searched recursively
    torchrun --nproc_per_node=4 infer.py --images=paths.txt --output_path=collection.jsonl   # one process per GPU
    python infer.py --model=output/Qwen2-VL-2B-merged                # a merged model from merge.py

Uses the prompt, image size and base model that training saved in run_config.json, generates greedily in
batches, prints each caption and writes one JSON record per image (image_path, caption, model, adapter) to
output_path, by default predictions.jsonl next to the adapter used. Each batch's records are saved as it finishes,
so an interrupted run goes on where it stopped when run again, and a re-run skips the images already captioned;
with several processes each captions its share, and the records are merged in input order at the end.
"""
import os
import time
from contextlib import ExitStack
from itertools import islice

from captioning.checkpoints import trained_model
from captioning.data import report_skipped
from captioning.errors import PipelineError
from captioning.generation import generate_captions
from captioning.image_paths import image_paths
from captioning.images import loaded_images, trained_geometry
from captioning.locks import hold
from captioning.served_files import pin_image_size
from captioning.models import load_model_and_processor, resolve_model
from captioning.predictions import SKIPPED, Predictions
from captioning.processes import decided_by_the_main_process, join_processes, wait_for_all
from captioning.scripts import run_script
from captioning.settings import parse_captioning_settings
from captioning.vllm_engine import VllmCaptions, check_engine

# ----------------------------------------------------------------------------- settings
model = ""  # the same in every script: --help
output_dir = "output/Qwen2-VL-2B"  # the same in every script: --help
checkpoint = ""  # the same in every script: --help
images = ""  # comma-separated image files, folders (recursively), globs, text files of paths, data2csv's CSV or csv2json's JSON; empty: training's held-out images
batch_size = 8
engine = "transformers"  # transformers (generate) | vllm: vLLM's engine, faster on large collections (pip install vllm)
max_new_tokens = 128
output_path = ""  # one JSON record per image; empty: predictions.jsonl in the adapter's (or merged model's) folder
quantization = "none"  # the same in every script: --help
precision = "auto"  # the same in every script: --help
attention = "auto"  # the same in every script: --help
debug = False  # show the full traceback of a failure
# -----------------------------------------------------------------------------


def check_images(spec):
    """Refuse, before the model loads, a list of images that names none or none that exists."""
    named, found = 0, []
    for path in image_paths(spec):
        named += 1
        if os.path.isfile(path):
            return
        found.append(path)
    if not named:
        raise PipelineError("no image to caption: set --images to image files, folders, globs or text files of paths")
    raise PipelineError(f"none of the {named} images could be read: {', '.join(found[:3])} not found")


def captioner(cfg, compute, checkpoint_dir, base, run_config):
    """The function that captions a batch of images resized to training's geometry, with the engine chosen."""
    geometry = trained_geometry(run_config)
    if cfg.engine == "vllm":
        return VllmCaptions(resolve_model(base), checkpoint_dir, geometry, compute, run_config["prompt"],
                            cfg.max_new_tokens)
    model, processor = load_model_and_processor(base, compute, on_device=True, quantization=cfg.quantization)
    if checkpoint_dir:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, checkpoint_dir)
    model.eval()
    pin_image_size(processor, geometry)  # so that it leaves the resized images as they are
    return lambda images: generate_captions(model, processor, images, run_config["prompt"], cfg.max_new_tokens,
                                            cfg.batch_size, show_progress=False)


def caption_share(cfg, compute, checkpoint_dir, base, run_config, predictions, spec):
    """Caption this process's share of the images, batch by batch, each batch's records added to its part as it
    ends, with a progress bar (images/s, time left) in the main process. Returns the seconds taken to load the
    model (or start the engine)."""
    from tqdm import tqdm

    count = sum(1 for _ in predictions.to_caption(image_paths(spec, warn=ignore)))
    if not count:
        return 0.0
    started = time.perf_counter()
    caption = captioner(cfg, compute, checkpoint_dir, base, run_config)
    loading = time.perf_counter() - started
    geometry = trained_geometry(run_config)
    adapter = os.path.abspath(checkpoint_dir) if checkpoint_dir else None
    share = f" (this process's share of {predictions.num_processes})" if predictions.num_processes > 1 else ""
    paths = predictions.to_caption(image_paths(spec, warn=ignore))
    with tqdm(total=count, desc=f"captioning{share}", unit="image", disable=predictions.rank != 0) as progress:
        while batch := list(islice(paths, cfg.batch_size)):
            loaded, skipped = loaded_images(batch, geometry)
            captions = caption([image for _, image in loaded]) if loaded else []
            for path, why in skipped:
                progress.write(f"skipped: {why}")
            for (path, _), text in zip(loaded, captions):
                progress.write(f"{path}: {text}")
            predictions.append([{"image_path": path, "caption": text, "model": base, "adapter": adapter}
                                for (path, _), text in zip(loaded, captions)] +
                               [{"image_path": path, SKIPPED: why} for path, why in skipped])
            progress.update(len(batch))
    return loading


def ignore(message):
    """Where the warnings of a second pass over the images go: the first pass gave them."""


def main(argv=()):
    cfg, compute = parse_captioning_settings(globals(), argv)
    checkpoint_dir, run_config, base = trained_model(cfg.model, cfg.checkpoint, cfg.output_dir)
    check_engine(cfg.engine, cfg.quantization, checkpoint_dir)
    spec = cfg.images or run_config["test_json"]
    check_images(spec)
    used = checkpoint_dir or base
    output_path = cfg.output_path or os.path.join(used, "predictions.jsonl")

    rank, num_processes = join_processes()  # under torchrun: one process per GPU, each with its share
    started = time.perf_counter()
    with ExitStack() as held:
        decided_by_the_main_process(lambda: held.enter_context(hold(output_path)), rank, num_processes)
        predictions = Predictions(output_path, rank, num_processes)
        if rank == 0:
            to_caption = sum(1 for _ in predictions.to_caption(image_paths(spec, warn=ignore), every_share=True))
            earlier = f"; {len(predictions.done)} captioned before, in {output_path}" if predictions.done else ""
            print(f"captioning {to_caption} images with {used} in {num_processes} process(es) (prompt "
                  f"{run_config['prompt']!r}, images {trained_geometry(run_config)}){earlier}")
        loading = caption_share(cfg, compute, checkpoint_dir, base, run_config, predictions, spec)
        wait_for_all(num_processes)
        if rank != 0:
            return
        added, skipped = predictions.merge(image_paths(spec, warn=ignore))
    seconds = time.perf_counter() - started
    report_skipped([f"{path}: {why}" for path, why in skipped], "images")
    if not added and not predictions.earlier:
        raise PipelineError(f"none of the {len(skipped)} images could be read")
    print(f"wrote {added + len(predictions.earlier)} captions to {output_path}: {added} new in {seconds:.1f} s "
          f"({loading:.1f} s loading the model, then {added / (seconds - loading):.2f} images/s), "
          f"{len(skipped)} skipped")


if __name__ == "__main__":
    run_script(main)
