"""The outside tools' cache (testkit/outside_tools.py): a build is reused for the same key, made anew for another
key, and one killed mid-way is never used."""
import os
import signal
import sys
import textwrap

from conftest import REPO, start_and_wait_for
from testkit.outside_tools import built_once_per_machine, cache_folder


def counting_build(calls):
    def build(folder):
        calls.append(folder)
        with open(os.path.join(folder, "tool"), "w") as file:
            file.write("complete")
    return build


def test_a_build_is_reused_for_its_key_and_made_anew_for_another_version_or_option(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    calls = []
    key = {"version": "1.0", "options": ["-DX=ON"]}
    first = built_once_per_machine("tool", key, counting_build(calls))
    assert built_once_per_machine("tool", dict(key), counting_build(calls)) == first and len(calls) == 1
    other_version = built_once_per_machine("tool", {**key, "version": "1.1"}, counting_build(calls))
    other_option = built_once_per_machine("tool", {**key, "options": ["-DX=OFF"]}, counting_build(calls))
    assert len({first, other_version, other_option}) == 3 and len(calls) == 3
    assert open(os.path.join(first, "tool")).read() == "complete"
    assert first == cache_folder("tool", key) and first.startswith(str(tmp_path / "qwen-vl-caption-tools"))


def test_a_build_killed_midway_is_not_used_and_the_next_one_builds_afresh(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    key = {"version": "1.0"}
    half = tmp_path / "half-written"
    builder = textwrap.dedent(f"""
        import os, sys, time
        sys.path.insert(0, {REPO!r})
        from testkit.outside_tools import built_once_per_machine

        def build(folder):
            open(os.path.join(folder, "tool"), "w").write("half")
            open({str(half)!r}, "w").close()
            time.sleep(600)

        built_once_per_machine("tool", {key!r}, build)
    """)
    process = start_and_wait_for([sys.executable, "-c", builder], half, cwd=tmp_path,
                                 env={**os.environ, "XDG_CACHE_HOME": str(tmp_path)})
    assert process.poll() is None and half.exists()
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not os.path.exists(cache_folder("tool", key))  # the half-built folder kept its temporary name

    calls = []
    folder = built_once_per_machine("tool", key, counting_build(calls))
    assert len(calls) == 1 and open(os.path.join(folder, "tool")).read() == "complete"
    assert [name for name in os.listdir(tmp_path / "qwen-vl-caption-tools") if ".partial-" in name] == []

