"""A Ray job's relative run folder would land in Ray's scratch copy of the working dir: refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from trainer.errors import UserError
from trainer.run.durable import JOB_ENV, check_durable


def job_env(working_dir: str | None) -> dict[str, str]:
    runtime_env = {"working_dir": working_dir} if working_dir else {}
    return {
        JOB_ENV: json.dumps({"runtime_env": runtime_env, "metadata": {"job_submission_id": "raysubmit_1"}})
    }


def test_relative_output_dir_in_a_job_working_dir_is_refused_in_one_line(tmp_path):
    scratch = tmp_path / "session_1" / "runtime_resources" / "working_dir_files" / "_ray_pkg_abc"
    scratch.mkdir(parents=True)
    with pytest.raises(UserError) as err:
        check_durable(Path("runs/tiny"), environ=job_env("gcs://_ray_pkg_abc.zip"), cwd=scratch)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("run.output_dir: runs/tiny resolves to ")
    assert "--set run.output_dir=" in message
    # An absolute path that points back into the scratch copy is refused too.
    with pytest.raises(UserError):
        check_durable(scratch / "runs" / "x", environ=job_env("gcs://_ray_pkg_abc.zip"), cwd=scratch)


def test_durable_folders_and_runs_outside_a_job_pass(tmp_path):
    scratch = tmp_path / "runtime_resources" / "working_dir_files" / "_ray_pkg_abc"
    scratch.mkdir(parents=True)
    durable = tmp_path / "shared" / "runs" / "tiny"
    check_durable(durable, environ=job_env("gcs://_ray_pkg_abc.zip"), cwd=scratch)
    check_durable(Path("runs/tiny"), environ={}, cwd=scratch)  # not a Ray job: a local run
    # A job submitted without --working-dir runs where it was started: relative paths are kept.
    check_durable(Path("runs/tiny"), environ=job_env(None), cwd=tmp_path)
