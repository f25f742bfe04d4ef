"""Take it away: write a merged model (from merge.py) as GGUF files that llama.cpp and Ollama run.

    python export_gguf.py                              # output/Qwen2-VL-2B-merged -> output/Qwen2-VL-2B-gguf
    python export_gguf.py --merged_dir=my-captioner --outtypes=f16

Writes model-<outtype>.gguf (the language model) for each outtype, mmproj-f16.gguf (the vision encoder and its
projector) and an Ollama Modelfile, then prints the llama-mtmd-cli command that captions an image at training's
prompt and image size. The conversion is llama.cpp's own convert_hf_to_gguf.py with its gguf-py, taken from the
llama-cpp-python source package on PyPI (pinned, checked by its SHA-256, downloaded once into download_dir).
"""
import hashlib
import json
import os
import re
import subprocess
import sys
import tarfile
import tempfile

from captioning.chat import never_thinking
from captioning.checkpoints import RUN_CONFIG, read_run_config
from captioning.disk_full import stop_if_disk_full
from captioning.errors import PipelineError
from captioning.files import folder_size, written_whole
from captioning.images import trained_geometry
from captioning.locks import hold
from captioning.models import FAMILIES, model_family
from captioning.scripts import run_script
from captioning.served_files import gguf_folder
from captioning.settings import parse_settings

# ----------------------------------------------------------------------------- settings
merged_dir = "output/Qwen2-VL-2B-merged"  # written by merge.py
gguf_dir = ""  # empty: merged_dir with -gguf in place of -merged; an existing folder is replaced
outtypes = "f16,q8_0"  # the language model's GGUFs, comma-separated: f16 | bf16 | q8_0 | f32 (llama.cpp's converter)
llama_cpp = ""  # llama.cpp's source folder (with convert_hf_to_gguf.py); empty: the pinned one from PyPI
download_dir = "downloads"  # where that source package is downloaded and unpacked, once
debug = False  # show the full traceback of a failure
# -----------------------------------------------------------------------------

LLAMA_CPP_PYTHON = "0.3.36"  # its source package carries llama.cpp's tree (vendor/llama.cpp), converter included
LLAMA_CPP_PYTHON_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
OUTTYPES = ("f16", "bf16", "q8_0", "f32")


def llama_cpp_source(download_dir):
    """llama.cpp's source folder from the pinned llama-cpp-python source package: downloaded with pip, checked,
    and unpacked whole (the slow test builds llama-mtmd-cli from the same tree)."""
    name = f"llama_cpp_python-{LLAMA_CPP_PYTHON}"
    folder = os.path.join(download_dir, name, "vendor", "llama.cpp")
    if os.path.isfile(os.path.join(folder, "convert_hf_to_gguf.py")):
        return folder
    archive = os.path.join(download_dir, f"{name}.tar.gz")
    if not os.path.isfile(archive):
        print(f"downloading llama.cpp's converter: the llama-cpp-python {LLAMA_CPP_PYTHON} source package from PyPI "
              "(77 MB, once)")
        download = subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary",
                                   ":all:", "--dest", download_dir, f"llama-cpp-python=={LLAMA_CPP_PYTHON}"])
        if download.returncode or not os.path.isfile(archive):
            raise PipelineError(f"pip could not download llama-cpp-python=={LLAMA_CPP_PYTHON}'s source package; "
                                f"download {name}.tar.gz by hand into {download_dir}, or give --llama_cpp=<a "
                                "llama.cpp source folder>")
    with open(archive, "rb") as file:
        if hashlib.sha256(file.read()).hexdigest() != LLAMA_CPP_PYTHON_SHA256:
            raise PipelineError(f"{archive} is not the llama-cpp-python {LLAMA_CPP_PYTHON} source package this "
                                "script was tested with (its SHA-256 differs): delete it and run again")
    with tempfile.TemporaryDirectory(dir=download_dir) as unpacking, tarfile.open(archive) as tar:
        tar.extractall(unpacking, filter="data")
        os.replace(os.path.join(unpacking, name), os.path.join(download_dir, name))
    return folder


def conversion_view(merged_dir, image_size, folder):
    """The merged folder as the converter should read it: its files linked, config.json with the training image size
    in vision_config, so that the mmproj GGUF records it, and a chat template that never thinks (llama-mtmd-cli asks
    every template to think, so the merged folder's, which thinks only when asked, would)."""
    for name in os.listdir(merged_dir):
        if name == "chat_template.jinja":
            with open(os.path.join(merged_dir, name), encoding="utf-8") as source, \
                    open(os.path.join(folder, name), "w", encoding="utf-8") as view:
                view.write(never_thinking(source.read()))
        elif name != "config.json":
            os.symlink(os.path.abspath(os.path.join(merged_dir, name)), os.path.join(folder, name))
    with open(os.path.join(merged_dir, "config.json"), encoding="utf-8") as file:
        config = json.load(file)
    config["vision_config"]["image_size"] = image_size
    with open(os.path.join(folder, "config.json"), "w", encoding="utf-8") as file:
        json.dump(config, file, indent=2)


def convert(converter, source, outfile, outtype, family, mmproj=False):
    print(f"writing {os.path.basename(outfile)}")
    command = [sys.executable, converter, source, "--outfile", outfile, "--outtype", outtype,
               *(["--mmproj"] if mmproj else family.gguf_converter_args)]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode:
        raise PipelineError(f"llama.cpp's converter failed on {source}:\n{result.stderr[-3000:]}")


def chat_turns(merged_dir):
    """(the system turn the template writes by default or None, the opening of the assistant's answer), read off the
    merged folder's own chat template: Qwen2-VL writes a system turn, Qwen3.5 answers after an empty thinking block."""
    from transformers import AutoProcessor

    rendered = AutoProcessor.from_pretrained(merged_dir).apply_chat_template(
        [{"role": "user", "content": [{"type": "text", "text": "{{ .Content }}"}]}], add_generation_prompt=True,
        tokenize=False)
    system = re.search(r"<\|im_start\|>system\n(.*?)<\|im_end\|>", rendered, re.S)
    return system and system.group(1), rendered.split("{{ .Content }}<|im_end|>\n", 1)[1]


def modelfile(language_model, prompt, system, answer_opening):
    """An Ollama Modelfile: the language model, the vision projector beside it, the chat turns of the model's own
    template (its default system turn, the opening of its answer), greedy decoding."""
    return (f"# ollama create my-captioner -f Modelfile; then ask with an image and the prompt {prompt!r}\n"
            f"FROM ./{language_model}\nFROM ./mmproj-f16.gguf\n"
            'TEMPLATE """{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n'
            f'{{{{ end }}}}{answer_opening}"""\n' + (f"SYSTEM {system}\n" if system else "") +
            "PARAMETER temperature 0\nPARAMETER stop <|im_end|>\n")


def main(argv=()):
    cfg = parse_settings(globals(), argv)
    requested = [outtype.strip() for outtype in cfg.outtypes.split(",") if outtype.strip()]
    if not requested or set(requested) - set(OUTTYPES):
        raise PipelineError(f"--outtypes={cfg.outtypes}: use one or more of {', '.join(OUTTYPES)}, comma-separated")
    if not os.path.isfile(os.path.join(cfg.merged_dir, RUN_CONFIG)):
        raise PipelineError(f"{cfg.merged_dir} is not a folder written by merge.py (no {RUN_CONFIG}): run "
                            "`python merge.py` first, or set --merged_dir")
    run_config = read_run_config(cfg.merged_dir)
    family = model_family(cfg.merged_dir)
    if family.gguf_converter_args is None:
        exported = [family.name for family in FAMILIES.values() if family.gguf_converter_args is not None]
        raise PipelineError(f"{cfg.merged_dir} holds a {family.name} model: the GGUF export is tested for "
                            f"{', '.join(exported)} only")
    gguf_dir = cfg.gguf_dir or gguf_folder(cfg.merged_dir)
    converter = os.path.join(cfg.llama_cpp or llama_cpp_source(cfg.download_dir), "convert_hf_to_gguf.py")
    if not os.path.isfile(converter):
        raise PipelineError(f"--llama_cpp={cfg.llama_cpp} has no convert_hf_to_gguf.py: give llama.cpp's source folder")

    geometry = trained_geometry(run_config)
    fewest_tokens, most_tokens = geometry.token_bounds()
    with hold(gguf_dir), tempfile.TemporaryDirectory() as view:
        conversion_view(cfg.merged_dir, run_config["image_size"], view)
        with stop_if_disk_full(gguf_dir, "the GGUF files", lambda: folder_size(cfg.merged_dir) * len(requested),
                               setting="gguf_dir", then="it converts again"), written_whole(gguf_dir) as staging:
            for outtype in requested:
                convert(converter, view, os.path.join(staging, f"model-{outtype}.gguf"), outtype, family)
            convert(converter, view, os.path.join(staging, "mmproj-f16.gguf"), "f16", family, mmproj=True)
            with open(os.path.join(staging, "Modelfile"), "w", encoding="utf-8") as file:
                file.write(modelfile(f"model-{requested[-1]}.gguf", run_config["prompt"], *chat_turns(cfg.merged_dir)))
    print(f"wrote {gguf_dir}. Caption an image with llama.cpp:\n  llama-mtmd-cli -m {gguf_dir}/model-{requested[-1]}.gguf "
          f"--mmproj {gguf_dir}/mmproj-f16.gguf --image photo.jpg -p {run_config['prompt']!r} --jinja --temp 0 "
          f"--image-min-tokens {fewest_tokens} --image-max-tokens {most_tokens}\nor with Ollama: cd {gguf_dir} && "
          "ollama create my-captioner -f Modelfile (Ollama sizes images itself, not with these bounds)")
    if geometry.square:
        print("warning: this model was trained on images squashed to a square (aspect_ratio=square); llama.cpp keeps "
              "a photo's aspect ratio, so its captions of photos that are not square can differ from infer.py's")


if __name__ == "__main__":
    run_script(main)
