"""The conda environments in envs/ agree with pyproject.toml and hold what their rules import.

Each rule's script runs in its `conda:` environment (with --software-deployment-method conda),
so that environment needs every third-party package the script imports, directly or through
the promptcam modules it imports. Snakemake itself need not be in them: the script preamble
appends the calling Snakemake's sys.path to the job's.
"""

from __future__ import annotations

import ast
import json
import os
import re
import sys
import tomllib
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import Version

# Import name -> distribution name, where they differ.
DISTRIBUTION = {"PIL": "pillow", "sklearn": "scikit-learn", "yaml": "pyyaml"}
# Packages needed at run time without being imported by name.
IMPLIED = {
    "pandas": {"pyarrow"},  # parquet tables (metadata.parquet, traits.parquet)
    "ete3": {"six"},  # ete3 3.1.3 imports six without declaring it
}
NOT_PACKAGES = {"python", "pip"}
RULE = re.compile(r"^rule (\w+):\n(.*?)(?=^\S|\Z)", re.S | re.M)


def conda_spec(text: str) -> tuple[str, SpecifierSet]:
    """A conda match spec ("ete3=3.1.3", "numpy>=1.26") as name and pip-style specifier."""
    match = re.fullmatch(r"([A-Za-z0-9_.\-]+)\s*(.*)", text.strip())
    assert match, text
    name, spec = match.groups()
    if re.fullmatch(r"=[^=<>!].*", spec):  # conda's "=V" pins V (and V.*)
        spec = "=" + spec
    return str(canonicalize_name(name)), SpecifierSet(spec.replace(" ", ""))


def env_packages(path: Path) -> dict[str, SpecifierSet]:
    packages = {}
    for entry in yaml.safe_load(path.read_text())["dependencies"]:
        if isinstance(entry, dict):
            for line in entry["pip"]:
                requirement = Requirement(line)
                packages[str(canonicalize_name(requirement.name))] = requirement.specifier
        else:
            name, spec = conda_spec(entry)
            packages[name] = spec
    return packages


def pyproject(repo_root: Path) -> dict:
    return tomllib.loads((repo_root / "pyproject.toml").read_text())["project"]


def declared(repo_root: Path) -> dict[str, SpecifierSet]:
    requirements = (Requirement(line) for line in pyproject(repo_root)["dependencies"])
    return {str(canonicalize_name(r.name)): r.specifier for r in requirements}


def env_files(repo_root: Path) -> list[Path]:
    return sorted((repo_root / "envs").glob("*.yaml"))


def pinned(spec: SpecifierSet) -> str | None:
    pins = [s.version for s in spec if s.operator in ("==", "===")]
    return pins[0] if pins else None


def test_env_files_exist(repo_root):
    assert {path.name for path in env_files(repo_root)} >= {
        "data.yaml",
        "train.yaml",
        "traits.yaml",
        "figures.yaml",
    }


@pytest.mark.parametrize("name", ["data.yaml", "train.yaml", "traits.yaml", "figures.yaml"])
def test_env_agrees_with_pyproject(repo_root, name):
    env = env_packages(repo_root / "envs" / name)
    project = declared(repo_root)
    python = env.pop("python")
    requires_python = SpecifierSet(pyproject(repo_root)["requires-python"])
    assert Version(pinned(python).rstrip(".*")) in requires_python, (python, requires_python)
    env.pop("pip", None)
    for package, spec in env.items():
        assert package in project, f"{name}: {package} is not a dependency in pyproject.toml"
        theirs = project[package]
        mine_pin, their_pin = pinned(spec), pinned(theirs)
        if mine_pin and their_pin:
            assert Version(mine_pin) == Version(their_pin), (name, package, spec, theirs)
        elif mine_pin or their_pin:
            # One pins, the other bounds: the pin must lie within the bounds.
            pin, bounds = (mine_pin, theirs) if mine_pin else (their_pin, spec)
            assert bounds.contains(pin, prereleases=True), (name, package, spec, theirs)
        else:
            assert spec == theirs, f"{name}: {package}{spec} but pyproject.toml has {theirs}"


def module_file(repo_root: Path, module: str) -> Path | None:
    base = repo_root.joinpath(*module.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.exists():
            return path
    return None


def is_type_checking_block(node: ast.AST) -> bool:
    """``if TYPE_CHECKING:`` (or ``typing.TYPE_CHECKING``): imports for annotations only."""
    if not isinstance(node, ast.If):
        return False
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def runtime_nodes(tree: ast.AST) -> list[ast.AST]:
    """Every node of ``tree`` but those under ``if TYPE_CHECKING:``, which never run (as the
    import contracts in pyproject.toml, exclude_type_checking_imports)."""
    found, todo = [], [tree]
    while todo:
        node = todo.pop()
        found.append(node)
        if is_type_checking_block(node):
            todo.extend(node.orelse)
            continue
        todo.extend(ast.iter_child_nodes(node))
    return found


def third_party_imports(repo_root: Path, script: Path) -> set[str]:
    """Top-level third-party modules a script imports, itself or through promptcam modules
    (every import statement, including those inside functions)."""
    found: set[str] = set()
    seen: set[Path] = set()
    todo = [script]
    while todo:
        tree = ast.parse(todo.pop().read_text())
        for node in runtime_nodes(tree):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top == "promptcam":
                    path = module_file(repo_root, name)
                    if path is not None and path not in seen:
                        seen.add(path)
                        todo.append(path)
                elif top not in sys.stdlib_module_names:
                    found.add(top)
    return found


def rules_with_scripts(repo_root: Path) -> list[tuple[str, Path, Path | None]]:
    """(rule, script, conda env file or None) of every rule that runs a script."""
    rules = []
    for smk in sorted((repo_root / "workflow" / "rules").glob("*.smk")):
        for name, body in RULE.findall(smk.read_text()):
            script = re.search(r'script:\s*\n\s*"([^"]+)"', body)
            conda = re.search(r'conda:\s*\n\s*"([^"]+)"', body)
            if script:
                rules.append(
                    (
                        name,
                        (smk.parent / script.group(1)).resolve(),
                        (smk.parent / conda.group(1)).resolve() if conda else None,
                    )
                )
    return rules


def test_every_rule_env_holds_what_its_script_imports(repo_root):
    rules = rules_with_scripts(repo_root)
    assert {"train", "evaluate", "traits", "fidelity", "write_shards"} <= {r for r, _, _ in rules}
    project = declared(repo_root)
    missing = []
    for rule, script, env_file in rules:
        assert env_file is not None and env_file.exists(), f"rule {rule} has no conda env file"
        needed = {DISTRIBUTION.get(m, m) for m in third_party_imports(repo_root, script)}
        needed = {str(canonicalize_name(n)) for n in needed}
        for package in list(needed):
            needed |= IMPLIED.get(package, set())
        undeclared = needed - set(project)
        assert not undeclared, f"rule {rule} imports {undeclared}, not in pyproject.toml"
        absent = needed - set(env_packages(env_file))
        if absent:
            missing.append(f"rule {rule} ({env_file.name}) lacks {sorted(absent)}")
    assert not missing, "\n".join(missing)
    # The deep-learning rules above pull in the heavy stack; make sure the scan saw it.
    train_needs = third_party_imports(repo_root, repo_root / "scripts" / "train.py")
    assert {"torch", "timm", "webdataset"} <= train_needs


def test_every_env_installs_the_package_by_its_post_deploy_script(repo_root):
    """Snakemake runs envs/NAME.post-deploy.sh inside the environment of envs/NAME.yaml right
    after creating it; each installs this package, so a rule runs in its environment alone."""
    scripts = {}
    for env_file in env_files(repo_root):
        script = env_file.with_name(env_file.stem + ".post-deploy.sh")
        assert script.exists(), f"{env_file.name} has no {script.name}"
        scripts[script.name] = script.read_text()
        dependencies = yaml.safe_load(env_file.read_text())["dependencies"]
        assert "pip" in dependencies, f"{env_file.name}: the post-deploy script needs pip"
    assert len(set(scripts.values())) == 1, "the post-deploy scripts differ"
    text = next(iter(scripts.values()))
    assert 'pip install --no-deps --no-input --quiet --editable "$repo"' in text
    # The Snakefile tells the scripts where the repository is (they run from a copy in the
    # conda prefix, in the working directory).
    snakefile = (repo_root / "Snakefile").read_text()
    assert "os.environ.update(PROMPTCAM_REPO=workflow.basedir)" in snakefile


def test_post_deploy_script_installs_the_package_alone_into_a_bare_environment(
    repo_root, tmp_path, run_command
):
    """A fresh environment without this machine's packages (a venv standing in for a conda
    environment; no conda here), the script run as Snakemake runs it (sh, from elsewhere):
    the package imports from the repository and no dependency came with it."""
    env_dir = tmp_path / "env"
    made = run_command([sys.executable, "-m", "venv", str(env_dir)], timeout=120)
    assert made.returncode == 0, made.stderr
    script = repo_root / "envs" / "traits.post-deploy.sh"
    path = f"{env_dir / 'bin'}{os.pathsep}{os.environ['PATH']}"
    bare = {k: v for k, v in os.environ.items() if k not in {"PYTHONPATH", "VIRTUAL_ENV"}}
    unset = run_command(["sh", str(script)], timeout=60, cwd=tmp_path, env={**bare, "PATH": path})
    assert unset.returncode != 0 and "PROMPTCAM_REPO" in unset.stderr, unset.stderr
    env = {**bare, "PATH": path, "PROMPTCAM_REPO": str(repo_root)}
    done = run_command(["sh", str(script)], timeout=300, cwd=tmp_path, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    python = env_dir / "bin" / "python"
    where = run_command(
        [str(python), "-c", "import promptcam, promptcam.resources; print(promptcam.__file__)"],
        timeout=60,
        cwd=tmp_path,
        env=bare,
    )
    assert where.returncode == 0, where.stderr
    assert Path(where.stdout.strip()) == repo_root / "promptcam" / "__init__.py"
    listed = run_command([str(python), "-m", "pip", "list", "--format=json"], timeout=60, env=bare)
    installed = {str(canonicalize_name(p["name"])) for p in json.loads(listed.stdout)}
    assert "promptcam-traits" in installed
    assert not installed & {"torch", "numpy", "pandas", "snakemake"}, installed
