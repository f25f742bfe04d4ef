"""The GPU check, ready for the day a session is lent a GPU: in at most 8 minutes, the benchmark on the real
Qwen2-VL-2B shape, then train.py and infer.py on that shape for a few steps (random weights, the precision and attention
chosen for the GPU, the memory probe, the feature cache), every number written to one JSON file.

    python bench/gpu_check.py --download_wheels=true    # here, once: the packages the GPU machine lacks, into .whl/
    python bench/gpu_check.py                           # there: installs .whl/ into /tmp/site, then measures
    python bench/gpu_check.py --dry_run=true            # on a CPU: the same steps with the small shape, quickly

The GPU machine has torch and an older transformers, but not swanlab; .whl/ carries what train.py needs beside them
(about 25 MB; name .whl in the device tool's carry). Each step's output goes to the JSON even when a later one fails.
"""
import glob
import importlib.metadata
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from types import SimpleNamespace

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [REPO]

from captioning.errors import PipelineError  # noqa: E402
from captioning.files import write_json  # noqa: E402
from captioning.scripts import run_script  # noqa: E402
from captioning.settings import parse_settings  # noqa: E402

# ----------------------------------------------------------------------------- settings
dry_run = False  # true: on a CPU, the small shape and a few images, to check the script itself
download_wheels = False  # true: only download the wheels the GPU machine needs into wheels_dir (run it here)
wheels_dir = ".whl"  # wheels installed before measuring, when the folder exists
site_dir = "/tmp/site"  # where they are installed (the GPU machine's own packages stay as they are)
train_steps = 6  # optimizer steps of train.py on the 2B shape
output = "bench/gpu_check.json"
timeout = 450  # seconds the whole check may take: it stops a step that would run past it
debug = False  # show the full traceback of a failure
# -----------------------------------------------------------------------------

# what the GPU machine (Python 3.12, torch 2.11, transformers 5.17) lacks or has too old for the pipeline, carried as
# wheels at this machine's installed versions
CARRIED = ["transformers", "huggingface-hub", "httpx2", "tokenizers", "peft", "accelerate", "swanlab", "orjson",
           "platformdirs", "pwinput", "pydantic", "pydantic-core", "pydantic-settings", "python-dotenv",
           "annotated-types", "typing-inspection", "pyecharts", "prettytable", "wcwidth", "pyroaring", "watchdog",
           "kernels", "tomlkit"]
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux1_x86_64", "manylinux_2_24_x86_64", "manylinux_2_31_x86_64", "manylinux_2_34_x86_64", "any"]


def fetch_wheels(cfg):
    """Download CARRIED for the GPU machine's Python 3.12, at the versions installed here, with no dependencies."""
    os.makedirs(cfg.wheels_dir, exist_ok=True)
    for name in CARRIED:
        pin = f"{name}=={importlib.metadata.version(name)}"
        result = subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
                                 "--python-version", "3.12", "--implementation", "cp",
                                 *(f"--platform={platform}" for platform in PLATFORMS), "-d", cfg.wheels_dir, pin],
                                capture_output=True, text=True)
        if result.returncode:  # a source package only (pwinput): built here into a pure-Python wheel
            result = subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w",
                                     cfg.wheels_dir, pin], capture_output=True, text=True)
        if result.returncode:
            raise PipelineError(f"pip could not download {pin} for Python 3.12: {result.stderr.strip()[-500:]}")
    size = sum(os.path.getsize(path) for path in glob.glob(os.path.join(cfg.wheels_dir, "*.whl")))
    print(f"{len(CARRIED)} wheels in {cfg.wheels_dir}, {size / 2**20:.0f} MiB: name {cfg.wheels_dir} in the device "
          "tool's carry")


def install_wheels(cfg):
    """The carried wheels installed into site_dir, which every later step puts first on its path; what was installed."""
    wheels = sorted(glob.glob(os.path.join(cfg.wheels_dir, "*.whl")))
    if not wheels:
        return []
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps", "--no-compile",
                    "--no-cache-dir", "--upgrade", "--target", cfg.site_dir, *wheels], check=True)
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [cfg.site_dir, os.environ.get("PYTHONPATH")]))
    return [os.path.basename(wheel) for wheel in wheels]


class Steps:
    """Runs the check's commands one after another within the time left, each one's result kept in results."""

    def __init__(self, cfg, results):
        self.cfg, self.results, self.deadline = cfg, results, time.monotonic() + cfg.timeout

    def run(self, name, command, cwd):
        left = self.deadline - time.monotonic()
        if left < 10:
            self.results[name] = {"skipped": "no time left"}
            return None
        print(f"{name}: {' '.join(command[1:])}", flush=True)
        started = time.perf_counter()
        try:
            done = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=left,
                                  env={**os.environ, "PYTHONUNBUFFERED": "1"})
        except subprocess.TimeoutExpired:
            self.results[name] = {"failed": f"stopped after {left:.0f} s, the time left"}
            return None
        seconds = time.perf_counter() - started
        self.results[name] = {"seconds": round(seconds, 1), "exit": done.returncode}
        if done.returncode:
            self.results[name]["stderr"] = done.stderr[-3000:]
        write_json(self.cfg.output, self.results)
        return done if done.returncode == 0 else None


def machine():
    import torch
    import transformers

    on_gpu = torch.cuda.is_available()
    return {"python": sys.version.split()[0], "torch": torch.__version__, "transformers": transformers.__version__,
            "gpu": torch.cuda.get_device_name(0) if on_gpu else None,
            "capability": list(torch.cuda.get_device_capability(0)) if on_gpu else None,
            "gpu_memory_gib": round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1) if on_gpu else None}


def check(cfg):
    results = {"wheels": install_wheels(cfg)}
    results["machine"] = json.loads(subprocess.run(
        [sys.executable, os.path.abspath(__file__), "--part=machine"], capture_output=True, text=True,
        check=True).stdout.splitlines()[-1])
    if not cfg.dry_run and not results["machine"]["gpu"]:
        raise PipelineError("no GPU here: run with --dry_run=true on a CPU")
    size, image_size = ("small", 112) if cfg.dry_run else ("2b", 280)  # dry: small enough to check the script only
    steps = Steps(cfg, results)
    with tempfile.TemporaryDirectory() as work:
        bench_json = os.path.join(work, "bench.json")
        bench = steps.run("bench", [sys.executable, os.path.join(REPO, "bench", "bench.py"), f"--model_size={size}",
                                    f"--images={32 if cfg.dry_run else 128}", f"--image_size={image_size}",
                                    "--epochs=1", "--warmup_steps=1",
                                    "--caption_images=4", "--max_new_tokens=8", f"--output={bench_json}"], work)
        if bench:
            results["bench"].update(json.load(open(bench_json, encoding="utf-8")))
            results["bench"]["table"] = bench.stdout[bench.stdout.find("| measure"):bench.stdout.rfind("\nwrote")]

        from bench import SIZES, prepare  # bench.py beside this script: the benchmark's data and random-weight model of the same shape

        data = SimpleNamespace(images=24 if cfg.dry_run else 64, image_size=image_size, model_size=size)
        prepare(data, work)
        output_dir = os.path.join(work, "output")
        training = steps.run("train", [
            sys.executable, os.path.join(REPO, "train.py"), f"--model={work}/model", f"--json_path={work}/data_vl.json",
            f"--output_dir={output_dir}", f"--max_steps={cfg.train_steps}", "--test_size=4", "--logging_steps=1",
            "--save_steps=1000", "--swanlab_mode=disabled", "--cache_image_features=true", "--max_new_tokens=8"], work)
        if training:
            run_config = json.load(open(os.path.join(output_dir, "run_config.json"), encoding="utf-8"))
            plan = re.search(r"^each step: .*$", training.stdout, re.M)
            losses = [float(loss) for loss in re.findall(r"'loss': '?([0-9.]+)", training.stdout)]
            results["train"].update({
                "shape": SIZES[size]["family"] + ("" if cfg.dry_run else " 2B"), "plan": plan and plan.group(0),
                "losses": losses, "train_runtime": train_metric(output_dir, "train_runtime"),
                "train_samples_per_second": train_metric(output_dir, "train_samples_per_second"),
                **{key: run_config[key] for key in ("precision_used", "attention_used", "micro_batch_size_used",
                                                    "gradient_checkpointing_used", "image_features_cached")}})
        captioning = steps.run("infer", [sys.executable, os.path.join(REPO, "infer.py"), f"--output_dir={output_dir}",
                                         "--max_new_tokens=8", f"--output_path={work}/predictions.jsonl"], work)
        if captioning:
            summary = re.search(r"^wrote \d+ captions.*$", captioning.stdout, re.M)
            results["infer"]["summary"] = summary and summary.group(0)
    write_json(cfg.output, results)
    print(json.dumps({name: value for name, value in results.items() if name != "bench"}, indent=2))
    print(results.get("bench", {}).get("table", ""))
    print(f"wrote {cfg.output}")


def train_metric(output_dir, name):
    path = os.path.join(output_dir, "train_results.json")
    return json.load(open(path, encoding="utf-8")).get(name) if os.path.isfile(path) else None


def main(argv=()):
    if list(argv) == ["--part=machine"]:  # in a child process, after the wheels are on its path
        print(json.dumps(machine()))
        return
    cfg = parse_settings(globals(), argv)
    if cfg.download_wheels:
        return fetch_wheels(cfg)
    check(cfg)


if __name__ == "__main__":
    run_script(main)
