"""Job logs keep what a job said, its progress output, and why it failed."""

import logging
import sys

import pytest

from promptcam.joblog import job_log


def test_messages_stderr_and_failures_land_in_the_log(tmp_path):
    path = tmp_path / "job.log"
    with pytest.raises(ValueError, match="bad row"), job_log(path, "demo task") as log:
        log.info("started")
        print("progress 50%", file=sys.stderr)
        raise ValueError("bad row 7")
    text = path.read_text()
    assert "started" in text and "progress 50%" in text
    assert "demo task failed" in text and "ValueError: bad row 7" in text
    logging.getLogger().handlers.clear()
