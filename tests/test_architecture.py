"""The library's layering, as import contracts (``[tool.importlinter]`` in pyproject.toml), and
the modules that must stay importable without torch."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

TORCH_FREE = (
    "promptcam.config",
    "promptcam.resources",  # the workflow's resource callables, at every start
    "promptcam.data.metadata",
    "promptcam.model.spec",
    "promptcam.figures.style",
    "promptcam.traits.tables",  # the figures read the traits stage's files through it
    "promptcam.data.samples",  # and the shards through it
    "promptcam.cli",  # `promptcam --help` must answer at once
)
HEAVY = ("torch", "torchvision", "timm")


def _lint_imports(root: Path) -> subprocess.CompletedProcess:
    """`lint-imports` on the tree at ``root`` (its pyproject.toml, its packages)."""
    search = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    command = shutil.which("lint-imports", path=search)
    if command is None:
        pytest.fail("lint-imports is missing: install the test extras (pip install -e '.[test]')")
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run(
        [command, "--no-cache", "--no-logo"],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_import_contracts_hold(repo_root):
    result = _lint_imports(repo_root)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    assert "0 broken" in result.stdout, result.stdout[-3000:]


def test_import_contracts_catch_an_import_up_a_floor_and_torch_in_figures(repo_root, tmp_path):
    """The contracts are not vacuous: a copy of the tree with two violations fails them."""
    for name in ("promptcam", "research", "benchmarks"):
        shutil.copytree(
            repo_root / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__")
        )
    shutil.copy(repo_root / "pyproject.toml", tmp_path / "pyproject.toml")
    with open(tmp_path / "promptcam" / "data" / "masks.py", "a") as handle:
        handle.write("\nfrom promptcam.model import spec  # noqa: E402\n")
    with open(tmp_path / "promptcam" / "figures" / "style.py", "a") as handle:
        handle.write("\nimport torch  # noqa: E402\n")
    result = _lint_imports(tmp_path)
    assert result.returncode != 0
    broken = [line for line in result.stdout.splitlines() if line.endswith("BROKEN")]
    assert any("Figures read output files only" in line for line in broken), result.stdout
    assert any("data wing stands on the ground" in line for line in broken), result.stdout
    assert "promptcam.data.masks -> promptcam.model.spec" in result.stdout


@pytest.mark.parametrize("module", TORCH_FREE)
def test_module_imports_without_torch(module, repo_root):
    code = (
        f"import sys, {module}\n"
        f"print(sorted({{m.split('.')[0] for m in sys.modules}} & {set(HEAVY)!r}))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=repo_root,
        env={**os.environ, "PYTHONPATH": str(repo_root)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "[]", f"{module} imports {result.stdout.strip()}"


def test_research_and_benchmark_scripts_still_start(repo_root):
    """Nothing in the product imports them, so nothing else notices when a library change
    breaks one: each must at least import and answer --help (one process for all)."""
    scripts = sorted(
        str(path)
        for folder in ("research", "benchmarks")
        for path in (repo_root / folder).glob("*.py")
    )
    assert len(scripts) >= 9, scripts
    code = (
        "import runpy, sys\n"
        "failed = []\n"
        f"for script in {scripts!r}:\n"
        "    sys.argv = [script, '--help']\n"
        "    try:\n"
        "        runpy.run_path(script, run_name='__main__')\n"
        "    except SystemExit as stop:\n"
        "        if stop.code not in (0, None):\n"
        "            failed.append((script, stop.code))\n"
        "    except Exception as error:\n"
        "        failed.append((script, repr(error)))\n"
        "    else:\n"
        "        failed.append((script, 'no --help'))\n"
        "print(failed)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=repo_root,
        env={**os.environ, "PYTHONPATH": str(repo_root)},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == "[]", result.stdout[-3000:]
