"""A package of its own (tests/data/plugin) adds an objective and a scorer through the entry point
groups `spie.objectives` and `spie.scorers`, with no edit to trainer/, sampler/ or reward_servers/:
installed with pip into a folder of its own, it trains the tiny preset with its REINFORCE objective
on its greenness scorer, served by local `spie-reward serve greenness` replicas over the queue."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from trainer.errors import UserError
from trainer.objectives.base import Objective
from trainer.registry import objective_class, objective_names, register_objective

REPO = Path(__file__).resolve().parents[2]
PLUGIN = REPO / "tests" / "data" / "plugin"


def test_the_registry_refuses_a_taken_name_and_names_the_known_ones():
    class Impostor(Objective):
        name = "ppo"

    objective_class("ppo")
    with pytest.raises(ValueError, match="already registered"):
        register_objective(Impostor)
    with pytest.raises(UserError, match="train.objective: 'no_such' is not one of"):
        objective_class("no_such")
    assert {"ppo", "spie_ranking", "alignprop", "spo", "nft"} <= set(objective_names())


@pytest.fixture(scope="module")
def plugin_path(tmp_path_factory) -> Path:
    """The plugin installed (offline, no build isolation) into a folder of its own."""
    tmp = tmp_path_factory.mktemp("plugin")
    source = tmp / "src"
    shutil.copytree(PLUGIN, source)  # pip builds in the source folder: keep the repository clean
    target = tmp / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
         "--no-index", "--disable-pip-version-check", "--target", str(target), str(source)],
        check=True,
    )  # fmt: skip
    return target


def _env(plugin_path: Path) -> dict[str, str]:
    paths = [str(plugin_path), str(REPO), os.environ.get("PYTHONPATH", "")]
    return dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in paths if p), OMP_NUM_THREADS="1")


def test_the_plugin_is_found_in_process(plugin_path):
    code = (
        "import numpy as np\n"
        "from reward_servers.base import ScoreBatch, available_scorers, build_scorer\n"
        "from trainer.registry import objective_class, objective_names\n"
        "assert 'greenness' in available_scorers() and 'reinforce' in objective_names()\n"
        "green = np.zeros((4, 4, 3), np.uint8); green[..., 1] = 255\n"
        "r = build_scorer('greenness').score(ScoreBatch([green], [green], ['x']))\n"
        "print(objective_class('reinforce').__module__, float(r.scores[0]))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], env=_env(plugin_path), cwd=REPO, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["spie_plugin_example.reinforce", "1.0"]


def test_spie_reward_serves_the_plugin_scorer_over_grpc(plugin_path):
    import numpy as np

    from protos.spie.reward.v1 import reward_pb2 as pb
    from reward_servers.client import ScorerClient
    from reward_servers.images import make_item

    argv = [sys.executable, "-m", "reward_servers", "serve", "greenness", "--port", "0"]
    proc = subprocess.Popen(
        argv, cwd=REPO, env=_env(plugin_path), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        target = None
        while target is None:
            line = proc.stdout.readline()
            assert line or proc.poll() is None, "spie-reward serve greenness stopped"
            if "listening on" in line:
                target = line.split("listening on ")[1].split()[0]
        green = np.zeros((8, 8, 3), np.uint8)
        green[..., 1] = 255
        with ScorerClient(target) as client:
            client.wait_ready(60)
            reply = client.score([make_item("a", green, green)], timeout_s=60)
        assert reply.results[0].status == pb.Result.STATUS_OK
        assert reply.results[0].score == pytest.approx(1.0)
    finally:
        proc.kill()
        proc.wait(30)


@pytest.mark.slow
def test_the_plugin_trains_the_tiny_preset_over_the_queue(plugin_path, tmp_path):
    sets = [
        "run.num_epochs=2",
        "run.image_log_freq=0",
        "run.quiet=true",
        "run.name=plugin",
        f"run.output_dir={tmp_path / 'runs'}",
        "model.tiny_dir=runs/.tiny-ip2p",
        "train.objective=reinforce",
        "reward.scorers=[{name: greenness, role: semantic}]",
        "reward.transport=queue",
    ]
    argv = [sys.executable, "-m", "trainer.cli", "train", "--config", "configs/tiny.yaml"]
    for item in sets:
        argv += ["--set", item]
    out = subprocess.run(argv, env=_env(plugin_path), cwd=REPO, capture_output=True, text=True, timeout=540)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    assert "started 1 reward server(s): greenness" in out.stdout
    lines = (tmp_path / "runs" / "plugin" / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert [r["epoch"] for r in records] == [0, 1]
    for r in records:
        assert r["items_dropped"] == 0 and r["policy_version"] == r["epoch"]
        assert -1 <= r["greenness.mean"] <= 1
        assert r["reinforce_adv_abs"] > 0 and abs(r["loss"]) < 1e3
