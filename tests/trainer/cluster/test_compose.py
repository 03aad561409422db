"""docker-compose.yml against the Compose spec schema, and its commands against the real `spie` CLI."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from trainer.cli import build_parser

# The Compose spec schema (compose-spec/compose-spec, schema/compose-spec.json, commit 170098b,
# Apache-2.0, tests/data/compose-spec.LICENSE), as provided in ../shared/schemas; a copy travels
# with the tests so CI checks it on any checkout.
SCHEMA = Path(__file__).resolve().parents[2] / "data" / "compose-spec.json"
REPO = Path(__file__).resolve().parents[3]
COMPOSE = yaml.safe_load((REPO / "docker-compose.yml").read_text())


def test_compose_file_follows_the_compose_spec():
    import jsonschema

    jsonschema.validate(COMPOSE, json.loads(SCHEMA.read_text()))


def test_every_spie_service_runs_a_real_entry_point_and_redis_needs_a_password():
    from reward_servers.__main__ import build_parser as reward_parser

    parsers = {"spie": build_parser(), "spie-reward": reward_parser()}
    commands = {
        n: s["command"] for n, s in COMPOSE["services"].items() if s.get("command", [None])[0] in parsers
    }
    assert {"depth", "vlm-judge", "trainer"} <= set(commands)
    # The reward servers run the reward-only entry point: their image holds reward_servers and protos.
    assert commands["depth"][0] == commands["vlm-judge"][0] == "spie-reward"
    for name, command in commands.items():
        args = parsers[command[0]].parse_args(command[1:])  # argparse exits on an unknown subcommand or flag
        assert callable(args.func), name
        env = COMPOSE["services"][name]["environment"]
        assert env["REDIS_URL"].startswith("redis://redis:") and env["REDIS_PASSWORD"]
    redis = COMPOSE["services"]["redis"]
    assert "--requirepass" in " ".join(redis["command"]) and "ports" not in redis
    for name in ("depth", "vlm-judge"):
        assert COMPOSE["services"][name]["deploy"]["resources"]["reservations"]["devices"][0][
            "capabilities"
        ] == ["gpu"]


def test_the_trainer_command_is_a_consistent_config():
    from trainer.config import load_config

    command = COMPOSE["services"]["trainer"]["command"]
    args = build_parser().parse_args(command[1:])
    config = load_config(args.config, args.overrides)
    assert config.reward.transport == "queue" and not config.reward.launch_servers
    assert config.effective_train_batch == 256


def test_the_trainer_drives_a_ray_head_that_publishes_nothing():
    services = COMPOSE["services"]
    head = services["ray-head"]["command"]
    assert head[:3] == ["ray", "start", "--head"] and "--dashboard-host=127.0.0.1" in head
    client_port = next(a.split("=")[1] for a in head if a.startswith("--ray-client-server-port="))
    trainer = services["trainer"]
    command = trainer["command"]
    assert command[command.index("--ray-address") + 1] == f"ray://ray-head:{client_port}"
    assert trainer["depends_on"]["ray-head"] == {"condition": "service_healthy"}
    assert services["ray-head"]["environment"]["RAY_AUTH_MODE"] == "token"
    assert not any("ports" in s for s in services.values())  # nothing reachable from outside


def test_the_cpu_profile_merges_with_reset_override_and_optional_dependencies():
    """deploy/compose.cpu.yml over docker-compose.yml, as `spie cluster up` reads it: the GPU scorers
    are in an inactive profile (their `required: false` dependencies dropped), `!reset` removes the
    head's GPU reservation, and every command keeps its token and password."""
    from trainer.cluster.compose import load_project

    env = {"SPIE_REDIS_PASSWORD": "p", "SPIE_RAY_TOKEN": "r", "SPIE_REWARD_TOKEN": "t"}
    files = [REPO / "docker-compose.yml", REPO / "deploy" / "compose.cpu.yml"]
    project = load_project(files, [], env)
    assert set(project.services) == {"redis", "brightness", "ray-head", "trainer"}
    assert project.services["ray-head"].gpus == 0 and project.services["trainer"].gpus == 0
    assert project.services["trainer"].depends_on == {
        "redis": "service_healthy",
        "brightness": "service_healthy",
        "ray-head": "service_healthy",
    }
    with_gpu = load_project(files, [], env, profiles=["gpu"])
    assert {"depth", "vlm-judge"} <= set(with_gpu.services["trainer"].depends_on)
