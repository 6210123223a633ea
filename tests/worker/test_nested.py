"""worker/nested.py's decisions without processes: is this hep-exec inside another one's job?
(tests/worker/test_hep_exec_claims.py runs real nested jobs.)"""

from __future__ import annotations

import pytest

from worker.nested import MARKER, OuterJob, marker_value, outer_job, status_field

STATUS = "Name:\tpython3\nTgid:\t4242\nPid:\t4243\nPPid:\t77\nTracerPid:\t4100\nUid:\t1000\t1000\n"


def test_status_fields() -> None:
    assert status_field(STATUS, "TracerPid") == 4100
    assert status_field(STATUS, "Tgid") == 4242
    assert status_field(STATUS, "Missing") is None
    assert status_field("TracerPid:\t\n", "TracerPid") is None
    assert status_field("", "Tgid") is None


def test_the_job_that_traces_us_is_found() -> None:
    env = {MARKER: marker_value(4100, "/cvmfs")}
    assert outer_job(env, 4100) == OuterJob(4100, "/cvmfs")


@pytest.mark.parametrize(
    ("marker", "tracer"),
    [
        (None, 4100),  # no marker: not inside a job
        ("4100 /cvmfs", None),  # not traced: a marker copied from a job's environment
        ("4100 /cvmfs", 4101),  # traced by another process (a debugger, another tool)
        ("4100", 4100),  # malformed: no mount
        ("x /cvmfs", 4100),
        ("4100 cvmfs", 4100),  # not an absolute path
        ("", 4100),
    ],
)
def test_anything_else_is_not_inside_a_job(marker: str | None, tracer: int | None) -> None:
    env = {} if marker is None else {MARKER: marker}
    assert outer_job(env, tracer) is None
