"""The optional model-backed scorers of docker-compose.yml: compose profiles, each on its own GPU with
a health check, whose commands and configs the real CLI accepts; `spie cluster up` leaves them out
unless their profile is active or they are named."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from reward_servers.__main__ import build_parser
from reward_servers.config import load_serve_config
from trainer.cluster.compose import load_project
from trainer.errors import UserError

REPO = Path(__file__).resolve().parents[3]
COMPOSE = yaml.safe_load((REPO / "docker-compose.yml").read_text())
OPTIONAL = {
    "segmentation": "segmentation_structure",
    "aesthetic": "aesthetic",
    "hps": "hpsv2",
    "clip": "clip",
    "vlm-rating": "vlm_judge",
    "vlm-viescore": "vlm_judge",
    "grounding": "grounding",
    "edit-reward": "edit_reward",
}
ENV = {"SPIE_REDIS_PASSWORD": "p", "SPIE_RAY_TOKEN": "t", "SPIE_REWARD_TOKEN": "r"}


def test_optional_scorers_are_profiles_with_a_gpu_and_a_health_check():
    import jsonschema

    from reward_servers.base import available_scorers

    schema = json.loads((REPO / "tests" / "data" / "compose-spec.json").read_text())
    jsonschema.validate(COMPOSE, schema)
    parser = build_parser()
    for name, scorer in OPTIONAL.items():
        svc = COMPOSE["services"][name]
        assert svc["profiles"] and svc["healthcheck"]["test"][0] == "CMD"
        assert svc["deploy"]["resources"]["reservations"]["devices"][0]["count"] == 1
        args = parser.parse_args(svc["command"][1:])
        assert args.scorer == scorer and scorer in available_scorers()
        if args.config:
            config = load_serve_config(REPO / args.config)  # every field known, every value valid
            assert config.scorer, name


def test_cluster_up_starts_profiles_only_when_asked():
    files = [REPO / "docker-compose.yml"]
    plain = load_project(files, [], ENV)
    assert not set(OPTIONAL) & set(plain.services)
    viescore = load_project(files, [], ENV, profiles=["viescore"])
    assert "vlm-viescore" in viescore.services and "grounding" not in viescore.services
    named = load_project(files, [], {**ENV, "COMPOSE_PROFILES": "clip"}, targeted=["grounding"])
    assert {"clip", "grounding"} <= set(named.services)
    assert named.services["grounding"].gpus == 1


def test_a_dependency_on_an_inactive_profile_is_a_one_line_error(tmp_path):
    compose = tmp_path / "c.yml"
    compose.write_text(
        "services:\n  a: {command: [x], depends_on: [b]}\n  b: {command: [y], profiles: [extra]}\n"
    )
    with pytest.raises(UserError, match="no service 'b' .*--profile"):
        load_project([compose], [], {})
    assert set(load_project([compose], [], {}, profiles=["extra"]).services) == {"a", "b"}
