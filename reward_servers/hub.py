"""One question to the model hub before a scorer loads, so an unreachable checkpoint fails in seconds.

A scorer's `from_pretrained` asks the hub for each file with five retries and growing waits: about 50 s
and a screen of warnings before `spie serve` could say the hub is unreachable. `hub_problem` asks
once, with a timeout and no retries (`huggingface_hub.model_info`), and only for a name that can be a
hub id (`org/name`, not a folder here) and is not already in the local hub cache; `HF_HUB_OFFLINE`
means no question at all. The trainer asks the same before a run starts
(`sampler.models.hub_problem`); this copy lives here because reward servers import nothing of the
trainer's (import-linter's contract: their image holds only `reward_servers` and `protos`).
"""

from __future__ import annotations

import os
from pathlib import Path

CONFIG_FILES = ("config.json", "model_index.json", "preprocessor_config.json")


class HubUnavailable(OSError):
    """The hub cannot serve a scorer's checkpoint (an OSError: `spie serve` says it in one line)."""


def hub_problem(model_id: str, revision: str | None = None, timeout_s: float = 5.0) -> str | None:
    """Why `model_id` cannot be had from the hub (None: a folder, cached, or the hub answered)."""
    if not model_id or Path(model_id).expanduser().exists():
        return None
    if model_id.startswith(("/", "./", "../", "~")) or len(Path(model_id).parts) != 2:
        return None  # a path: the scorer's own loader names the missing folder
    try:
        from huggingface_hub import constants, model_info, try_to_load_from_cache
    except ImportError:  # pragma: no cover - comes with transformers
        return None
    for name in CONFIG_FILES:
        if isinstance(try_to_load_from_cache(model_id, name, revision=revision), str):
            return None
    fix = (
        f"download it where the hub is reachable (`hf download {model_id} --local-dir DIR`) and set "
        "the scorer's model_id to DIR"
    )
    offline = os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")
    if offline or constants.HF_HUB_OFFLINE:
        return f"model {model_id!r} is not in the local hub cache and HF_HUB_OFFLINE is set; {fix}"
    try:
        model_info(model_id, revision=revision, timeout=timeout_s)
    except Exception as err:  # noqa: BLE001 - any failure is said in one line
        reason = (str(err).splitlines() or [""])[0][:160]
        return f"the hub cannot serve model {model_id!r} ({type(err).__name__}: {reason}); {fix}"
    return None


def check_hub(kwargs: dict, params) -> None:
    """Raise `HubUnavailable` when the scorer's `model_id` (given, or its default) cannot be had."""
    model_id = kwargs.get("model_id")
    if model_id is None and "model_id" in params:
        model_id = params["model_id"].default
    if isinstance(model_id, str):
        problem = hub_problem(model_id, kwargs.get("revision"))
        if problem:
            raise HubUnavailable(problem)
