"""A script's settings block as its command line: --name value, --config YAML/JSON, --help from the block's comments."""

import argparse
import difflib
import json
import os
import textwrap
import tokenize
from contextlib import contextmanager, suppress
from types import SimpleNamespace

from captioning.errors import PipelineError

# what train.py records in run_config.json beside its settings: passed over when that file is replayed with --config
RECORDED_BY_TRAINING = {"family", "prompt", "train_json", "test_json", "swanlab_mode_used", "swanlab_run_id", "world_size",
                        "micro_batch_size_used", "gradient_checkpointing_used", "image_features_cached", "merged_from",
                        "precision_used", "attention_used"}


# settings that several scripts take, with one meaning: their help is this text in every script that has them, whatever
# the comment on the script's line (train.py's model, the model to fine-tune, is its own)
SHARED_HELP = {
    "output_dir": "train.py's folder: its checkpoints, the final adapter and run_config.json",
    "checkpoint": "adapter folder; empty: the newest trained adapter under output_dir",
    "model": "the base model for the adapter; empty: the one training used (run_config.json). infer.py and demo.py "
             "also take a folder written by merge.py, which needs no adapter",
    "quantization": "none | 4bit: the language model's weights in 4 bits (nf4; QLoRA in training), for GPUs of 8-12 "
                    "GB | 8bit; needs bitsandbytes",
    "precision": "auto: bf16 on GPUs of compute capability 8.0+ (A100, RTX 30xx and newer), fp16 on older ones (T4, "
                 "V100), fp32 on a CPU | bf16 | fp16 | fp32",
    "attention": "auto: flash_attention_2 where flash-attn 2 is installed and the GPU is 8.0+, else sdpa | "
                 "flash_attention_2 | sdpa | eager",
    "deepspeed": "empty: none | zero2 | zero3 (the configs in deepspeed/) | path to a DeepSpeed JSON config",
    "resume": "auto: continue an interrupted run from its newest checkpoint in output_dir | never: start afresh",
    "swanlab_mode": "auto ($SWANLAB_MODE, else cloud when logged in, else local) | cloud | local | offline | disabled",
    "swanlab_project": "$SWANLAB_PROJ_NAME or $SWANLAB_PROJECT, when set, replaces this default",
    "swanlab_run_name": "empty: output_dir's folder name",
}
# shared names that mean something else in that script
OWN_MEANING = {"train.py": {"model"}, "train_rl.py": {"output_dir"}}


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
    shared = {name: text for name, text in SHARED_HELP.items()
              if name not in OWN_MEANING.get(os.path.basename(path), ())}
    for name, default in block.items():
        meaning = shared.get(name) or comments.get(name)
        meaning = f"{meaning} " if meaning else ""
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


def parse_captioning_settings(script_globals, argv):
    """The settings of a script that captions (infer.py, compare.py, demo.py), checked before anything loads, and the
    Compute (device, precision, attention) to caption with."""
    from captioning.precision import compute_choice
    from captioning.quantization import check_quantization

    cfg = parse_settings(script_globals, argv)
    require_positive(cfg, "batch_size", "max_new_tokens")
    compute = compute_choice(cfg.precision, cfg.attention)
    check_quantization(cfg.quantization)
    return cfg, compute


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
