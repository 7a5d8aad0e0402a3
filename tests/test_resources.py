"""promptcam.resources: a rule's cluster request from what it was measured to need."""

from __future__ import annotations

import math

import pytest

from promptcam.resources import (
    GPU_RULES,
    MAX_RUNTIME_MIN,
    MEASURED,
    MIN_MEM_MB,
    MIN_RUNTIME_MIN,
    SHARDED_STAGES,
    TIME_HEADROOM,
    UNMEASURED,
    JobSize,
    gathering_rule,
    job_resources,
    read_split_counts,
    table_rows_estimate,
)

DEMO_SPECIES = JobSize(images=720, train=504, val=108, test=108, classes=12, epochs=40,
                       fidelity_images=48)  # fmt: skip


def test_every_request_covers_its_measured_points_with_headroom():
    """The demo's species train job (67.3 s, 1,507 MB peak) and its slowest fidelity job
    (79.5 s), 2026-12-07 (benchmarks/RESULTS.md, "Rule resources"); a part of 3 groups."""
    train = job_resources("train", DEMO_SPECIES)
    assert train.runtime * 60 >= TIME_HEADROOM * 67.3 and train.mem_mb >= 2 * 1507
    fidelity = job_resources("fidelity", DEMO_SPECIES)
    assert fidelity.runtime * 60 >= TIME_HEADROOM * 79.5
    # A part asks for its group's share; the slowest fidelity part of the tiny run took 6.9 s.
    part = job_resources("fidelity_part", JobSize(test=16, fidelity_images=16, test_groups=3))
    assert part.runtime * 60 >= TIME_HEADROOM * 6.9
    for rule in MEASURED:
        request = job_resources(rule, DEMO_SPECIES)
        assert request.mem_mb >= MIN_MEM_MB and request.runtime >= MIN_RUNTIME_MIN, rule


def test_requests_grow_with_the_data_and_the_attempt_up_to_the_cap():
    big = JobSize(images=10_000_000, train=8_000_000, val=1_000_000, test=1_000_000,
                  classes=10_000, epochs=130, fidelity_images=1_000)  # fmt: skip
    small, large = (
        job_resources("prepare_metadata", DEMO_SPECIES),
        job_resources("prepare_metadata", big),
    )
    assert large.mem_mb > small.mem_mb and large.runtime > small.runtime
    # measured at 1M rows: 866 MB peak; 10M rows scale that line
    assert large.mem_mb >= 2 * (226 + 0.000639 * 10_000_000)
    first, second = job_resources("traits", big), job_resources("traits", big, attempt=2)
    assert second.mem_mb >= 2 * first.mem_mb - 256
    assert second.runtime == min(MAX_RUNTIME_MIN, 2 * first.runtime) > first.runtime
    assert job_resources("train", big, attempt=3).runtime == MAX_RUNTIME_MIN
    with pytest.raises(ValueError):
        job_resources("train", big, attempt=0)


def test_an_unmeasured_rule_gets_the_old_flat_request():
    assert job_resources("no_such_rule", DEMO_SPECIES, attempt=2) == type(UNMEASURED)(
        UNMEASURED.mem_mb * 2, UNMEASURED.runtime * 2
    )


def test_sizes_from_a_label_map_and_a_table(tmp_path):
    labels = tmp_path / "genus.tsv"
    labels.write_text(
        "index\tname\tparent\tcount\tn_train\tn_val\tn_test\n"
        "0\tA\tF\t10\t6\t2\t2\n1\tB\tF\t20\t14\t3\t3\n"
    )
    assert read_split_counts(labels) == (2, 20, 5, 5)
    assert read_split_counts(tmp_path / "missing.tsv") is None
    table = tmp_path / "metadata.csv"
    table.write_text("x" * 7200)
    assert table_rows_estimate(table) == 100
    packed = tmp_path / "metadata.parquet"
    packed.write_bytes(b"x" * 7200)
    assert table_rows_estimate(packed) == math.ceil(7200 / 18)
    assert table_rows_estimate(tmp_path / "none.csv") == 0


def test_a_part_asks_for_its_groups_share_and_a_gather_for_no_gpu():
    big = JobSize(test=8_000, fidelity_images=8_000, test_groups=8)
    for stage in SHARDED_STAGES:
        whole, part = job_resources(stage, big), job_resources(f"{stage}_part", big)
        assert part.units == math.ceil(whole.units / 8) and part.runtime <= whole.runtime, stage
        assert f"{stage}_part" in GPU_RULES and gathering_rule(stage) not in GPU_RULES
    # Fidelity, the slowest per image: an eighth of one job's hours, the fixed cost apart.
    whole, part = job_resources("fidelity", big), job_resources("fidelity_part", big)
    assert whole.runtime > 60 and part.runtime < whole.runtime / 4, (whole, part)
    # The images fidelity scores are the split's first: the first group may hold all of them.
    few = JobSize(test=8_000, fidelity_images=500, test_groups=8)
    assert job_resources("fidelity_part", few).units == 500
    # The traits parts hold their group's trait maps, the gather all of them.
    many = JobSize(test=1_000_000, test_groups=8)
    assert (
        job_resources("traits_part", many).mem_mb * 4 < job_resources("traits_gather", many).mem_mb
    )
