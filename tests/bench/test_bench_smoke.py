"""Every benchmark in bench/ runs its smallest setting as a subprocess, so none can crash unseen.

The figures are not checked (they depend on the machine); only that each script finishes with
status 0 and prints the load line every benchmark reports (`bench.paired.load_line`) where it has
one. One torch thread each, so a busy CI machine does not slow them tenfold.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# script -> (its smallest setting, seconds it may take, whether it prints the load line)
SMOKE = {
    "sampler_overhead.py": (["--smoke"], 240, True),
    "flow_sampler.py": (["--batch", "1", "--steps", "2", "--runs", "1", "--resolution", "16"], 240, True),
    "loop_check.py": (["--smoke"], 240, True),
    "overlap.py": (["--smoke"], 300, True),
    "queue.py": (["--smoke"], 240, True),
    "redis_scale.py": (["--smoke"], 240, True),
    "reward_grad.py": (["--smoke"], 300, True),
    "reward_server.py": (["--smoke"], 300, True),
    "spo.py": (["--smoke"], 300, True),
    "spo_judge.py": (["--smoke"], 240, True),
    "step_sensitivity.py": (["--smoke"], 240, True),
    "autoscale.py": (["--smoke"], 300, True),
    "chaos.py": (["--smoke"], 600, True),
    "learning.py": (["--smoke"], 600, True),
    "guards.py": (["--smoke"], 300, True),
    "gpu_first_hour.py": (["configs/tiny.yaml", "--device", "cpu", "--repeats", "1"], 300, False),
}


def test_every_benchmark_has_a_smoke_setting():
    scripts = {p.name for p in (ROOT / "bench").glob("*.py")} - {"paired.py", "interleaved.py", "__init__.py"}
    assert scripts == set(SMOKE), f"benchmarks without a smoke setting: {sorted(scripts - set(SMOKE))}"


@pytest.mark.slow
@pytest.mark.parametrize("script", sorted(SMOKE))
def test_benchmark_smoke(script, tmp_path):
    args, timeout, load = SMOKE[script]
    env = dict(
        os.environ,
        PYTHONPATH=str(ROOT),
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
        SPIE_BENCH_OUT=str(tmp_path),
    )
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / script), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    tail = (proc.stdout + proc.stderr)[-3000:]
    assert proc.returncode == 0, f"{script} {' '.join(args)} failed:\n{tail}"
    if load:
        assert "load average" in proc.stdout, f"{script} did not print the load it ran under:\n{tail}"
