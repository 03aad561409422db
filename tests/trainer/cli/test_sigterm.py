"""SIGTERM to `spie train` with the queue transport stops what the run started (its reward-server
replica and embedded Redis) instead of orphaning them, and exits 143 with one line."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]


def _children(pid: int) -> set[int]:
    """Every descendant of `pid` (from /proc/<pid>/task/*/children)."""
    found, todo = set(), [pid]
    while todo:
        p = todo.pop()
        for task in Path(f"/proc/{p}/task").glob("*"):
            try:
                kids = {int(x) for x in (task / "children").read_text().split()}
            except OSError:
                continue
            todo.extend(kids - found)
            found |= kids
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="reads the process tree from /proc")
def test_sigterm_stops_the_runs_servers(tmp_path, tiny_model_dir):
    cmd = [sys.executable, "-m", "trainer.cli", "train", "--config", "configs/tiny.yaml"]
    for kv in (
        f"run.output_dir={tmp_path}",
        "run.num_epochs=200",
        "run.image_log_freq=0",
        "eval.after_training=false",
        "reward.transport=queue",
        "model.tiny_dir=runs/.tiny-ip2p",
    ):
        cmd += ["--set", kv]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out: list[str] = []
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            assert line, "spie train ended early:\n" + "".join(out[-20:])
            out.append(line)
            if "epoch 0:" in line:  # the replica has scored a batch
                break
        else:
            pytest.fail("no epoch within 240 s:\n" + "".join(out[-20:]))
        started = _children(proc.pid)
        assert len(started) >= 2, started  # the replica and redis-server (and their wrappers)
        proc.send_signal(signal.SIGTERM)
        rest, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, "".join(out[-10:]) + rest
    assert "spie train: terminated (SIGTERM)" in rest
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and any(_alive(p) for p in started):
        time.sleep(0.2)
    left = {
        p: Path(f"/proc/{p}/cmdline").read_bytes().replace(b"\0", b" ")[:120] for p in started if _alive(p)
    }
    for p in left:  # do not leave them behind when the test fails
        os.kill(p, signal.SIGKILL)
    assert not left, f"orphaned by SIGTERM: {left}"
