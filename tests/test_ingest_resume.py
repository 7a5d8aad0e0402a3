"""Shard writing resumes after a crash without rewriting finished shards, byte-identically."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from ingest_corpus import jpeg_bytes, make_dataset, save_csv

from promptcam.data.metadata import MetadataSpec, prepare_metadata
from promptcam.data.shards import ShardConfig, plan_shards, write_shards
from promptcam.data.splits import SplitConfig

LEVELS = ("family", "genus", "species")
SMALL_SHARDS = ShardConfig(short_side=16, max_samples_per_shard=4)


def prepared(root: Path, per_species: int = 10) -> Path:
    dataset = make_dataset(root, per_species)
    table = save_csv(dataset, root / "metadata.csv")
    return prepare_metadata(table, root, root / "data", MetadataSpec(), SplitConfig())


def shard(root: Path, out: Path, config: ShardConfig = SMALL_SHARDS, workers: int = 1) -> Path:
    return write_shards(
        root / "data" / "metadata.parquet", root / "data" / "labels", root, out, LEVELS,
        config, workers=workers,
    )  # fmt: skip


def contents(folder: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir())}


def image_of_shard(root: Path, number: int, config: ShardConfig = SMALL_SHARDS) -> Path:
    table = pd.read_parquet(root / "data" / "metadata.parquet")
    plan = plan_shards(table, config.max_samples_per_shard)[number]
    return root / plan.rows["image"].iloc[0]


@pytest.mark.parametrize("workers", [1, 2])
def test_failed_run_resumes_from_its_finished_shards(tmp_path, workers, caplog):
    prepared(tmp_path)
    clean = contents(shard(tmp_path, tmp_path / "clean").parent)
    broken = image_of_shard(tmp_path, 2)  # the third shard fails
    original = broken.read_bytes()
    broken.write_bytes(b"not an image any more")
    out = tmp_path / "shards"
    with pytest.raises(RuntimeError, match=f"cannot encode {broken}"):
        shard(tmp_path, out, workers=workers)
    partial = tmp_path / "shards.partial"
    finished = sorted(p.name for p in partial.glob("*.tar"))
    assert finished[:2] == ["train-000000.tar", "train-000001.tar"]
    before = {name: os.stat(partial / name) for name in finished}
    broken.write_bytes(original)
    with caplog.at_level(logging.INFO):
        shard(tmp_path, out, workers=workers)
    assert f"resuming: {len(finished)} of {len(clean) - 1} shard(s) finished earlier" in caplog.text
    for name, stat in before.items():  # moved, never rewritten: same inode, same time
        after = os.stat(out / name)
        assert (after.st_ino, after.st_mtime_ns) == (stat.st_ino, stat.st_mtime_ns)
    assert contents(out) == clean
    assert not partial.exists()


def test_changed_settings_or_damaged_shards_are_not_reused(tmp_path, caplog):
    prepared(tmp_path)
    broken = image_of_shard(tmp_path, 2)
    original = broken.read_bytes()
    broken.write_bytes(b"broken")
    with pytest.raises(RuntimeError):
        shard(tmp_path, tmp_path / "shards")
    broken.write_bytes(original)
    partial = tmp_path / "shards.partial"
    damaged = partial / "train-000001.tar"
    damaged.write_bytes(damaged.read_bytes()[:-512])
    with caplog.at_level(logging.INFO):
        shard(tmp_path, tmp_path / "shards")
    assert "resuming: 1 of" in caplog.text  # train-000000 only: 000001 fails its checksum
    assert contents(tmp_path / "shards") == contents(shard(tmp_path, tmp_path / "clean").parent)

    broken.write_bytes(b"broken")
    with pytest.raises(RuntimeError):
        shard(tmp_path, tmp_path / "again")
    broken.write_bytes(original)
    caplog.clear()
    other = ShardConfig(short_side=16, max_samples_per_shard=4, jpeg_quality=80)
    with caplog.at_level(logging.INFO):
        shard(tmp_path, tmp_path / "again", other)
    assert "resuming" not in caplog.text  # other settings: other bytes, nothing reusable
    assert contents(tmp_path / "again") == contents(shard(tmp_path, tmp_path / "c80", other).parent)


KILLABLE = """
import sys
from pathlib import Path
from promptcam.data.shards import ShardConfig, write_shards
root = Path(sys.argv[1])
write_shards(root / "data" / "metadata.parquet", root / "data" / "labels", root,
             Path(sys.argv[2]), ("family", "genus", "species"),
             ShardConfig(short_side=1024, max_samples_per_shard=3))
"""


def test_killed_run_resumes_byte_identically(tmp_path):
    dataset = make_dataset(tmp_path, per_species=8)
    for index, path in enumerate(dataset["image"]):  # 2000x1500 JPEGs: ~0.1 s per sample
        (tmp_path / path).write_bytes(jpeg_bytes((2000, 1500), seed=index))
    prepare_metadata(
        save_csv(dataset, tmp_path / "m.csv"), tmp_path, tmp_path / "data", MetadataSpec(),
        SplitConfig(),
    )  # fmt: skip
    out, partial = tmp_path / "shards", tmp_path / "shards.partial"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    command = [sys.executable, "-c", KILLABLE, str(tmp_path), str(out)]
    process = subprocess.Popen(command, env=env)
    deadline = time.monotonic() + 120
    while len(list(partial.glob("*.done.json"))) < 2 and process.poll() is None:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "finished before it could be killed"
    finished = {p.name.removesuffix(".done.json") for p in partial.glob("*.done.json")}
    assert len(finished) >= 2 and not (out / "manifest.json").exists()
    assert subprocess.run([*command], env=env, check=False).returncode == 0
    subprocess.run([*command[:-1], str(tmp_path / "clean")], env=env, check=True)
    assert contents(out) == contents(tmp_path / "clean")
