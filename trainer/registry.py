"""The registry of objectives: `train.objective` name -> the class that implements it.

The config loader, the learner and the loop hold no objective names: they ask here, and call the
`trainer.objectives.base.Objective` contract on what they get. This room sits at the bottom of the
trainer (it imports only `trainer.errors`), so every room may ask it; the objective modules
themselves, which import the engine, are loaded on demand by name:

- the built-ins: the modules of `BUILTIN_OBJECTIVES` (each registers itself with
  `register_objective`);
- other packages': the Python entry points of the group `spie.objectives`, `<name> =
  "<module>:<Class>"` (or `"<module>"`, which registers its class itself).

A name is registered once: a second class under a taken name is refused.
"""

from __future__ import annotations

import importlib
import inspect
from importlib.metadata import entry_points
from typing import Any

from trainer.errors import UserError

ENTRY_POINT_GROUP = "spie.objectives"
# The objectives this package ships: name -> the module that registers it.
BUILTIN_OBJECTIVES = {
    "ppo": "trainer.objectives.ppo",
    "spie_ranking": "trainer.objectives.spie_ranking",
    "alignprop": "trainer.objectives.alignprop",
    "spo": "trainer.objectives.spo",
    "nft": "trainer.objectives.nft",
}
_OBJECTIVES: dict[str, type] = {}


def register_objective(cls: type) -> type:
    """Class decorator: register an objective under its `name` (a taken name is refused)."""
    name = getattr(cls, "name", "")
    if not isinstance(name, str) or not name:
        raise ValueError(f"objective {cls!r} has no `name`")
    if name in _OBJECTIVES and _OBJECTIVES[name] is not cls:
        raise ValueError(f"objective {name!r} is already registered by {_OBJECTIVES[name]!r}")
    _OBJECTIVES[name] = cls
    return cls


def _plugins() -> dict[str, Any]:
    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


def objective_names() -> list[str]:
    """Every objective `train.objective` may name: the built-ins, the registered and the plugins."""
    return sorted(set(BUILTIN_OBJECTIVES) | set(_OBJECTIVES) | set(_plugins()))


def objective_class(name: str) -> type:
    """The class registered as `name`, its module loaded first if need be; `UserError` if unknown."""
    if name not in _OBJECTIVES:
        if name in BUILTIN_OBJECTIVES:
            importlib.import_module(BUILTIN_OBJECTIVES[name])
        else:
            ep = _plugins().get(name)
            if ep is not None:
                obj = ep.load()
                if inspect.isclass(obj) and name not in _OBJECTIVES:
                    register_objective(obj)
    if name not in _OBJECTIVES:
        known = ", ".join(repr(n) for n in objective_names())
        raise UserError(f"train.objective: {name!r} is not one of {known}")
    return _OBJECTIVES[name]


def make_objective(config: Any) -> Any:
    """The objective of `config.train.objective`, bound to `config`."""
    return objective_class(config.train.objective)(config)
