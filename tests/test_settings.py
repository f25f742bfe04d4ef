"""Settings: constants at the top of each script, overridden as --name=value with their types checked."""
import pytest

import captioning
from captioning import PipelineError, parse_settings

DEFAULTS = {"name": "x", "steps": 3, "rate": 1e-4, "flag": False, "UPPER": "not a setting", "_private": 1}


def test_overrides_are_typed_like_their_defaults():
    cfg = parse_settings(DEFAULTS, ["--steps=10", "--rate=5e-3", "--flag=true", "--name=__import__('os')"])
    assert vars(cfg) == {"name": "__import__('os')", "steps": 10, "rate": 5e-3, "flag": True}


@pytest.mark.parametrize("argv, message", [
    (["--steps=1.5"], r"--steps=1.5: expected a int like the default 3"),
    (["--rate=abc"], r"--rate=abc: expected a float"),
    (["--flag=maybe"], r"--flag=maybe: expected a bool"),
    (["--nmae=y"], r"unknown setting 'nmae'; valid settings: flag, name, rate, steps"),
    (["steps=3"], r"settings are given as --name=value"),
    (["--steps"], r"settings are given as --name=value"),
])
def test_bad_overrides_are_refused_with_the_reason(argv, message):
    with pytest.raises(PipelineError, match=message):
        parse_settings(DEFAULTS, argv)


def test_hub_model_ids_are_fetched_with_modelscope_into_the_working_folder(monkeypatch, tmp_path):
    import modelscope

    calls = []
    monkeypatch.setattr(modelscope, "snapshot_download", lambda *a, **k: calls.append((a, k)) or "./Qwen/X")
    monkeypatch.chdir(tmp_path)
    assert captioning.resolve_model("Qwen/X") == "./Qwen/X"
    assert calls == [(("Qwen/X",), {"cache_dir": "./"})]
    (tmp_path / "Qwen" / "X").mkdir(parents=True)
    assert captioning.resolve_model("Qwen/X") == "Qwen/X"  # already downloaded: no second call
    assert len(calls) == 1


def test_a_failed_model_download_says_what_to_do(monkeypatch, tmp_path):
    import modelscope

    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(modelscope, "snapshot_download", offline)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(PipelineError, match=r"ModelScope failed \(ConnectionError: no network\).*--model="):
        captioning.resolve_model("Qwen/X")
