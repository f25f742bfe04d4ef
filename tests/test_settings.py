"""Settings: each script's block of constants, overridden by --config=FILE and the command line, checked early."""
import importlib
import json
import os
import re

import pytest

from captioning import models, settings
import train
from captioning.errors import PipelineError
from captioning.precision import compute_choice
from captioning.settings import parse_settings
from conftest import REPO, run

DEFAULTS = {"__file__": os.path.join(REPO, "train.py"), "name": "x", "steps": 3, "rate": 1e-4, "flag": False,
            "UPPER": "not a setting", "_private": 1}
SCRIPTS = ["data2csv.py", "csv2json.py", "train.py", "train_rl.py", "infer.py", "compare.py", "merge.py", "demo.py",
           "export_gguf.py", "verify.py", "bench/bench.py"]


def test_overrides_are_typed_like_their_defaults_in_either_form():
    cfg = parse_settings(DEFAULTS, ["--steps", "1e3", "--rate=5e-3", "--flag", "--name", "__import__('os')"])
    assert vars(cfg) == {"name": "__import__('os')", "steps": 1000, "rate": 5e-3, "flag": True}
    assert parse_settings(DEFAULTS, ["--flag", "false", "--steps=1_000", "--rate", "2"]).rate == 2.0
    assert parse_settings(DEFAULTS, ["--flag=no"]).flag is False
    assert vars(parse_settings(DEFAULTS, ["--steps", "-1", "--rate", "-1e-4"])) == {**vars(cfg), "steps": -1,
                                                                                  "rate": -1e-4, "name": "x",
                                                                                  "flag": False}


@pytest.mark.parametrize("argv, message", [
    (["--steps=1.5"], r"^--steps=1.5: expected an int like the default 3$"),
    (["--rate", "abc"], r"^--rate=abc: expected a float like the default 0.0001$"),
    (["--flag=maybe"], r"^--flag=maybe: expected a bool like the default False$"),
    (["--nmae=y"], r"^unknown setting 'nmae' \(did you mean --name\?\); valid settings: flag, name, rate, steps$"),
    (["steps=3"], r"settings are given as --name=value or --name value"),
    (["--steps"], r"argument --steps: expected one argument"),
])
def test_bad_overrides_are_refused_with_the_reason(argv, message):
    with pytest.raises(PipelineError, match=message):
        parse_settings(DEFAULTS, argv)


@pytest.mark.parametrize("name, text", [
    ("settings.yaml", "steps: 7\nrate: 0.5\nflag: true\n"),
    ("settings.json", '{"steps": 7, "rate": 0.5, "flag": true}'),
])
def test_a_config_file_sets_them_and_the_command_line_wins(tmp_path, name, text):
    (tmp_path / name).write_text(text)
    cfg = parse_settings(DEFAULTS, [f"--config={tmp_path / name}", "--rate", "0.25"])
    assert vars(cfg) == {"name": "x", "steps": 7, "rate": 0.25, "flag": True}
    cfg = parse_settings(DEFAULTS, ["--rate=0.25", "--config", str(tmp_path / name)])  # wherever --config stands
    assert cfg.rate == 0.25 and cfg.steps == 7


@pytest.mark.parametrize("text, message", [
    ("steps: 1.5\n", r"settings.yaml: --steps=1.5: expected an int like the default 3"),
    ("stpes: 2\n", r"settings.yaml: unknown setting 'stpes' \(did you mean --steps\?\)"),
    ("- steps\n", r"settings.yaml: expected a mapping of setting names to values, found a list"),
    ("steps: [\n", r"settings.yaml is not valid YAML"),
])
def test_a_bad_config_file_is_named_with_the_reason(tmp_path, text, message):
    (tmp_path / "settings.yaml").write_text(text)
    with pytest.raises(PipelineError, match=message):
        parse_settings(DEFAULTS, [f"--config={tmp_path / 'settings.yaml'}"])
    with pytest.raises(PipelineError, match=r"--config=missing.yaml: file not found"):
        parse_settings(DEFAULTS, ["--config=missing.yaml"])


def train_settings(argv):
    return parse_settings(vars(train), argv, train.training_arguments)


def test_train_takes_training_arguments_fields_checked_by_name_and_type():
    cfg = train_settings(["--lr_scheduler_type", "cosine", "--warmup_steps=0.03", "--weight_decay", "0.01",
                          "--save_total_limit", "3", "--max_grad_norm=0.5", "--learning_rate=2e-4"])
    given = {name: value for name, value in vars(cfg).items() if name not in vars(train)}
    assert given == {"lr_scheduler_type": "cosine", "warmup_steps": 0.03, "weight_decay": 0.01,
                     "save_total_limit": 3, "max_grad_norm": 0.5}
    assert cfg.learning_rate == 2e-4
    arguments = train.trainer_arguments(cfg, None, compute_choice())
    assert (arguments.lr_scheduler_type, arguments.warmup_steps, arguments.save_total_limit) == ("cosine", 0.03, 3)
    with pytest.raises(PipelineError, match=r"argument --warmup_steps\S*: invalid float value: 'a lot'"):
        train_settings(["--warmup_steps", "a lot"])
    with pytest.raises(PipelineError, match=r"argument --lr_scheduler_type\S*: invalid choice: 'wavy'"):
        train_settings(["--lr_scheduler_type=wavy"])
    with pytest.raises(PipelineError, match=r"unknown setting 'warmup_ratio' \(did you mean --warmup_steps\?\).* "
                                            r"or a TrainingArguments field$"):
        train_settings(["--warmup_ratio=0.1"])
    with pytest.raises(PipelineError, match=r"give per_device_train_batch_size as --per_device_train_batch_size"):
        train_settings(["--per-device-train-batch-size=2"])


def block_names(script):
    module = importlib.import_module(script[:-3].replace("/", "."))
    return [name for name, value in vars(module).items()
            if name.islower() and not name.startswith("_") and type(value) in (bool, int, float, str)]


def help_entries(script, capsys):
    """{--name: its entry in the script's --help, whitespace joined}."""
    module = importlib.import_module(script[:-3].replace("/", "."))
    with pytest.raises(SystemExit) as exit_info:
        module.main(["--help"])
    assert exit_info.value.code == 0
    shown = " ".join(capsys.readouterr().out.split())
    assert "--config FILE" in shown
    return {entry.split()[0]: entry for entry in re.split(r" (?=--\w+ \[?\w+\]? )", shown)}


def shared_here(script):
    return set(settings.SHARED_HELP) - settings.OWN_MEANING.get(os.path.basename(script), set())


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_lists_every_setting_with_its_default_and_meaning(script, capsys):
    module = importlib.import_module(script[:-3].replace("/", "."))
    entries = help_entries(script, capsys)
    comments = settings.settings_comments(module.__file__)
    for name in block_names(script):
        entry = entries[f"--{name}"]
        assert f"(default: {getattr(module, name)!r})" in entry, entry
        meaning = settings.SHARED_HELP[name] if name in shared_here(script) else comments.get(name)
        if meaning:
            assert " ".join(meaning.split()) in entry, name


def test_a_shared_setting_has_one_help_text_in_every_script(capsys):
    """model, checkpoint, output_dir, quantization, precision, attention, resume and the SwanLab settings mean one thing
    wherever they appear, so their help cannot drift apart between scripts."""
    seen = {}
    for script in SCRIPTS:
        entries = help_entries(script, capsys)
        for name in shared_here(script) & set(block_names(script)):
            seen.setdefault(name, {})[script] = entries[f"--{name}"]
    assert set(seen) == set(settings.SHARED_HELP)
    for name, by_script in seen.items():
        assert len(by_script) >= 2 and len(set(by_script.values())) == 1, (name, by_script)
    assert set(seen["precision"]) == {"train.py", "train_rl.py", "infer.py", "compare.py", "demo.py", "verify.py"}


def test_help_answers_from_the_command_line(tmp_path):
    result = run("infer.py", "-h", cwd=tmp_path, timeout=120)
    assert result.returncode == 0 and "--checkpoint str" in result.stdout and result.stderr == ""


def test_replaying_run_config_gives_the_same_settings(tmp_path):
    cfg = train_settings(["--num_train_epochs=1.5", "--warmup_steps", "0.1", "--debug", "--lora_r=8"])
    recorded = {**vars(cfg), "prompt": "COCO Yes:", "train_json": "/x/train.json", "swanlab_run_id": "abc",
                "world_size": 1, "micro_batch_size_used": 16, "image_features_cached": True}
    (tmp_path / "run_config.json").write_text(json.dumps(recorded))
    replayed = train_settings([f"--config={tmp_path / 'run_config.json'}"])
    assert vars(replayed) == vars(cfg)
    again = train_settings([f"--config={tmp_path / 'run_config.json'}", "--output_dir=output/again"])
    assert vars(again) == {**vars(cfg), "output_dir": "output/again"}


BAD_TRAIN_SETTINGS = [
    (["--image_size=100"], r"--image_size=100: Qwen2-VL needs a positive multiple of 28 \(14-pixel patches"),
    (["--model=Qwen/Qwen3-VL-2B-Instruct", "--image_size=280"], r"--image_size=280: Qwen3-VL needs a positive "
                                                                r"multiple of 32 \(16-pixel patches merged 2x2\), e.g. 288"),
    (["--model=someone/captioner"], r"cannot tell which Qwen-VL family 'someone/captioner' is"),
    (["--micro_batch_size=5"], r"--micro_batch_size=5: use auto or a number that divides the 16 samples"),
    (["--cache_image_features=yes"], r"--cache_image_features=yes: use auto, true or false"),
    (["--gradient_checkpointing=maybe"], r"--gradient_checkpointing=maybe: use auto, true or false"),
    (["--per_device_train_batch_size=0"], r"--per_device_train_batch_size=0: use a positive number"),
    (["--resume=sometimes"], r"--resume=sometimes: use auto or never"),
    (["--swanlab_mode=web"], r"--swanlab_mode=web: use auto, cloud, local, offline or disabled"),
    (["--deepspeed=zero4"], r"--deepspeed=zero4: use zero2, zero3 or the path of a DeepSpeed JSON config"),
    (["--deepspeed=zero3", "--cache_image_features=true"], r"--cache_image_features=true cannot be used: DeepSpeed "
                                                          r"ZeRO-3 splits the vision tower across GPUs"),
    (["--lr_scheduler_type=wavy"], r"invalid choice: 'wavy'"),
    (["--learning_rat=1"], r"unknown setting 'learning_rat' \(did you mean --learning_rate\?\)"),
]


@pytest.fixture
def loaders_that_must_not_run(monkeypatch):
    def loader_called(*args, **kwargs):
        raise AssertionError("the model loader was called")

    for module_name in ("captioning.models", "captioning.data", "captioning.checkpoints", "captioning.generation", "train",
                        "infer", "compare", "merge"):
        module = importlib.import_module(module_name)
        for name in ("load_model_and_processor", "resolve_model", "read_conversations", "trained_adapter"):
            if hasattr(module, name):
                monkeypatch.setattr(module, name, loader_called)


@pytest.mark.parametrize("argv, message", BAD_TRAIN_SETTINGS)
def test_a_wrong_train_setting_stops_before_data_or_model_load(tmp_path, argv, message, loaders_that_must_not_run):
    with pytest.raises(PipelineError, match=message):
        train.main([f"--output_dir={tmp_path}/out", "--json_path=missing.json", *argv])


@pytest.mark.parametrize("script, argv, message", [
    ("infer", ["--batch_size=0"], r"--batch_size=0: use a positive number"),
    ("compare", ["--java=sometimes"], r"--java=sometimes: use auto or never"),
    ("compare", ["--swanlab_mode=web"], r"--swanlab_mode=web: use auto, cloud"),
    ("merge", ["--dtype=float8"], r"--dtype=float8: use one of auto, bfloat16, float16, float32"),
    ("data2csv", ["--max_data_number=0"], r"--max_data_number=0: give a positive number, or -1 for every row"),
    ("data2csv", ["--workers=0"], r"--workers=0: use a positive number"),
    ("data2csv", ["--threads=2"], r"unknown setting 'threads'"),
])
def test_a_wrong_setting_of_the_other_scripts_stops_before_anything_loads(script, argv, message,
                                                                           loaders_that_must_not_run, monkeypatch):
    module = importlib.import_module(script)
    if hasattr(module, "open_source"):
        monkeypatch.setattr(module, "open_source", lambda cfg: (_ for _ in ()).throw(AssertionError("data read")))
    with pytest.raises(PipelineError, match=message):
        module.main(argv)


def test_hub_model_ids_are_fetched_with_modelscope_into_the_working_folder(monkeypatch, tmp_path):

    import modelscope

    calls = []
    monkeypatch.setattr(modelscope, "snapshot_download", lambda *a, **k: calls.append((a, k)) or "./Qwen/X")
    monkeypatch.chdir(tmp_path)
    assert models.resolve_model("Qwen/X") == "./Qwen/X"
    assert calls == [(("Qwen/X",), {"cache_dir": "./"})]
    (tmp_path / "Qwen" / "X").mkdir(parents=True)
    assert models.resolve_model("Qwen/X") == "Qwen/X"  # already downloaded: no second call
    assert len(calls) == 1


def test_a_failed_model_download_says_what_to_do(monkeypatch, tmp_path):
    import modelscope

    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(modelscope, "snapshot_download", offline)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(PipelineError, match=r"ModelScope failed \(ConnectionError: no network\).*--model="):
        models.resolve_model("Qwen/X")
