"""The layout a reader relies on: the scripts at the top, the shared code a package of single-job files that imports
no script and has no import cycle, and every --help answered without loading torch or transformers."""
import ast
import glob
import os
import subprocess
import sys

import pytest

from conftest import REPO

SCRIPTS = sorted(os.path.basename(path)[:-3] for path in glob.glob(os.path.join(REPO, "*.py")))
PACKAGE = os.path.join(REPO, "captioning")
HEAVY = ("torch", "transformers", "peft", "swanlab", "gradio", "datasets", "modelscope", "deepspeed")


def imported_modules(path):
    """Every module a file imports, at its top or inside a function."""
    with open(path, encoding="utf-8") as file:
        tree = ast.parse(file.read())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            yield node.module
            if node.module == "captioning":  # from captioning import step_plan
                yield from (f"captioning.{alias.name}" for alias in node.names)


def package_imports():
    """{module: the package modules it imports} for each file of the package."""
    graph = {}
    for path in glob.glob(os.path.join(PACKAGE, "*.py")):
        name = f"captioning.{os.path.basename(path)[:-3]}"
        graph[name] = {module for module in imported_modules(path) if module.startswith("captioning.")}
    return graph


def test_the_top_level_holds_only_what_users_run():
    assert SCRIPTS == ["compare", "csv2json", "data2csv", "demo", "export_gguf", "infer", "merge", "train", "train_rl",
                       "verify"]


def test_the_package_imports_no_script():
    for path in glob.glob(os.path.join(PACKAGE, "*.py")):
        imported = {module.split(".")[0] for module in imported_modules(path)}
        assert not imported & set(SCRIPTS), f"{path} imports {imported & set(SCRIPTS)}"


def test_the_package_has_no_import_cycle():
    graph = package_imports()
    assert "captioning.step_plan" in graph and "captioning.errors" in graph
    unknown = set().union(*graph.values()) - set(graph)
    assert not unknown, f"imports of modules that do not exist: {unknown}"
    done, path = set(), []

    def visit(module):
        assert module not in path, "import cycle: " + " -> ".join(path[path.index(module):] + [module])
        if module in done:
            return
        path.append(module)
        for imported in sorted(graph[module]):
            visit(imported)
        path.pop()
        done.add(module)

    for module in sorted(graph):
        visit(module)


def test_the_package_docstring_lists_every_module_in_one_line():
    import captioning

    listed = [line.split()[0] for line in captioning.__doc__.splitlines()[1:] if line.strip()]
    modules = sorted(os.path.basename(path)[:-3] for path in glob.glob(os.path.join(PACKAGE, "*.py")))
    assert sorted(listed) == [module for module in modules if module != "__init__"]


def test_the_benchmarks_do_not_import_the_tests():
    """What both need (tiny models, a file server) lives in testkit/, which imports neither."""
    for path in glob.glob(os.path.join(REPO, "bench", "*.py")) + glob.glob(os.path.join(REPO, "testkit", "*.py")):
        with open(path, encoding="utf-8") as file:
            source = file.read()
        test_modules = {os.path.basename(test)[:-3] for test in glob.glob(os.path.join(REPO, "tests", "*.py"))}
        assert not set(imported_modules(path)) & (test_modules | {"tests", "conftest"}), path
        assert '"tests"' not in source, f"{path} puts tests/ on its path"
    for path in glob.glob(os.path.join(REPO, "testkit", "*.py")):
        assert not {module.split(".")[0] for module in imported_modules(path)} & {"bench", "tests"}, path


def test_each_package_file_says_its_job_in_its_docstring():
    for path in glob.glob(os.path.join(PACKAGE, "*.py")):
        with open(path, encoding="utf-8") as file:
            docstring = ast.get_docstring(ast.parse(file.read()))
        assert docstring and len(docstring.split("\n\n")[0]) < 300, path  # a short first paragraph: its job


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_loads_nothing_heavy(script):
    probe = ("import runpy, sys\n"
             f"sys.argv = [{script + '.py'!r}, '--help']\n"
             "try:\n"
             f"    runpy.run_path({script + '.py'!r}, run_name='__main__')\n"
             "except SystemExit as exit:\n"
             "    assert exit.code == 0, exit.code\n"
             f"print(sorted(module for module in {HEAVY!r} if module in sys.modules))\n")
    result = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    *help_text, heavy = result.stdout.strip().splitlines()
    assert f"usage: python {script}.py" in "\n".join(help_text)
    assert heavy == "[]", f"{script}.py --help imported {heavy}"


def test_every_list_of_the_model_families_names_them_all():
    """In what users read (the scripts' help and comments, the benchmarks, the docs), a line that names all but one of
    the families is a list left behind when a family was added."""
    from captioning.models import FAMILIES

    names = [family.name for family in FAMILIES.values()]
    stale = []
    for path in [*glob.glob(os.path.join(REPO, "*.py")), *glob.glob(os.path.join(REPO, "*.md")),
                 *glob.glob(os.path.join(REPO, "bench", "*.py")), *glob.glob(os.path.join(REPO, "docs", "*.md"))]:
        with open(path, encoding="utf-8") as file:
            for number, line in enumerate(file, 1):
                named = [name for name in names if name in line]
                if len(named) == len(names) - 1:
                    stale.append(f"{os.path.relpath(path, REPO)}:{number}: {line.strip()}")
    assert not stale, "\n".join(stale)
