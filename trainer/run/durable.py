"""Where a run's outputs may live: not in the scratch copy of a Ray job's working dir.

`ray job submit --working-dir .` unpacks the checkout into
`<ray temp>/session_*/runtime_resources/working_dir_files/_ray_pkg_<hash>/` and runs the entrypoint
there, so a relative `run.output_dir` (the default `runs`) lands in that copy, which Ray deletes when
the cluster stops, and the job still ends SUCCEEDED. `check_durable` refuses that in one line.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from trainer.errors import UserError

# Set by Ray's job supervisor in the entrypoint's environment (ray._private.runtime_env.constants).
JOB_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"
SCRATCH_MARK = "runtime_resources"


def ray_job_scratch(environ: dict[str, str] | None = None, cwd: Path | None = None) -> Path | None:
    """The folder Ray deletes after this job (its unpacked working dir), or None outside a Ray job or
    when the job was submitted without a working dir under Ray's runtime resources."""
    environ = os.environ if environ is None else environ
    raw = environ.get(JOB_ENV)
    if not raw:
        return None
    try:
        runtime_env = json.loads(raw).get("runtime_env") or {}
    except (ValueError, AttributeError):
        runtime_env = {}
    cwd = (cwd or Path.cwd()).resolve()
    if runtime_env.get("working_dir") or SCRATCH_MARK in cwd.parts:
        return cwd
    return None


def check_durable(
    run_dir: Path,
    field: str = "run.output_dir",
    environ: dict[str, str] | None = None,
    cwd: Path | None = None,
) -> None:
    """`UserError` when `run_dir` lies inside a Ray job's scratch working dir (or anywhere under Ray's
    runtime resources), naming `field` and the fix."""
    scratch = ray_job_scratch(environ, cwd)
    if scratch is None:
        return
    where = (scratch / run_dir).resolve() if not run_dir.is_absolute() else run_dir.resolve()
    if where.is_relative_to(scratch) or SCRATCH_MARK in where.parts:
        raise UserError(
            f"{field}: {run_dir} resolves to {where}, inside this Ray job's uploaded working dir, which "
            f"Ray deletes when the cluster stops; set {field} to durable storage the driver's node keeps "
            f"(an absolute path, e.g. --set {field}=/mnt/shared/spie-runs)"
        )
