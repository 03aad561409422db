"""Fast checks of what the container test runs (it is slow and not in `make test`): the CPU override
merges into docker-compose.yml as a valid Compose file whose commands the real CLIs accept, and the
Dockerfiles give every healthcheck a `python`."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import yaml

from reward_servers.__main__ import build_parser as reward_parser
from trainer.cli import build_parser
from trainer.config import load_config

REPO = Path(__file__).resolve().parents[2]


class _Reset:
    pass


class _Loader(yaml.SafeLoader):
    """Compose's `!reset` (drop the value from the files before) for this test's merge."""


_Loader.add_constructor("!reset", lambda loader, node: _Reset())


def _merge(base, override):
    """Compose's merge for what the override uses: mappings merge, `!reset` drops, the rest replaces."""
    if isinstance(base, dict) and isinstance(override, dict):
        out = dict(base)
        for key, value in override.items():
            if isinstance(value, _Reset):
                out.pop(key, None)
            else:
                out[key] = _merge(base.get(key), value) if key in base else copy.deepcopy(value)
        return out
    return copy.deepcopy(override)


def _merged() -> dict:
    base = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    override = yaml.load((REPO / "deploy/compose.cpu.yml").read_text(), Loader=_Loader)  # noqa: S506
    return _merge(base, override)


def test_the_cpu_profile_is_a_valid_compose_file_without_gpus():
    import jsonschema

    merged = _merged()
    jsonschema.validate(merged, json.loads((REPO / "tests/data/compose-spec.json").read_text()))
    services = merged["services"]
    default = {n for n, s in services.items() if not s.get("profiles")}
    assert default == {"redis", "brightness", "ray-head", "trainer"}
    assert not any("deploy" in services[n] for n in default)  # no GPU reservation left
    deps = services["trainer"]["depends_on"]
    assert all(deps[n]["condition"] == "service_healthy" for n in ("redis", "brightness", "ray-head"))
    assert deps["depth"]["required"] is False and deps["vlm-judge"]["required"] is False
    assert not any("ports" in s for s in services.values())
    head = services["ray-head"]["command"]
    assert "--num-cpus=2" in head and services["ray-head"]["environment"]["RAY_AUTH_MODE"] == "token"


def test_the_cpu_profile_commands_are_real_and_the_run_is_the_tiny_queue_run():
    services = _merged()["services"]
    args = reward_parser().parse_args(services["brightness"]["command"][1:])
    assert args.scorer == "brightness" and services["brightness"]["environment"]["SPIE_REWARD_TOKEN"]
    command = [re.sub(r"\$\{SPIE_RUN_NAME:-([^}]*)\}", r"\1", a) for a in services["trainer"]["command"]]
    args = build_parser().parse_args(command[1:])
    config = load_config(args.config, args.overrides)
    assert config.reward.transport == "queue" and not config.reward.launch_servers
    assert [s.name for s in config.reward.scorers] == ["brightness"]
    assert config.run.name == "cpu-compose" and config.run.device == "cpu"
    assert command[command.index("--ray-address") + 1] == "ray://ray-head:10001"


def test_the_images_have_python_on_path_and_take_their_base_and_torch_as_build_args():
    for name in ("reward", "trainer"):
        text = (REPO / f"deploy/Dockerfile.{name}").read_text()
        assert text.index("ARG BASE_IMAGE=nvidia/cuda:") < text.index("FROM ${BASE_IMAGE}")
        assert "ARG TORCH_SPEC=" in text and "ARG TORCH_INDEX=" in text
        assert "PATH=/opt/venv/bin:$PATH" in text and "venv /opt/venv" in text
        assert "chown spie:spie" in text and "/cache/huggingface" in text
    assert "/app/runs" in (REPO / "deploy/Dockerfile.trainer").read_text()
