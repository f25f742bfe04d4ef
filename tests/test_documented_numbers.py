"""The speed figures the README and BENCHMARKS.md state are the committed benchmark's: bench/bench.py's table of
bench/results.json, row for row, under the date it was measured, and no other ratio beside it."""
import json
import os
import re

from bench.bench import table
from conftest import REPO

RATIO = re.compile(r"\b\d+(?:\.\d+)?x\b")


def read(name):
    with open(os.path.join(REPO, name), encoding="utf-8") as file:
        return file.read()


def committed():
    return json.loads(read(os.path.join("bench", "results.json")))


def stated_ratios(results):
    return {cell for line in table(results).splitlines() for cell in RATIO.findall(line)}


def current_cpu_section(results):
    """BENCHMARKS.md's section of that run, up to its record of earlier runs (whose figures carry their own dates)."""
    heading = f"## CPU, {results['date']}\n"
    text = read("BENCHMARKS.md")
    assert heading in text, f"BENCHMARKS.md has no section {heading.strip()!r} for bench/results.json"
    return text.split(heading, 1)[1].split("\n## ", 1)[0].split("\n### Earlier runs", 1)[0]


def test_benchmarks_md_shows_the_committed_results_table_under_its_date():
    results = committed()
    section = current_cpu_section(results)
    rows = [line for line in table(results).splitlines() if line.startswith("|")]
    assert len(rows) > 5
    for row in rows:
        assert row in section, f"BENCHMARKS.md's table differs from bench/results.json's:\n{row}"
    assert set(RATIO.findall(section)) <= stated_ratios(results)


def test_the_readme_states_only_the_committed_ratios_with_their_date():
    results = committed()
    readme = read("README.md")
    training = results["train"]["project"]["samples_per_s"] / results["train"]["recipe"]["samples_per_s"]
    assert f"trains {training:.1f}x faster than the recipe's" in readme
    assert results["date"] in readme[readme.index("x faster than the recipe's"):][:200]
    assert set(RATIO.findall(readme)) <= stated_ratios(results)
