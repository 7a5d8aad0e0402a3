"""Test-split work over shard groups: part jobs plus a gather write the files of one job, byte
for byte (traits, evaluate, fidelity, cam_maps), in the library and through Snakemake; and a
trait search stopped by a real SIGTERM resumes to the same files.

Inputs: the tiny pipeline's trained models (conftest.tiny_pipeline), with its one test shard
cut into several (:func:`reshard_test_split`), so that groups hold different shards and
batches of 3 would cross shard boundaries if the reader let them.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import threading
import time
from dataclasses import asdict
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from promptcam.data.batch_parts import BatchResults
from promptcam.data.reader import ShardGroup
from promptcam.data.shards import MANIFEST_NAME, write_tar
from promptcam.evaluation.evaluate import (
    EvalConfig,
    evaluate_rank,
    gather_evaluation,
    run_evaluate_part,
)
from promptcam.evaluation.fidelity import (
    FidelityConfig,
    gather_cam_maps,
    gather_fidelity,
    run_fidelity_part,
    run_rank_cam_maps,
    run_rank_fidelity,
)
from promptcam.evaluation.linear_probe import LinearProbeConfig
from promptcam.io import sha256_file
from promptcam.resources import SHARDED_STAGES, gathering_rule
from promptcam.training.preemption import PREEMPTED_EXIT_CODE
from promptcam.traits.cross_class import siblings_from_taxonomy
from promptcam.traits.parts import read_part
from promptcam.traits.run import (
    TraitRunConfig,
    gather_rank_traits,
    run_rank_traits,
    run_traits_part,
)

RANK = "species"
EVAL_FILES = {"eval": "eval.json", "confusion": "confusion.tsv"}
TRAIT_FILES = {
    "table": "traits.parquet",
    "maps": "trait_maps.npz",
    "summary": "trait_summary.tsv",
    "summary_maps": "trait_summary.npz",
    "cross_class": "cross_class.tsv",
    "cross_class_maps": "cross_class.npz",
}


def renamed(members: list[tuple[str, bytes]], copy: int) -> list[tuple[str, bytes]]:
    """A sample's tar members as its ``copy``-th copy: another key and sample id."""
    if copy == 0:
        return members
    out = []
    for name, data in members:
        key, ext = name.split(".", 1)
        if ext == "json":
            header = json.loads(data)
            header["sample_id"] = f"{header['sample_id']}_copy{copy}"
            data = json.dumps(header).encode()
        out.append((f"{key}_copy{copy}.{ext}", data))
    return out


def reshard_test_split(shards: Path, out: Path, per_shard: int, copies: int = 1) -> list[str]:
    """A copy of ``shards`` whose test split is cut into shards of ``per_shard`` samples, in
    the same sample order (``copies`` times over, the copies renamed); returns the new test
    shard files."""
    shutil.copytree(shards, out)
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    entries, files = [], []
    for entry in manifest["shards"]:
        if entry["split"] != "test":
            entries.append(entry)
            continue
        (out / entry["file"]).unlink()
        with tarfile.open(shards / entry["file"]) as tar:
            members = [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]
        originals: dict[str, list[tuple[str, bytes]]] = {}
        for name, data in members:
            originals.setdefault(name.split(".", 1)[0], []).append((name, data))
        samples = {
            f"{key}/{copy}": renamed(sample, copy)
            for copy in range(copies)
            for key, sample in originals.items()
        }
        keys = list(samples)
        for start in range(0, len(keys), per_shard):
            file = f"test-{len(files):06d}.tar"
            chosen = [member for key in keys[start : start + per_shard] for member in samples[key]]
            write_tar(out / file, chosen)
            entries.append(
                {
                    **entry,
                    "file": file,
                    "n_samples": len(keys[start : start + per_shard]),
                    "sha256": sha256_file(out / file),
                }
            )
            files.append(file)
    manifest["shards"] = entries
    manifest["splits"]["test"]["n_shards"] = len(files)
    (out / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2))
    return files


def read_state(path: Path) -> int:
    """Images in a preempted search's saved state."""
    with np.load(path) as data:
        assert str(data["format"]) == "promptcam-traits-state/1"
        return len(data["image"])


def digests(folder: Path, names: dict[str, str]) -> dict[str, str]:
    return {
        name: hashlib.sha256((folder / name).read_bytes()).hexdigest() for name in names.values()
    }


@pytest.fixture(scope="module")
def tiny(tiny_pipeline, tmp_path_factory) -> SimpleNamespace:
    results = tiny_pipeline.workdir / "results"
    root = tmp_path_factory.mktemp("scatter")
    files = reshard_test_split(results / "shards", root / "shards", per_shard=4)
    assert len(files) == 4  # 16 test images
    return SimpleNamespace(results=results, shards=root / "shards", root=root)


def trait_search(tiny: SimpleNamespace, **overrides) -> dict:
    settings = {"batch_size": 3, "device": "cpu", "threads": 1, "progress_seconds": 0}
    config = TraitRunConfig(**{**settings, **overrides})
    return {
        "checkpoint": tiny.results / RANK / "model.pt",
        "shards_dir": tiny.shards,
        "rank": RANK,
        "config": config,
        "siblings": siblings_from_taxonomy(tiny.results / "data" / "taxonomy.nwk", RANK),
        "labels_tsv": tiny.results / "data" / "labels" / f"{RANK}.tsv",
        "head_information": tiny.results / RANK / "head_information.tsv",
    }


def trait_outputs(folder: Path) -> dict[str, Path]:
    return {key: folder / name for key, name in TRAIT_FILES.items()}


def single_traits_of(tiny: SimpleNamespace, **overrides) -> dict[str, str]:
    """sha256 of the files of one job over the resharded test split (computed once)."""
    out = tiny.root / ("traits_single_" + "_".join(f"{k}{v}" for k, v in overrides.items()))
    if not (out / TRAIT_FILES["table"]).exists():
        run_rank_traits(outputs=trait_outputs(out), **trait_search(tiny, **overrides))
    return digests(out, TRAIT_FILES)


@pytest.fixture(scope="module")
def single_traits(tiny: SimpleNamespace) -> dict[str, str]:
    return single_traits_of(tiny, batch_size=3)


@pytest.mark.parametrize(("count", "workers"), [(1, 0), (2, 0), (3, 2), (5, 0)])
def test_gathered_traits_are_the_single_jobs_files(
    tiny: SimpleNamespace, single_traits: dict[str, str], tmp_path: Path, count: int, workers: int
) -> None:
    """3 groups of 4 shards are uneven (1, 1, 2); 5 leave one group empty; 2 loader workers
    deliver the batches of two shards interleaved."""
    search = trait_search(tiny, num_workers=workers)
    parts = []
    for index in range(count):
        group = ShardGroup(index, count)
        parts.append(tmp_path / f"traits_{group.name}.npz")
        run_traits_part(out_part=parts[-1], group=group, **search)
    sizes = [len(read_part(part).image_ids) for part in parts]
    assert sum(sizes) == 16 and (count < 5 or 0 in sizes), sizes
    gather_rank_traits(
        parts=parts,
        shards_dir=tiny.shards,
        rank=RANK,
        outputs=trait_outputs(tmp_path),
        config=search["config"],
    )
    assert digests(tmp_path, TRAIT_FILES) == single_traits


def test_gather_refuses_missing_or_reordered_parts(tiny: SimpleNamespace, tmp_path: Path) -> None:
    search = trait_search(tiny)
    parts = [tmp_path / f"traits_{i}of2.npz" for i in (1, 2)]
    for index, part in enumerate(parts):
        run_traits_part(out_part=part, group=ShardGroup(index, 2), **search)
    gather = dict(shards_dir=tiny.shards, rank=RANK, outputs=trait_outputs(tmp_path))
    with pytest.raises(ValueError, match="expected 1of2"):
        gather_rank_traits(parts=parts[::-1], config=search["config"], **gather)
    with pytest.raises(ValueError, match="holds shard group 1of2, expected 1of1"):
        gather_rank_traits(parts=parts[:1], config=search["config"], **gather)
    with pytest.raises(ValueError, match="rerun rule traits_part"):
        other = TraitRunConfig(batch_size=3, device="cpu", top_traits=2)
        gather_rank_traits(parts=parts, config=other, **gather)
    assert not (tmp_path / "traits.parquet").exists()


def test_shard_groups_partition_the_shards_in_order() -> None:
    for shards in range(0, 9):
        for count in range(1, 6):
            groups = [list(ShardGroup(i, count).bounds(shards)) for i in range(count)]
            assert [s for group in groups for s in group] == list(range(shards))
    assert ShardGroup.parse("2of3") == ShardGroup(1, 3) and ShardGroup(1, 3).name == "2of3"
    for wrong in ("0of3", "4of3", "2-3"):
        with pytest.raises(ValueError):
            ShardGroup.parse(wrong)


def restamp(folder: Path, like: Path) -> None:
    """Every file under ``folder``, and it, with the modification time of ``like``: the
    resharded copy must not look newer than the models trained on the original."""
    stamp = like.stat().st_mtime_ns
    for path in [*folder.rglob("*"), folder]:
        os.utime(path, ns=(stamp, stamp), follow_symlinks=False)


SCATTERED_FILES = {
    **TRAIT_FILES,
    **EVAL_FILES,
    "cam_maps": "cam_maps.npz",
    "fidelity": "fidelity.tsv",
    "counterfactual": "counterfactual.json",
    "curves": "fidelity_curves.tsv",
}


@pytest.mark.slow
def test_snakemake_scatters_the_test_split_work_and_gathers_the_same_files(
    tiny_pipeline, tiny: SimpleNamespace, tmp_path: Path, run_command, repo_root: Path
) -> None:
    """The tiny run copied twice (records kept) with its test split in 4 shards: with
    test_shard_groups 3, traits, evaluate, cam_maps and fidelity each plan 3 part jobs and a
    gathering job, for species only, nothing upstream; every gathered file equals that of the
    same run with one group; the parts are removed."""
    digest: dict[int, dict[str, str]] = {}
    for groups in (3, 1):
        workdir = tmp_path / f"run{groups}"
        shutil.copytree(tiny_pipeline.workdir, workdir, symlinks=True)
        shards = workdir / "results" / "shards"
        shutil.rmtree(shards)
        shutil.copytree(tiny.shards, shards)
        restamp(shards, tiny_pipeline.workdir / "results" / "shards" / MANIFEST_NAME)
        targets = [f"results/{RANK}/{name}" for name in SCATTERED_FILES.values()]
        # With groups the whole-split rules only gather, under their gathering names.
        whole = [gathering_rule(rule) if groups > 1 else rule for rule in SHARDED_STAGES]
        base = [sys.executable, "-m", "snakemake", *targets, "--cores", "2",
                "--snakefile", str(repo_root / "Snakefile"), "--directory", str(workdir),
                "--forcerun", *whole[:2], "--configfile", str(tiny_pipeline.configfile),
                "--config", f"test_shard_groups={groups}"]  # fmt: skip
        plan = run_command([*base, "--dry-run"], timeout=300, cwd=workdir)
        assert plan.returncode == 0, plan.stderr[-3000:]
        rules = sorted(re.findall(r"^rule (\w+):$", plan.stdout, re.M))
        parts = [f"{rule}_part" for rule in SHARDED_STAGES] * 3 if groups > 1 else []
        assert rules == sorted([*whole, *parts]), plan.stdout[-4000:]
        if groups > 1:
            assert set(re.findall(r"group=(\w+)", plan.stdout)) == {"1of3", "2of3", "3of3"}
        assert set(re.findall(r"rank=(\w+)", plan.stdout)) == {RANK}
        proc = run_command(base, timeout=900, cwd=workdir)
        assert proc.returncode == 0, proc.stderr[-6000:]
        digest[groups] = digests(workdir / "results" / RANK, SCATTERED_FILES)
        assert not list((workdir / "results" / RANK / "parts").glob("*.npz"))
    assert digest[3] == digest[1]
    assert digest[1]["traits.parquet"] == single_traits_of(tiny, batch_size=16)["traits.parquet"]
    benchmarks = tmp_path / "run3" / "results" / "benchmarks"
    for stage, name in (("traits", "traits"), ("evaluate", ""), ("traits", "fidelity")):
        stem = f"{name}_{RANK}_2of3" if name else f"{RANK}_2of3"
        assert (benchmarks / stage / f"{stem}.tsv").exists(), (stage, stem)


# ----------------------------------------------------------------------------- preemption

SEARCH_PROCESS = """
import json, logging, sys
from promptcam.training.preemption import exit_status
from promptcam.traits.run import TraitRunConfig, run_rank_traits
logging.basicConfig(level=logging.INFO, stream=sys.stderr)
spec = json.loads(sys.argv[1])
spec["config"] = TraitRunConfig(**spec["config"])
sys.exit(exit_status(run_rank_traits, **spec))
"""
PROGRESS = re.compile(r"(\d+)/(\d+) test images")


class SearchProcess:
    """``run_rank_traits`` in a process of its own, its progress lines watched."""

    def __init__(self, spec: dict, program: str = SEARCH_PROCESS) -> None:
        self.done, self.output = 0, []
        self.process = subprocess.Popen(
            [sys.executable, "-c", program, json.dumps(spec)],
            stderr=subprocess.PIPE,
            text=True,
        )
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.process.stderr:
            self.output.append(line)
            for done, _ in PROGRESS.findall(line):
                self.done = max(self.done, int(done))

    def wait_for_images(self, count: int, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while self.done < count:
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"no progress to {count} images:\n{self.log()}")
            time.sleep(0.002)

    def wait(self) -> int:
        code = self.process.wait(timeout=300)
        self.reader.join(timeout=10)
        return code

    def log(self) -> str:
        return "".join(self.output)[-4000:]


@pytest.mark.slow
@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGUSR1], ids=["TERM", "USR1"])
def test_a_signalled_trait_search_saves_its_batches_and_resumes_to_the_same_files(
    tiny: SimpleNamespace, tmp_path: Path, stop_signal: int
) -> None:
    """128 test images (the 16 eight times over, in 8 shards) one per batch, 2 loader
    workers: stopped after some batches, the search exits 75 with its batches saved, and the
    rerun searches only the rest and writes the uninterrupted run's files."""
    shards = tmp_path / "shards"
    reshard_test_split(tiny.results / "shards", shards, per_shard=16, copies=8)
    search = trait_search(tiny, batch_size=1, num_workers=2)
    config = {**asdict(search.pop("config")), "cross_class_pairs": {}}
    spec = {
        **{key: str(value) for key, value in search.items() if key != "siblings"},
        "siblings": search["siblings"],
        "shards_dir": str(shards),
        "config": config,
    }
    straight = tmp_path / "straight"
    assert (
        SearchProcess(
            {**spec, "outputs": {k: str(v) for k, v in trait_outputs(straight).items()}}
        ).wait()
        == 0
    )
    state = tmp_path / "parts" / "traits.partial.npz"
    stopped = tmp_path / "stopped"
    run_spec = {
        **spec,
        "outputs": {k: str(v) for k, v in trait_outputs(stopped).items()},
        "state_path": str(state),
    }
    run = SearchProcess(run_spec)
    run.wait_for_images(10)
    os.kill(run.process.pid, stop_signal)
    assert run.wait() == PREEMPTED_EXIT_CODE, run.log()
    assert f"stopped on {signal.Signals(stop_signal).name}" in run.log()
    assert not (stopped / "traits.parquet").exists()
    saved = read_state(state)
    assert 10 <= saved < 128, saved

    again = SearchProcess(run_spec)
    assert again.wait() == 0, again.log()
    assert f"resuming after {saved} searched test images" in "".join(again.output)
    assert not state.exists()
    assert digests(stopped, TRAIT_FILES) == digests(straight, TRAIT_FILES)


# ----------------------------------------------------------------------------- evaluate, fidelity

FIDELITY_FILES = {
    "table": "fidelity.tsv",
    "counterfactual": "counterfactual.json",
    "curves": "fidelity_curves.tsv",
}
CAM_FILES = {"cam_maps": "cam_maps.npz"}


def fidelity_inputs(tiny: SimpleNamespace, shards: Path | None = None, **overrides) -> dict:
    """max_images 10 of the 16 test images: groups past the 10th image score none."""
    settings = {"steps": 4, "max_images": 10, "batch_size": 3, "random_regions": 2}
    settings.update(random_maps=2, device="cpu", threads=1, **overrides)
    return {
        "checkpoint": tiny.results / RANK / "model.pt",
        "probe": tiny.results / RANK / "linear_probe.npz",
        "shards_dir": shards or tiny.shards,
        "rank": RANK,
        "trait_maps": tiny.results / RANK / "trait_maps.npz",
        "config": FidelityConfig(**settings),
    }


def fidelity_outputs(folder: Path) -> dict[str, Path]:
    return {
        "out_tsv": folder / FIDELITY_FILES["table"],
        "out_counterfactual": folder / FIDELITY_FILES["counterfactual"],
        "out_curves": folder / FIDELITY_FILES["curves"],
    }


def evaluation_inputs(tiny: SimpleNamespace, shards: Path | None = None, **overrides) -> dict:
    settings = {"batch_size": 3, "device": "cpu", "threads": 1, "num_workers": 0, **overrides}
    return {
        "shards_dir": shards or tiny.shards,
        "rank": RANK,
        "checkpoint": tiny.results / RANK / "model.pt",
        "probe": tiny.results / RANK / "linear_probe.npz",
        "config": EvalConfig(**settings, linear_probe=LinearProbeConfig(c_grid=(0.1, 1.0))),
    }


def evaluation_outputs(folder: Path, tiny: SimpleNamespace) -> dict:
    return {
        "out_json": folder / EVAL_FILES["eval"],
        "out_confusion": folder / EVAL_FILES["confusion"],
        "labels_tsv": tiny.results / "data" / "labels" / f"{RANK}.tsv",
    }


def write_single_jobs(tiny: SimpleNamespace, out: Path) -> dict[str, str]:
    """sha256 of evaluate's, fidelity's and cam_maps' files, one job each over the split."""
    run_rank_fidelity(**fidelity_inputs(tiny), **fidelity_outputs(out))
    run_rank_cam_maps(**fidelity_inputs(tiny), out_cam_maps=out / CAM_FILES["cam_maps"])
    evaluate_rank(**evaluation_inputs(tiny), **evaluation_outputs(out, tiny))
    return digests(out, {**EVAL_FILES, **FIDELITY_FILES, **CAM_FILES})


@pytest.fixture(scope="module")
def single_evaluations(tiny: SimpleNamespace) -> dict[str, str]:
    return write_single_jobs(tiny, tiny.root / "evaluations_single")


@pytest.mark.parametrize(("count", "workers"), [(2, 0), (3, 2), (5, 0)])
def test_gathered_evaluation_fidelity_and_cam_maps_are_the_single_jobs_files(
    tiny: SimpleNamespace,
    single_evaluations: dict[str, str],
    tmp_path: Path,
    count: int,
    workers: int,
) -> None:
    """The same cuts as the trait search's; fidelity's first 10 images end inside the third of
    4 shards, so some groups score part of their images or none."""
    parts: dict[str, list[Path]] = {"evaluate": [], "fidelity": [], "cam_maps": []}
    for index in range(count):
        group = ShardGroup(index, count)
        for stage, paths in parts.items():
            paths.append(tmp_path / f"{stage}_{group.name}.npz")
            if stage == "evaluate":
                inputs = evaluation_inputs(tiny, num_workers=workers)
                run_evaluate_part(out_part=paths[-1], group=group, **inputs)
            else:
                inputs = fidelity_inputs(tiny, num_workers=workers)
                run_fidelity_part(stage, out_part=paths[-1], group=group, **inputs)
    scored = [BatchResults.load(path).num_images for path in parts["fidelity"]]
    assert scored == {2: [8, 2], 3: [4, 4, 2], 5: [0, 4, 4, 2, 0]}[count], scored
    assert sum(BatchResults.load(path).num_images for path in parts["cam_maps"]) == 16
    gather_evaluation(
        parts=parts["evaluate"], **evaluation_inputs(tiny), **evaluation_outputs(tmp_path, tiny)
    )
    gather_fidelity(
        parts=parts["fidelity"],
        shards_dir=tiny.shards,
        rank=RANK,
        config=fidelity_inputs(tiny)["config"],
        **fidelity_outputs(tmp_path),
    )
    gather_cam_maps(
        parts=parts["cam_maps"],
        shards_dir=tiny.shards,
        rank=RANK,
        out_cam_maps=tmp_path / CAM_FILES["cam_maps"],
    )
    assert digests(tmp_path, {**EVAL_FILES, **FIDELITY_FILES, **CAM_FILES}) == single_evaluations


def test_evaluation_gathers_refuse_parts_of_other_runs(
    tiny: SimpleNamespace, tmp_path: Path
) -> None:
    first, second = tmp_path / "evaluate_1of2.npz", tmp_path / "evaluate_2of2.npz"
    run_evaluate_part(out_part=first, group=ShardGroup(0, 2), **evaluation_inputs(tiny))
    other = evaluation_inputs(tiny, batch_size=5)
    run_evaluate_part(out_part=second, group=ShardGroup(1, 2), **other)
    outputs = evaluation_outputs(tmp_path, tiny)
    with pytest.raises(ValueError, match=r"differ in \['batch_size'\].*rerun rule evaluate_part"):
        gather_evaluation(parts=[first, second], **evaluation_inputs(tiny), **outputs)
    with pytest.raises(ValueError, match="expected 1of2"):
        gather_evaluation(parts=[second, first], **evaluation_inputs(tiny), **outputs)
    first.write_bytes(b"not a part")
    with pytest.raises(ValueError, match=r"not a readable part.*rerun rule fidelity_part"):
        gather_fidelity(
            parts=[first],
            shards_dir=tiny.shards,
            rank=RANK,
            config=fidelity_inputs(tiny)["config"],
            **fidelity_outputs(tmp_path),
        )
    assert not (tmp_path / "eval.json").exists() and not (tmp_path / "fidelity.tsv").exists()


STAGE_PROCESS = """
import json, logging, sys
from promptcam.evaluation.evaluate import EvalConfig, evaluate_rank
from promptcam.evaluation.fidelity import FidelityConfig, run_rank_fidelity
from promptcam.evaluation.linear_probe import LinearProbeConfig
from promptcam.training.preemption import exit_status
logging.basicConfig(level=logging.DEBUG, stream=sys.stderr)
spec = json.loads(sys.argv[1])
if spec.pop("stage") == "fidelity":
    spec["config"] = FidelityConfig(**spec["config"])
    sys.exit(exit_status(run_rank_fidelity, **spec))
probe = LinearProbeConfig(**spec["config"].pop("linear_probe"))
spec["config"] = EvalConfig(**spec["config"], linear_probe=probe)
sys.exit(exit_status(evaluate_rank, **spec))
"""


def stage_spec(stage: str, inputs: dict, outputs: dict) -> dict:
    config = asdict(inputs["config"])
    if stage == "evaluate":
        config["linear_probe"]["c_grid"] = list(config["linear_probe"]["c_grid"])
    spec = {key: str(value) for key, value in {**inputs, **outputs}.items() if key != "config"}
    return {"stage": stage, **spec, "config": config}


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["fidelity", "evaluate"])
def test_a_signalled_evaluation_saves_its_batches_and_resumes_to_the_same_files(
    tiny: SimpleNamespace, tmp_path: Path, stage: str
) -> None:
    """One image per batch, 2 loader workers: SIGTERM after 3 batches makes fidelity (or
    evaluate) exit 75 with those batches saved; the rerun computes only the rest and writes
    the uninterrupted run's files."""
    if stage == "fidelity":
        inputs = fidelity_inputs(tiny, batch_size=1, num_workers=2, max_images=None)
        files = FIDELITY_FILES
        outputs = fidelity_outputs
    else:
        inputs = evaluation_inputs(tiny, batch_size=1, num_workers=2)
        files = EVAL_FILES
        outputs = lambda folder: evaluation_outputs(folder, tiny)  # noqa: E731
    straight = tmp_path / "straight"
    assert SearchProcess(stage_spec(stage, inputs, outputs(straight)), STAGE_PROCESS).wait() == 0
    state = tmp_path / "parts" / f"{stage}.partial.npz"
    stopped = tmp_path / "stopped"
    spec = {**stage_spec(stage, inputs, outputs(stopped)), "state_path": str(state)}
    run = SearchProcess(spec, STAGE_PROCESS)
    run.wait_for_images(3)
    os.kill(run.process.pid, signal.SIGTERM)
    assert run.wait() == PREEMPTED_EXIT_CODE, run.log()
    assert "stopped on SIGTERM" in run.log()
    assert not any((stopped / name).exists() for name in files.values())
    saved = BatchResults.load(state).num_images
    assert 3 <= saved < 16, saved

    again = SearchProcess(spec, STAGE_PROCESS)
    assert again.wait() == 0, again.log()
    assert f"resuming after {saved} test images" in "".join(again.output)
    assert not state.exists()
    assert digests(stopped, files) == digests(straight, files)
