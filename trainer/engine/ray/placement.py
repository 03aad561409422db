"""Placing a gang of actors: one placement group for the rollout workers, one for the learners."""

from __future__ import annotations

import ray
from ray.exceptions import GetTimeoutError
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from trainer.errors import UserError


def bundle(cpus: float, gpus: float, extra: dict[str, float] | None = None) -> dict[str, float]:
    """The resources one actor reserves (a placement-group bundle), zero entries left out."""
    out = {"CPU": cpus, "GPU": gpus, **(extra or {})}
    return {k: float(v) for k, v in out.items() if v}


def place_gang(what: str, n: int, one: dict[str, float], strategy: str, timeout_s: float) -> PlacementGroup:
    """Reserve `n` bundles `one` as one placement group, or raise a one-line `UserError` naming `what`
    could not be placed and what the cluster has."""
    pg = placement_group([one] * n, strategy=strategy)
    try:
        ray.get(pg.ready(), timeout=timeout_s)
    except GetTimeoutError as err:
        remove_placement_group(pg)
        raise UserError(
            f"ray: the cluster cannot place {n} {what} of {one} ({strategy}) within {timeout_s:.0f}s; "
            f"it has {ray.cluster_resources()}"
        ) from err
    return pg


def in_bundle(pg: PlacementGroup, index: int) -> PlacementGroupSchedulingStrategy:
    """The scheduling strategy that puts an actor in bundle `index` of `pg`."""
    return PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=index)
