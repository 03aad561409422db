"""`reward.launch`, `reward.redis_host` and `reward.ray` (trainer/config/reward_scaling.py): parsing,
the `launch_servers` alias and one-line errors naming the field."""

from __future__ import annotations

import pytest

from trainer.config import load_config
from trainer.config.reward_scaling import launch_mode
from trainer.errors import UserError

QUEUE = ["reward.transport=queue"]


def test_launch_modes_and_the_launch_servers_alias():
    assert launch_mode(load_config("configs/tiny.yaml", QUEUE).reward) == "local"
    assert launch_mode(load_config("configs/tiny.yaml", [*QUEUE, "reward.launch=ray"]).reward) == "ray"
    assert launch_mode(load_config("configs/tiny.yaml", [*QUEUE, "reward.launch=none"]).reward) == "none"
    off = load_config("configs/tiny.yaml", [*QUEUE, "reward.launch=ray", "reward.launch_servers=false"])
    assert launch_mode(off.reward) == "none"  # the older switch still turns launching off


def test_per_scorer_replicas_parse_and_default_to_a_fixed_count():
    config = load_config(
        "configs/tiny.yaml",
        [
            *QUEUE,
            "reward.launch=ray",
            "reward.replicas=3",
            "reward.ray.scorers=[{scorer: brightness, num_gpus: 1, resources: {reward_slot: 1},"
            " min_replicas: 1, max_replicas: 4, target_drain_s: 5}]",
        ],
    )
    spec = config.reward.ray.for_scorer("brightness", config.reward.replicas)
    assert (spec.num_gpus, spec.resources, spec.min_replicas, spec.most) == (1.0, {"reward_slot": 1}, 1, 4)
    other = config.reward.ray.for_scorer("sleep", config.reward.replicas)
    assert (other.min_replicas, other.most, other.num_cpus, other.num_gpus) == (3, 3, 1.0, 0.0)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("reward.launch=ray", "reward.launch=ray needs reward.transport=queue, got 'inprocess'"),
        ("reward.launch=k8s", "reward.launch: 'k8s' is not one of 'local', 'ray', 'none'"),
        (
            "reward.ray.scorers=[{scorer: brightness, min_replicas: 3, max_replicas: 2}]",
            "reward.ray.scorers[brightness].max_replicas (2) must be 0 or >= min_replicas (3)",
        ),
        ("reward.ray.scorers=[{scorer: clip}]", "reward.ray.scorers names ['clip'], not in reward.scorers"),
        ("reward.ray.scorers=[{min_replicas: 2}]", "reward.ray.scorers: every entry needs `scorer`"),
        (
            "reward.ray.scorers=[{scorer: brightness, target_drain_s: 0}]",
            "reward.ray.scorers[brightness].target_drain_s must be > 0, got 0",
        ),
        ("reward.ray.interval_s=0", "reward.ray.interval_s must be > 0, got 0"),
    ],
)
def test_errors_are_one_line_naming_the_field(override, message):
    with pytest.raises(UserError) as err:
        load_config("configs/tiny.yaml", [override])
    assert str(err.value).startswith(message) and "\n" not in str(err.value)
