"""What the four scripts share: settings, errors, safe file writes, images, chat messages, model loading, captioning.

Training and inference both build their prompts with `build_messages` and load images with `load_image`,
so the prompt and image size cannot drift apart between them.
"""
import argparse
import base64
import difflib
import errno
import glob
import html
import io
import json
import os
import re
import shutil
import signal
import socket
import sys
import textwrap
import time
import tokenize
from contextlib import contextmanager, suppress
from types import SimpleNamespace
from typing import NamedTuple

RUN_CONFIG = "run_config.json"  # the settings a training run used, saved next to its adapter
END_OF_TURN = "<|im_end|>"  # Qwen2-VL's chat template closes every turn with it; the model must learn to emit it
IGNORE_INDEX = -100  # label value the loss skips


class PipelineError(Exception):
    """A failure the user can fix: printed as one message, without a traceback."""


def run_script(main):
    """Run a script's main(argv) the way a user meets it: a one-paragraph message and a non-zero exit on failure,
    the traceback only with --debug=true."""
    argv = sys.argv[1:]
    signal.signal(signal.SIGTERM, stop_on_sigterm)  # schedulers and torchrun stop jobs with SIGTERM
    try:
        main(argv)
    except KeyboardInterrupt:
        close_progress_bars()
        print("interrupted: the files already finished are kept, and none is left half-written", file=sys.stderr)
        sys.exit(130)
    except Exception as error:
        close_progress_bars()
        if debug_requested(main, argv):
            raise
        if isinstance(error, PipelineError):
            print(f"error: {error}", file=sys.stderr)
        elif is_disk_full(error):  # a small write with no message of its own (the big ones use stop_if_disk_full)
            print(f"error: the disk is full: {error}. Free some space on it and run the same command again",
                  file=sys.stderr)
        else:
            print(f"error: unexpected {type(error).__name__}: {error}\n(run again with --debug=true to see where "
                  "it happened, and report it with that traceback)", file=sys.stderr)
        sys.exit(1)


def close_progress_bars():
    """Close the bars a failure left open (tqdm's own list of them): else they are redrawn at exit, below the error."""
    if "tqdm" in sys.modules:
        for bar in list(sys.modules["tqdm"].tqdm._instances):
            bar.close()


def stop_on_sigterm(signum, frame):
    raise KeyboardInterrupt


def debug_requested(main, argv):
    try:  # settings the block does not name are let through here: only debug matters
        return parse_settings(main.__globals__, argv, more_settings=lambda *unchecked: {}).debug
    except PipelineError:
        return False


# ----------------------------------------------------------------------------- settings

# what train.py records in run_config.json beside its settings: passed over when that file is replayed with --config
RECORDED_BY_TRAINING = {"family", "prompt", "train_json", "test_json", "swanlab_mode_used", "swanlab_run_id", "world_size",
                        "micro_batch_size_used", "gradient_checkpointing_used", "image_features_cached", "merged_from",
                        "precision_used", "attention_used"}


class SettingsHelp(argparse.RawDescriptionHelpFormatter):
    """The script's docstring as written; each setting's help wrapped without cutting a URL or path in two."""

    def _split_lines(self, text, width):
        return textwrap.wrap(text, width, break_long_words=False, break_on_hyphens=False)


class SettingsParser(argparse.ArgumentParser):
    """argparse that reports a bad argument as a PipelineError (one message, exit 1) instead of exiting itself."""

    def error(self, message):
        raise PipelineError(message)


def parse_settings(script_globals, argv, more_settings=None):
    """The script's settings block (its lowercase constants) overridden by --config=FILE, then by argv.

    argv takes --name=value or --name value; a boolean may be bare (--debug); --help lists every setting with the
    comment of its line in the block. more_settings(from_file, from_argv, block) takes what the block does not name
    (train.py: TrainingArguments fields) and returns it as a dict; without it such names are refused."""
    block = {name: value for name, value in script_globals.items()
             if name.islower() and not name.startswith("_") and type(value) in (bool, int, float, str)}
    parser = settings_parser(script_globals, block, more_settings)
    argv = with_negative_numbers_attached(argv)
    config_path = parser.parse_known_args(argv)[0].config
    file_settings, file_rest = argparse.Namespace(), []
    if config_path:
        with errors_named_after(config_path):
            file_settings, file_rest = parser.parse_known_args(config_file_arguments(config_path, block))
            if file_rest and not more_settings:
                refuse_unknown(file_rest, block)
    parser.set_defaults(**vars(file_settings))  # the command line wins over the file
    settings, rest = parser.parse_known_args(argv)
    del settings.config
    if rest and not more_settings:
        refuse_unknown(rest, block)
    extra = more_settings(file_rest, rest, block) if more_settings else {}
    return SimpleNamespace(**vars(settings), **extra)


def with_negative_numbers_attached(argv):
    """--name -1e-4 as --name=-1e-4: argparse takes a value that starts with '-' for a value only in plain forms."""
    joined = []
    for argument in argv:
        if joined and joined[-1].startswith("--") and "=" not in joined[-1] and argument.startswith("-"):
            with suppress(ValueError):
                float(argument)
                joined[-1] = f"{joined[-1]}={argument}"
                continue
        joined.append(argument)
    return joined


@contextmanager
def errors_named_after(path):
    try:
        yield
    except PipelineError as error:
        raise PipelineError(f"{path}: {error}") from error


def settings_parser(script_globals, block, more_settings):
    path = script_globals.get("__file__") or "script.py"
    comments = settings_comments(path)
    parser = SettingsParser(prog=f"python {os.path.basename(path)}", usage="%(prog)s [--config FILE] [--name value ...]",
                            description=script_globals.get("__doc__"),
                            epilog=more_settings.__doc__ if more_settings else None, allow_abbrev=False,
                            formatter_class=SettingsHelp)
    parser.add_argument("--config", metavar="FILE", default="",
                        help="a YAML or JSON file of settings; the command line wins over it. train.py's "
                             "run_config.json is one: it repeats that run")
    for name, default in block.items():
        meaning = f"{comments[name]} " if name in comments else ""
        parser.add_argument(f"--{name}", type=setting_type(name, default), default=default,
                            help=f"{meaning}(default: {default!r})", metavar=type(default).__name__,
                            **({"nargs": "?", "const": True} if type(default) is bool else {}))
    return parser


def settings_comments(path):
    """{name: comment} of the `name = value  # comment` lines of a script's source."""
    if not os.path.isfile(path):
        return {}
    lines = {}
    with open(path, encoding="utf-8") as file:
        for token in tokenize.generate_tokens(file.readline):
            lines.setdefault(token.start[0], []).append(token)
    comments = {}
    for tokens in lines.values():
        if (len(tokens) > 3 and tokens[0].type == tokenize.NAME and tokens[0].start[1] == 0
                and tokens[1].string == "=" and tokens[-2].type == tokenize.COMMENT):
            comments[tokens[0].string] = tokens[-2].string.lstrip("# ")
    return comments


def setting_type(name, default):
    """argparse's type for a setting: the default's type, with numbers in any form that type allows."""
    kind = type(default)
    booleans = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}

    def parse(text):
        value = booleans.get(text.lower()) if kind is bool else text if kind is str else None
        if kind in (int, float):
            with suppress(ValueError):
                value = kind(text)
        if kind is int and value is None:  # 1e3 is a whole number too
            with suppress(ValueError, OverflowError):
                number = float(text)
                value = int(number) if number.is_integer() else None
        if value is None:
            article = "an" if kind is int else "a"
            raise PipelineError(f"--{name}={text}: expected {article} {kind.__name__} like the default {default!r}")
        return value

    return parse


def config_file_arguments(path, block):
    """A YAML or JSON settings file as --name=value arguments; keys train.py records about a run are passed over."""
    import yaml

    try:
        with open(path, encoding="utf-8") as file:
            values = json.load(file) if path.endswith(".json") else yaml.safe_load(file)
    except FileNotFoundError as error:
        raise PipelineError(f"--config={path}: file not found") from error
    except (ValueError, yaml.YAMLError) as error:
        raise PipelineError(f"--config={path} is not valid {'JSON' if path.endswith('.json') else 'YAML'}: "
                            f"{error}") from error
    if not isinstance(values, dict):
        raise PipelineError(f"--config={path}: expected a mapping of setting names to values, found a "
                            f"{type(values).__name__}")
    arguments = []
    for name, value in values.items():
        if name in RECORDED_BY_TRAINING and name not in block:
            continue
        if isinstance(value, bool):
            value = str(value).lower()
        elif isinstance(value, (dict, list)) or value is None:
            value = json.dumps(value)
        arguments.append(f"--{name}={value}")
    return arguments


def require_positive(cfg, *names):
    for name in names:
        if getattr(cfg, name) <= 0:
            raise PipelineError(f"--{name}={getattr(cfg, name)}: use a positive number")


def parse_dataclass_settings(fields_of, from_file, from_argv, block):
    """{name: value} of the fields of a dataclass (train.py: TrainingArguments) given in a config file or argv
    beside a script's block, checked by name and type with transformers' own HfArgumentParser."""
    from transformers import HfArgumentParser

    parser = HfArgumentParser(fields_of, allow_abbrev=False)
    parser.error = SettingsParser.error.__get__(parser)  # a bad value is a PipelineError here too, not an exit
    defaults = vars(parser.parse_args([]))
    file_values, file_rest = parser.parse_known_args(from_file)
    parser.set_defaults(**vars(file_values))
    values, rest = parser.parse_known_args(from_argv)
    if file_rest or rest:
        refuse_unknown(file_rest or rest, block, [*defaults, *block], f"or a {fields_of.__name__} field")
    given = {name: value for name, value in vars(values).items() if value != defaults[name]}
    for name in given.keys() & block.keys():  # reached through an alias such as --per-device-train-batch-size
        raise PipelineError(f"give {name} as --{name}: it is one of this script's own settings")
    return given


def refuse_unknown(arguments, block, valid_names=None, more=""):
    """Stop at the first argument that is not a known setting, naming the closest valid one."""
    valid_names = valid_names or list(block)
    argument = arguments[0]
    if not argument.startswith("--"):
        raise PipelineError(f"cannot read the argument {argument!r}: settings are given as --name=value or "
                            "--name value (python SCRIPT --help lists them)")
    name = argument[2:].partition("=")[0]
    close = difflib.get_close_matches(name, valid_names, n=1)
    hint = f" (did you mean --{close[0]}?)" if close else ""
    raise PipelineError(f"unknown setting {name!r}{hint}; valid settings: {', '.join(sorted(block))} {more}".strip())


# ----------------------------------------------------------------------------- files

@contextmanager
def atomic_write(path, mode="w", **open_kwargs):
    """Open a temporary file next to `path` and rename it over `path` only once it is complete."""
    temp_path = f"{path}.part"
    try:
        with open(temp_path, mode, **open_kwargs) as file:
            yield file
        os.replace(temp_path, path)
    except BaseException:
        if os.path.exists(temp_path):
            os.remove(temp_path)
        raise


@contextmanager
def written_whole(folder):
    """atomic_write for a folder: a staging folder beside it, renamed over it once the block has written it all, and
    removed when the block fails, so that neither a half-written folder nor the space it took is left."""
    staging = folder.rstrip(os.sep) + ".part"
    shutil.rmtree(staging, ignore_errors=True)
    os.makedirs(staging)
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(staging, folder)


DISK_FULL = (errno.ENOSPC, errno.EDQUOT)  # no space left on the device; the user's quota used up


def is_disk_full(error):
    """Whether an error, or one it came from, is a write that found no space: an OSError's errno, or the words that
    libraries writing from native code put in their own errors (safetensors: "No space left on device (os error 28)")."""
    while error is not None:
        if getattr(error, "errno", None) in DISK_FULL or any(os.strerror(code) in str(error) for code in DISK_FULL):
            return True
        error = error.__cause__ or error.__context__
    return False


def free_space(path):
    """Bytes free on the disk that holds path, or would hold it once created."""
    path = os.path.abspath(path)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    return shutil.disk_usage(path).free


def folder_size(folder):
    return sum(os.path.getsize(os.path.join(folder, name)) for name in os.listdir(folder)
               if os.path.isfile(os.path.join(folder, name)))


@contextmanager
def stop_if_disk_full(folder, what, needed, partial=(), setting="", then="it continues where this one stopped"):
    """Turn a write that finds the disk full into one message: the folder, about how many bytes it needs (a number,
    or a function that estimates it), where else to write and what the next run does. The partial outputs named (or
    a function listing them) are removed first, so nothing half-written stays to take space or be read.

    torch.save says only "unexpected pos" when the disk fills up, so its writer's errors count when the disk has
    less space free than needed."""
    try:
        yield
    except Exception as error:
        from_torch_writer = isinstance(error, RuntimeError) and "inline_container" in str(error)
        if not (is_disk_full(error) or from_torch_writer):
            raise
        needed = needed() if callable(needed) else needed
        if from_torch_writer and free_space(folder) >= needed:
            raise
        for path in partial() if callable(partial) else partial:
            if os.path.isdir(path):
                shutil.rmtree(path)
            elif os.path.exists(path):
                os.remove(path)
        elsewhere = f" (or give --{setting} a folder on another disk)" if setting else ""
        raise PipelineError(
            f"the disk holding {folder} is full: writing {what} failed with \"No space left on device\". It needs "
            f"about {size_text(needed)} and {size_text(free_space(folder))} is free. Nothing half-written was kept. "
            f"Free some space{elsewhere} and run the same command again: {then}"
        ) from error


def size_text(size):
    """A byte count as people read it: 0 bytes, 340.2 KB, 4.4 GB."""
    size, unit = float(size), "bytes"
    for larger in ("KB", "MB", "GB", "TB"):
        if size < 1000:
            break
        size, unit = size / 1000, larger
    return f"{size:.0f} {unit}" if unit == "bytes" else f"{size:.1f} {unit}"


def write_json(path, data):
    with atomic_write(path, encoding="utf-8") as file:
        json.dump(data, file, ensure_ascii=False, indent=2)


@contextmanager
def hold(path):
    """Use path (a folder or file a step writes) alone: a second process that targets it stops at once with a message
    naming this one. The lock beside it is the kernel's (filelock's FileLock, fcntl), so it ends with its holder,
    however that ends: one left by a killed run is taken over."""
    from filelock import FileLock, Timeout

    parent, name = os.path.split(os.path.abspath(path).rstrip(os.sep))
    os.makedirs(parent, exist_ok=True)
    lock_path = os.path.join(parent, f".{name}.lock")
    owner_path = f"{lock_path}.json"  # who holds it: read by the process that is refused
    lock = FileLock(lock_path, timeout=0)
    try:
        lock.acquire()
    except Timeout as error:
        raise PipelineError(
            f"{path} is in use by {lock_owner(owner_path)}. Wait for that run to finish or stop it, or give this one "
            "another folder or file"
        ) from error
    try:
        if os.path.isfile(owner_path):
            print(f"taking over {path} from {lock_owner(owner_path)}, which ended without releasing it")
        write_json(owner_path, {"pid": os.getpid(), "host": socket.gethostname(), "command": " ".join(sys.argv),
                                "started": time.strftime("%Y-%m-%d %H:%M:%S")})
        yield
    finally:
        with suppress(FileNotFoundError):
            os.remove(owner_path)
        lock.release()


def lock_owner(owner_path):
    try:
        with open(owner_path, encoding="utf-8") as file:
            owner = json.load(file)
        return f"process {owner['pid']} on {owner['host']}, started {owner['started']} ({owner['command']})"
    except (OSError, ValueError, KeyError):
        return "another process (it has not written its name yet)"


def report_skipped(skipped, what):
    """Name the first five things skipped, and count the rest."""
    if skipped:
        print(f"skipped {len(skipped)} {what}:", *skipped[:5], sep="\n  ")
        if len(skipped) > 5:
            print(f"  ... and {len(skipped) - 5} more")


def readable_by_all(folder):
    """Files 0644 (safetensors writes its weights 0600): a server running as another user can read them."""
    for name in os.listdir(folder):
        if os.path.isfile(os.path.join(folder, name)):
            os.chmod(os.path.join(folder, name), 0o644)


# ----------------------------------------------------------------------------- files other tools read

def pin_image_size(processor, image_size):
    """Make the processor resize every image to image_size x image_size pixels in area (aspect kept), as training
    did, so a client that never heard of image_size (pipeline, vLLM, llama.cpp) does not feed full-size images."""
    pixels = image_size * image_size
    processor.image_processor.size = {"shortest_edge": pixels, "longest_edge": pixels}


def save_processor(processor, folder, image_size, base_model):
    """The processor, tokenizer and chat template in the files that this and older readers look for, with the
    training image size pinned. base_model: the folder of the model trained on, which holds the slow tokenizer's
    files that transformers 5 no longer writes."""
    pin_image_size(processor, image_size)
    processor.save_pretrained(folder)
    # transformers 5 keeps the image processor inside processor_config.json; transformers 4 reads only this file
    pixels = image_size * image_size
    write_json(os.path.join(folder, "preprocessor_config.json"),
               {**processor.image_processor.to_dict(), "min_pixels": pixels, "max_pixels": pixels,
                "processor_class": type(processor).__name__})
    for name in ("vocab.json", "merges.txt"):
        if os.path.isfile(os.path.join(base_model, name)):
            shutil.copyfile(os.path.join(base_model, name), os.path.join(folder, name))


def add_config_fields_for_transformers_4(folder):
    """Write what transformers 4 (and the tools built on it) read from config.json and transformers 5 moved: the
    multimodal rope as rope_scaling beside rope_parameters (without it generation fails), and the tied word
    embeddings in text_config (without it the output layer is left random)."""
    path = os.path.join(folder, "config.json")
    with open(path, encoding="utf-8") as file:
        config = json.load(file)
    text_config = config.get("text_config", config)
    rope = text_config.get("rope_parameters", {})
    if "mrope_section" in rope:
        # Qwen2-VL and Qwen2.5-VL name it type mrope there; Qwen3-VL's interleaved one keeps its own fields
        scaling = ({key: value for key, value in rope.items() if key != "rope_theta"} if rope.get("mrope_interleaved")
                   else {"type": "mrope", "mrope_section": rope["mrope_section"]})
        for section in (config, text_config):
            section["rope_scaling"] = scaling
            section["rope_theta"] = rope["rope_theta"]
    if "tie_word_embeddings" in config:
        text_config.setdefault("tie_word_embeddings", config["tie_word_embeddings"])
    write_json(path, config)


# ----------------------------------------------------------------------------- data

VISION_TAG = re.compile(r"<\|vision_start\|>(.*?)<\|vision_end\|>")


def read_conversations(path):
    """The recipe's JSON as samples with image_path, prompt (the user text around the image) and caption."""
    try:
        with open(path, encoding="utf-8") as file:
            entries = json.load(file)
    except FileNotFoundError as error:
        raise PipelineError(f"{path} not found: run csv2json.py first or set --json_path") from error
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise PipelineError(f"{path} is not valid JSON: {error}; rebuild it with csv2json.py") from error
    if not isinstance(entries, list):
        raise PipelineError(f"{path} holds a {type(entries).__name__}, not the recipe's list of conversations")
    return [conversation_sample(path, number, entry) for number, entry in enumerate(entries)]


def conversation_sample(path, number, entry):
    problem = None
    try:
        user, assistant = entry["conversations"]
        roles = (user["from"], assistant["from"])
        image = VISION_TAG.search(user["value"])
        if roles != ("user", "assistant"):
            problem = f"its turns are from {roles[0]!r} and {roles[1]!r}, not 'user' and 'assistant'"
        elif not image:
            problem = "the user turn has no <|vision_start|>IMAGE<|vision_end|>"
        elif not isinstance(assistant["value"], str) or not assistant["value"].strip():
            problem = "the assistant turn has no caption"
    except (KeyError, TypeError, ValueError):
        problem = "it does not have two turns, each with 'from' and 'value'"
    if problem:
        entry_id = entry.get("id") if isinstance(entry, dict) else None
        raise PipelineError(
            f"{path}, entry {number} (id {entry_id}): {problem}. Each entry must look like "
            '{"conversations": [{"from": "user", "value": "PROMPT <|vision_start|>IMAGE<|vision_end|>"}, '
            '{"from": "assistant", "value": "CAPTION"}]}; rebuild the file with csv2json.py'
        )
    return {"image_path": image.group(1), "prompt": VISION_TAG.sub("", user["value"]).strip(),
            "caption": assistant["value"], "entry": entry}


# ----------------------------------------------------------------------------- trained adapters

ADAPTER_CONFIG = "adapter_config.json"  # peft writes it after the weights: its presence marks a complete adapter


def checkpoint_folders(output_dir):
    """{step: folder} of the checkpoint-N folders Trainer saved in output_dir."""
    folders = {}
    for folder in glob.glob(os.path.join(output_dir, "checkpoint-*")):
        step = re.search(r"checkpoint-(\d+)$", folder)
        if step and os.path.isdir(folder):
            folders[int(step.group(1))] = folder
    return folders


def newest_checkpoint(output_dir):
    """The most recently saved adapter under output_dir: the final one or a checkpoint-N, whichever is newer."""
    candidates = {float("inf"): output_dir, **checkpoint_folders(output_dir)}  # the final adapter wins a tie
    saved = [(os.path.getmtime(os.path.join(folder, ADAPTER_CONFIG)), step, folder)
             for step, folder in candidates.items() if os.path.isfile(os.path.join(folder, ADAPTER_CONFIG))]
    if not saved:
        raise PipelineError(f"no trained adapter in {output_dir}: run train.py first, or set --checkpoint or --output_dir")
    return max(saved)[2]


def read_run_config(folder):
    """The settings training used, saved next to its adapter, in the parent of a checkpoint-N, or in a merged model."""
    for candidate in (folder, os.path.dirname(os.path.normpath(folder))):
        path = os.path.join(candidate, RUN_CONFIG)
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as file:
                return json.load(file)
    raise PipelineError(
        f"no {RUN_CONFIG} in {folder} or its parent folder: it is needed to use training's prompt and image size; "
        "point --checkpoint at an adapter saved by train.py"
    )


def trained_adapter(checkpoint, output_dir):
    """The adapter folder to use (checkpoint, or the newest under output_dir), checked, with training's settings."""
    folder = checkpoint or newest_checkpoint(output_dir)
    if not os.path.isdir(folder):
        raise PipelineError(f"checkpoint folder not found: {folder}; set --checkpoint to a folder saved by train.py")
    for name in (ADAPTER_CONFIG, "adapter_model.safetensors"):  # safetensors only: a pickled .bin could run code
        if not os.path.isfile(os.path.join(folder, name)):
            raise PipelineError(f"{folder} has no {name}: set --checkpoint to an adapter saved by train.py")
    return folder, read_run_config(folder)


def trained_model(model, checkpoint, output_dir):
    """(adapter folder or None, training's settings, the model to load): a folder written by merge.py, given as
    model, needs no adapter; else the adapter (checkpoint, or the newest under output_dir) goes on model, or on the
    base model training used."""
    if model and not checkpoint and os.path.isfile(os.path.join(model, RUN_CONFIG)):
        return None, read_run_config(model), model
    checkpoint_dir, run_config = trained_adapter(checkpoint, output_dir)
    return checkpoint_dir, run_config, model or run_config["model"]


class BaseAndFineTuned:
    """The base model and the fine-tuned one, to caption the same images with both. With an adapter the base model
    is the adapter switched off, so nothing loads twice; a merged model is loaded beside the model it came from."""

    def __init__(self, model, checkpoint, output_dir, compute):
        self.checkpoint_dir, self.run_config, fine_tuned = trained_model(model, checkpoint, output_dir)
        self.fine_tuned, self.processor = load_model_and_processor(fine_tuned, compute, on_device=True)
        if self.checkpoint_dir:
            from peft import PeftModel

            self.fine_tuned = self.base = PeftModel.from_pretrained(self.fine_tuned, self.checkpoint_dir)
        else:
            self.base, _ = load_model_and_processor(self.run_config["model"], compute, on_device=True)
        self.fine_tuned.eval()
        self.names = {"base": self.run_config["model"], "fine_tuned": self.checkpoint_dir or fine_tuned}

    def caption(self, which, paths, max_new_tokens, batch_size, **options):
        """caption_files with the "base" or the "fine_tuned" model, at training's prompt and image size."""
        model = self.base if which == "base" else self.fine_tuned
        with model.disable_adapter() if which == "base" and self.checkpoint_dir else suppress():
            return caption_files(model, self.processor, paths, self.run_config["image_size"],
                                 self.run_config["prompt"], max_new_tokens, batch_size, **options)


# ----------------------------------------------------------------------------- tracking

SWANLAB_MODES = {"cloud": "online", "online": "online", "local": "local", "offline": "offline", "disabled": "disabled"}


def swanlab_run_mode(requested):
    """SwanLab's own mode name for the swanlab_mode setting; auto is $SWANLAB_MODE when set, else cloud when logged
    in, else local."""
    rename_swanlab_project_variable()
    if requested == "auto" and os.environ.get("SWANLAB_MODE"):
        requested = os.environ["SWANLAB_MODE"]
        if requested not in SWANLAB_MODES:
            raise PipelineError(f"SWANLAB_MODE={requested}: use cloud, local, offline or disabled")
    if requested == "auto":
        return "online" if swanlab_logged_in() else "local"
    if requested not in SWANLAB_MODES:
        raise PipelineError(f"--swanlab_mode={requested}: use auto, cloud, local, offline or disabled")
    return SWANLAB_MODES[requested]


def rename_swanlab_project_variable():
    """swanlab 0.10 reads $SWANLAB_PROJECT as a JSON object and stops on a plain name: it becomes $SWANLAB_PROJ_NAME,
    swanlab's own name for the project."""
    if "SWANLAB_PROJECT" in os.environ:
        os.environ.setdefault("SWANLAB_PROJ_NAME", os.environ.pop("SWANLAB_PROJECT"))


def swanlab_logged_in():
    import swanlab

    try:
        return swanlab.Settings().api_key is not None  # SWANLAB_API_KEY, or the key `swanlab login` saved
    except Exception:  # an unreadable setting in the environment: swanlab.init will name it
        return False


def start_swanlab(mode, project, default_project, name, config, run_id=None):
    """A SwanLab run; with run_id it continues that run's experiment. $SWANLAB_PROJ_NAME (or $SWANLAB_PROJECT)
    replaces the project when the setting is left at default_project; swanlab itself reads $SWANLAB_WORKSPACE and
    $SWANLAB_LOG_DIR."""
    import swanlab

    rename_swanlab_project_variable()
    if project == default_project:
        project = os.environ.get("SWANLAB_PROJ_NAME") or project
    return swanlab.init(project=project, name=name, config=config, mode=mode, id=run_id,
                        resume="allow" if run_id else None)


# ----------------------------------------------------------------------------- images and messages

def to_rgb(image):
    """An 8-bit RGB copy of any PIL image: upright per its EXIF, 16-bit scaled (not clipped), transparency on white."""
    from PIL import Image, ImageOps

    image = ImageOps.exif_transpose(image)
    if image.mode.startswith("I;16") or image.mode == "I":
        image = image.convert("I").point(lambda value: value / 256).convert("L")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        image = image.convert("RGBA")
        background = Image.new("RGB", image.size, "white")
        background.paste(image, mask=image.getchannel("A"))
        return background
    return image.convert("RGB")


def load_image(path, image_size):
    """An RGB image resized to image_size x image_size, the size training used."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image = to_rgb(image)
    except FileNotFoundError as error:
        raise PipelineError(f"image not found: {path}") from error
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as error:
        raise PipelineError(f"cannot read image {path}: {error}") from error
    return image.resize((image_size, image_size), Image.BICUBIC)


def thumbnail_data_uri(path, image_size, side=256):
    """The image as the model saw it, small enough to embed in a page."""
    thumbnail = load_image(path, image_size)
    thumbnail.thumbnail((side, side))
    buffer = io.BytesIO()
    thumbnail.save(buffer, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()


def caption_cell(caption):
    return html.escape(caption) if caption else "<span class='empty'>(empty caption)</span>"


def build_messages(image, prompt, caption=None):
    """The chat for one image: the user sends the image and the prompt; with a caption, the assistant answers."""
    messages = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": prompt}]}]
    if caption is not None:
        messages.append({"role": "assistant", "content": [{"type": "text", "text": caption}]})
    return messages


# ----------------------------------------------------------------------------- model

PRECISIONS = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}  # setting: torch's dtype name
ATTENTIONS = ("flash_attention_2", "sdpa", "eager")
NATIVE_BF16 = (8, 0)  # compute capability from which GPUs compute in bf16 natively, and FlashAttention 2 runs


class Compute(NamedTuple):
    """Where and how a script computes: cuda or cpu, bf16, fp16 or fp32, and the attention kernel."""
    device: str
    precision: str
    attention: str

    @property
    def dtype(self):
        import torch

        return getattr(torch, PRECISIONS[self.precision])

    def __str__(self):
        return f"{self.precision}, {self.attention}"


def gpu_capability():
    """The (major, minor) compute capability of this process's GPU, or None on a CPU: the CUDA query the precision
    and attention rest on, one function so that tests can fake a T4 or an H100."""
    import torch

    if not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_capability(int(os.environ.get("LOCAL_RANK", "0")))  # under torchrun: its own GPU


def flash_attention_2_installed():
    """transformers' own test of the flash-attn 2 package (a flash-attn 4 install also provides a flash_attn module)."""
    from transformers.utils import is_flash_attn_2_available

    return is_flash_attn_2_available()


def compute_choice(precision="auto", attention="auto"):
    """The Compute for the precision and attention settings. auto: bf16 where the GPU has it natively (compute
    capability 8.0+: A100, RTX 30xx, H100 and newer), fp16 on older GPUs (T4, V100: their bf16 is emulated, far
    slower), fp32 on a CPU; FlashAttention 2 where it is installed and can run (8.0+, in bf16 or fp16), else PyTorch's
    SDPA. A setting other than auto is used as given, unless this machine cannot run it."""
    capability = gpu_capability()
    if precision not in ("auto", *PRECISIONS):
        raise PipelineError(f"--precision={precision}: use auto, {', '.join(PRECISIONS)}")
    if attention not in ("auto", *ATTENTIONS):
        raise PipelineError(f"--attention={attention}: use auto, {', '.join(ATTENTIONS)}")
    native_bf16 = capability is not None and capability >= NATIVE_BF16
    if precision == "auto":
        precision = "fp32" if capability is None else "bf16" if native_bf16 else "fp16"
    flash_runs = native_bf16 and precision != "fp32" and flash_attention_2_installed()
    if attention == "auto":
        attention = "flash_attention_2" if flash_runs else "sdpa"
    if precision == "fp16" and capability is None:
        raise PipelineError("--precision=fp16 needs a GPU: on a CPU use fp32 (or bf16)")
    if attention == "flash_attention_2" and not flash_runs:
        where = "a CPU" if capability is None else f"this GPU of compute capability {capability[0]}.{capability[1]}"
        raise PipelineError(f"--attention=flash_attention_2 cannot run on {where} in {precision}: it needs the "
                            "flash-attn 2 package, a GPU of compute capability 8.0 or newer and bf16 or fp16. Use "
                            "--attention=sdpa")
    return Compute("cpu" if capability is None else "cuda", precision, attention)


def resolve_model(model):
    """A local model folder as given, or a hub id downloaded with ModelScope into ./<id> as the recipe does."""
    if os.path.isdir(model):
        return model
    print(f"model {model!r} is not a local folder: downloading it from ModelScope into ./{model}")
    try:
        from modelscope import snapshot_download

        return snapshot_download(model, cache_dir="./")
    except Exception as error:
        raise PipelineError(
            f"downloading the model {model!r} from ModelScope failed ({type(error).__name__}: {error}). "
            "Download it another way (e.g. `huggingface-cli download Qwen/Qwen2-VL-2B-Instruct --local-dir "
            "Qwen2-VL-2B-Instruct`) and pass the folder as --model=Qwen2-VL-2B-Instruct"
        ) from error


class Family(NamedTuple):
    name: str
    side_multiple: int  # image sides in multiples of the patch size times the 2x2 merge
    image_size: int  # the default side


# the Qwen-VL families this project fine-tunes, by the model_type in their config.json
FAMILIES = {
    "qwen2_vl": Family("Qwen2-VL", 28, 280),
    "qwen2_5_vl": Family("Qwen2.5-VL", 28, 280),
    "qwen3_vl": Family("Qwen3-VL", 32, 288),
}


def model_family(model):
    """The Family of a model folder, from its config.json, or of a hub id not yet downloaded, from its name."""
    config_path = os.path.join(model, "config.json")
    if os.path.isfile(config_path):
        with open(config_path, encoding="utf-8") as file:
            model_type = json.load(file).get("model_type")
        if model_type not in FAMILIES:
            raise PipelineError(f"{model} holds a {model_type!r} model; this project fine-tunes "
                                f"{', '.join(family.name for family in FAMILIES.values())} (model_type "
                                f"{', '.join(FAMILIES)})")
        return FAMILIES[model_type]
    named = [family for family in FAMILIES.values() if f"{family.name.lower()}-" in os.path.basename(model).lower()]
    if not named:
        raise PipelineError(f"cannot tell which Qwen-VL family {model!r} is: no config.json there, and its name "
                            "does not say. Download the model and pass its folder as --model")
    return named[0]


def checked_image_size(image_size, family):
    """image_size, or the family's default for 0, refused unless the family's patches tile it."""
    image_size = image_size or family.image_size
    if image_size < 0 or image_size % family.side_multiple:
        raise PipelineError(f"--image_size={image_size}: {family.name} needs a positive multiple of "
                            f"{family.side_multiple} ({family.side_multiple // 2}-pixel patches merged 2x2), e.g. "
                            f"{family.image_size}")
    return image_size


def load_model_and_processor(model, compute=None, on_device=False, dtype=None):
    """A Qwen-VL model (the class its config.json names) and its processor from a local folder or hub id,
    safetensors only: in dtype if given, else in compute's precision (compute_choice() when not given), with its
    attention; moved to its device when on_device, else left on the CPU for Trainer to place."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    path = resolve_model(model)
    model_family(path)
    compute = compute or compute_choice()
    processor = AutoProcessor.from_pretrained(path)
    base_model = AutoModelForImageTextToText.from_pretrained(
        path, dtype=dtype or compute.dtype, use_safetensors=True, attn_implementation=compute.attention)
    return base_model.to(compute.device) if on_device else base_model, processor


def caption_files(model, processor, paths, image_size, prompt, max_new_tokens, batch_size, description="captioning",
                  show_progress=True, skipped=None):
    """[(path, caption)] for every image that loads, read batch by batch as the model needs them rather than all
    first; each one that does not load is named and skipped (and added to the list skipped, if given, with why)."""
    from tqdm import tqdm

    captioned = []
    paths = list(paths)
    with tqdm(total=len(paths), desc=description, unit="image", disable=not show_progress) as progress:
        for start in range(0, len(paths), batch_size):
            loaded = []
            for path in paths[start:start + batch_size]:
                try:
                    loaded.append((path, load_image(path, image_size)))
                except PipelineError as error:
                    progress.write(f"skipped: {error}")
                    if skipped is not None:
                        skipped.append((path, str(error)))
            captions = generate_captions(model, processor, [image for _, image in loaded], prompt, max_new_tokens,
                                         batch_size, show_progress=False) if loaded else []
            captioned += [(path, caption) for (path, _), caption in zip(loaded, captions)]
            progress.update(len(paths[start:start + batch_size]))
    return captioned


def generate_captions(model, processor, images, prompt, max_new_tokens, batch_size, show_progress=True):
    """Greedy captions for a list of PIL images, generated batch_size at a time with left padding."""
    import torch
    from tqdm import tqdm
    from transformers import GenerationConfig

    tokenizer = processor.tokenizer
    generation_config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=False,
        use_cache=True,
        eos_token_id=tokenizer.convert_tokens_to_ids(END_OF_TURN),
        pad_token_id=tokenizer.pad_token_id,
    )
    captions = []
    with tqdm(total=len(images), desc="captioning", unit="image", disable=not show_progress) as progress:
        for start in range(0, len(images), batch_size):
            batch = images[start:start + batch_size]
            texts = [
                processor.apply_chat_template(build_messages(image, prompt), add_generation_prompt=True, tokenize=False)
                for image in batch
            ]
            inputs = processor(text=texts, images=batch, padding=True, padding_side="left", return_tensors="pt")
            inputs = inputs.to(model.device)
            # a bf16 or fp16 base model's adapter is held in fp32 (peft upcasts it): autocast keeps its matmuls in
            # the base model's precision
            with torch.inference_mode(), torch.autocast(model.device.type, dtype=model.dtype,
                                                        enabled=model.dtype != torch.float32):
                output = model.generate(**inputs, generation_config=generation_config)
            new_tokens = output[:, inputs["input_ids"].shape[1]:]
            captions += [caption.strip() for caption in processor.batch_decode(new_tokens, skip_special_tokens=True)]
            progress.update(len(batch))
    return captions
