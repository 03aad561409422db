"""Reading a configuration: YAML presets (with `base:` overlays), dotted `--set` overrides applied to the
dict tree, type checks with one-line errors naming the field, unknown-key refusal, and validation."""

from __future__ import annotations

import contextlib
import dataclasses
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from sampler.editors import editor_names
from trainer.config.schema import Config
from trainer.errors import UserError
from trainer.registry import make_objective

# --------------------------------------------------------------------------- parsing


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check/convert a YAML value to the annotated type `tp`; errors name the field `where`."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise UserError(f"{where}: expected a mapping, got {value!r}")
        return _build(tp, value, where)
    if origin is Literal:
        if value not in args:
            raise UserError(f"{where}: {value!r} is not one of {', '.join(map(repr, args))}")
        return value
    if origin is tuple:
        if isinstance(value, str | dict) or not isinstance(value, list | tuple):
            raise UserError(f"{where}: expected a list, got {value!r}")
        return tuple(_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise UserError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise UserError(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise UserError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise UserError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise UserError(f"{where}: expected a string, got {value!r}")
        return value
    return value


def _build(cls: Any, data: dict[str, Any], where: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        prefix = f"{where}." if where else ""
        raise UserError(
            f"unknown config key {prefix}{unknown[0]} (known keys in {where or 'the top level'}: "
            f"{', '.join(sorted(names))})"
        )
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}" if where else k) for k, v in data.items()}
    return cls(**kwargs)


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict) and key != "kwargs":
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _apply_override(tree: dict[str, Any], item: str) -> None:
    if "=" not in item:
        raise UserError(f"--set {item!r}: expected KEY=VALUE, e.g. train.learning_rate=1e-5")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError as err:
        raise UserError(f"--set {key}: cannot parse value {raw!r}") from err
    parts = key.split(".")
    node = tree
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise UserError(f"--set {key}: {part} is not a section")
    node[parts[-1]] = value


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise UserError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise UserError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from err
    if not isinstance(data, dict):
        raise UserError(f"{path}: the top level must be a mapping of sections")
    # A preset may build on another: `base: other.yaml` (relative to this file).
    parent = data.pop("base", None)
    if parent:
        data = _merge(_read_yaml(path.parent / parent), data)
    return data


def _fix_numeric_strings(cls: Any, data: dict[str, Any]) -> dict[str, Any]:
    """YAML 1.1 reads `3e-5` as a string: turn such strings into floats where the field is a float."""
    hints = typing.get_type_hints(cls)
    out = {}
    for key, value in data.items():
        tp = hints.get(key)
        if tp is float and isinstance(value, str):
            with contextlib.suppress(ValueError):
                value = float(value)
        elif tp is not None and dataclasses.is_dataclass(tp) and isinstance(value, dict):
            value = _fix_numeric_strings(tp, value)
        out[key] = value
    return out


def _drop_replaced_keys(tree: dict[str, Any]) -> None:
    """Older run folders say `run.num_processes: 1`; the number of learners is `ray.num_learners` now."""
    run = tree.get("run")
    if isinstance(run, dict) and "num_processes" in run:
        if run["num_processes"] != 1:
            raise UserError(
                "run.num_processes: replaced by ray.num_learners (data-parallel learners, with Ray)"
            )
        del run["num_processes"]


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Load a preset, apply `--set` overrides, check consistency. Raises `UserError` on any problem."""
    return _from_tree(_read_yaml(Path(path)) if path else {}, overrides)


def with_overrides(config: Config, overrides: list[str] | tuple[str, ...]) -> Config:
    """`config` with `--set` overrides applied to its dict tree, checked again like a loaded preset."""
    return _from_tree(to_dict(config), overrides) if overrides else config


def _from_tree(tree: dict[str, Any], overrides: list[str] | tuple[str, ...]) -> Config:
    for item in overrides:
        _apply_override(tree, item)
    _drop_replaced_keys(tree)
    tree = _fix_numeric_strings(Config, tree)
    if "reward" in tree and isinstance(tree["reward"], dict) and "scorers" in tree["reward"]:
        scorers = tree["reward"]["scorers"]
        if not isinstance(scorers, list) or not scorers:
            raise UserError("reward.scorers: expected a non-empty list of scorers")
    config = _build(Config, tree, "")
    validate(config)
    return config


def validate(config: Config) -> None:
    """Refuse inconsistent settings with one line naming the fields."""
    s, t, r, m = config.sample, config.train, config.run, config.model

    def need(ok: bool, message: str) -> None:
        if not ok:
            raise UserError(message)

    for name, value in (
        ("run.num_epochs", r.num_epochs),
        ("sample.num_steps", s.num_steps),
        ("sample.batch_size", s.batch_size),
        ("sample.num_batches_per_epoch", s.num_batches_per_epoch),
        ("sample.nb_gen", s.nb_gen),
        ("train.batch_size", t.batch_size),
        ("train.gradient_accumulation_steps", t.gradient_accumulation_steps),
        ("train.num_inner_epochs", t.num_inner_epochs),
        ("model.resolution", m.resolution),
        ("model.lora_rank", m.lora_rank),
    ):
        need(value >= 1, f"{name} must be >= 1, got {value}")
    need(s.eta >= 0, f"sample.eta must be >= 0, got {s.eta}")
    f = config.sft
    need(f.steps >= 0 and f.batch_size >= 1, "sft.steps must be >= 0 and sft.batch_size >= 1")
    need(f.learning_rate > 0, f"sft.learning_rate must be > 0, got {f.learning_rate}")
    need(
        0 <= f.conditioning_dropout <= 1 / 3,
        f"sft.conditioning_dropout must be in [0, 1/3] (three cases), got {f.conditioning_dropout}",
    )
    need(0 <= f.ema_decay < 1, f"sft.ema_decay must be in [0, 1), got {f.ema_decay}")
    need(
        0 < t.timestep_fraction <= 1, f"train.timestep_fraction must be in (0, 1], got {t.timestep_fraction}"
    )
    need(
        0 <= t.skip_final_steps < config.sample.num_steps,
        f"train.skip_final_steps must be in [0, sample.num_steps), got {t.skip_final_steps}",
    )
    need(t.learning_rate > 0, f"train.learning_rate must be > 0, got {t.learning_rate}")
    need(0 < t.eps < 1, f"train.eps must be in (0, 1), got {t.eps}")
    need(t.clip_range > 0, f"train.clip_range must be > 0, got {t.clip_range}")
    editors = ["auto", *editor_names()]
    need(m.editor in editors, f"model.editor: {m.editor!r} is not one of {', '.join(map(repr, editors))}")
    need(m.resolution % 8 == 0, f"model.resolution must be a multiple of 8, got {m.resolution}")
    need(s.noise_level >= 0, f"sample.noise_level must be >= 0, got {s.noise_level}")
    need(
        m.scheduler != "ddim" or s.eta > 0,
        "sample.eta must be > 0 with model.scheduler=ddim: a deterministic step has no log-probability",
    )
    per_process = s.batch_size * s.nb_gen * s.num_batches_per_epoch
    step = t.batch_size * t.gradient_accumulation_steps
    # The objective's own checks (`Objective.check`); an unknown name is refused here.
    objective = make_objective(config)
    objective.check(need)
    need(
        not objective.divisible_batches or per_process % step == 0,
        f"edits per epoch per process (sample.batch_size x sample.nb_gen x sample.num_batches_per_epoch "
        f"= {per_process}) must be divisible by train.batch_size x train.gradient_accumulation_steps "
        f"= {step}",
    )
    need(len(config.reward.scorers) >= 1, "reward.scorers must list at least one scorer")
    need(config.reward.replicas >= 1, f"reward.replicas must be >= 1, got {config.reward.replicas}")
    need(config.reward.deadline_s > 0, f"reward.deadline_s must be > 0, got {config.reward.deadline_s}")
    unknown = [t for t in r.log_with if t not in ("tensorboard", "wandb", "mlflow")]
    need(not unknown, f"run.log_with: unknown tracker {unknown[:1]} (expected tensorboard, wandb or mlflow)")
    q = config.reward.queue
    need(q.resubmits >= 0, f"reward.queue.resubmits must be >= 0, got {q.resubmits}")
    need(q.max_in_flight >= 1, f"reward.queue.max_in_flight must be >= 1, got {q.max_in_flight}")
    need(q.blob_ttl_s >= 1, f"reward.queue.blob_ttl_s must be >= 1, got {q.blob_ttl_s}")
    need(q.poll_s > 0, f"reward.queue.poll_s must be > 0, got {q.poll_s}")
    if config.reward.transport == "grpc":
        gc = config.reward.grpc
        missing = [sc.name for sc in config.reward.scorers if not gc.servers.get(sc.name, "").strip()]
        need(
            not missing, f"reward.transport=grpc: reward.grpc.servers has no address for {', '.join(missing)}"
        )
        need(
            gc.max_items_per_request >= 1,
            f"reward.grpc.max_items_per_request must be >= 1, got {gc.max_items_per_request}",
        )
        need(gc.retries >= 0, f"reward.grpc.retries must be >= 0, got {gc.retries}")
    g = config.reward.grounding
    need(g.timeout_s > 0, f"reward.grounding.timeout_s must be > 0, got {g.timeout_s}")
    need(g.batch_size >= 1, f"reward.grounding.batch_size must be >= 1, got {g.batch_size}")
    names = [sc.name for sc in config.reward.scorers]
    need(len(set(names)) == len(names), f"reward.scorers lists a scorer twice: {names}")
    ray = config.ray
    need(ray.num_rollout_workers >= 1, f"ray.num_rollout_workers must be >= 1, got {ray.num_rollout_workers}")
    need(
        not ray.enabled or ray.num_rollout_workers <= config.batches_per_epoch,
        f"ray.num_rollout_workers ({ray.num_rollout_workers}) exceeds the sampling batches per epoch "
        f"({config.batches_per_epoch}: sample.num_batches_per_epoch x learners): a worker samples "
        "whole batches, so some would sit idle",
    )
    need(
        ray.num_cpus_per_worker > 0 or ray.num_gpus_per_worker > 0 or bool(ray.worker_resources),
        "ray: a rollout worker must reserve something (num_cpus_per_worker, num_gpus_per_worker or "
        "worker_resources)",
    )
    need(ray.num_learners >= 1, f"ray.num_learners must be >= 1, got {ray.num_learners}")
    need(
        ray.enabled or ray.num_learners == 1,
        f"ray.num_learners={ray.num_learners} needs ray.enabled: true (without Ray one process samples "
        "and learns)",
    )
    need(
        ray.num_cpus_per_learner > 0 or ray.num_gpus_per_learner > 0,
        "ray: a learner must reserve something (num_cpus_per_learner or num_gpus_per_learner)",
    )
    need(ray.torch_threads >= 0, f"ray.torch_threads must be >= 0, got {ray.torch_threads}")
    need(bool(ray.learner_host.strip()), "ray.learner_host is empty (127.0.0.1, auto, or an address)")
    d = config.data
    if d.source in ("folder", "jsonl", "spie", "triplets"):
        need(bool(d.path), f"data.path is required with data.source={d.source}")
    if d.source in ("shapes", "synthetic"):
        need(d.num_items >= 1, f"data.num_items must be >= 1, got {d.num_items}")
    if d.source == "synthetic":
        need(len(d.kinds) >= 1, "data.kinds must list at least one edit kind")
        need(m.resolution >= 16, f"data.source=synthetic needs model.resolution >= 16, got {m.resolution}")
    if d.source == "spie":
        need(
            bool(d.input_name) == bool(d.style_name),
            "data.input_name and data.style_name go together (SPIE's instruction templates need both)",
        )
    if d.source in ("shapes", "folder") or (d.source == "spie" and not d.input_name):
        need(len(config.data.instructions) >= 1, "data.instructions must list at least one instruction")
        need(all(i.strip() for i in config.data.instructions), "data.instructions: an instruction is empty")


def to_dict(config: Config) -> dict[str, Any]:
    """Plain nested dict (tuples become lists) for YAML/JSON dumps."""

    def plain(x: Any) -> Any:
        if isinstance(x, tuple | list):
            return [plain(v) for v in x]
        if isinstance(x, dict):
            return {k: plain(v) for k, v in x.items()}
        return x

    return plain(dataclasses.asdict(config))


def dump_config(config: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(config), sort_keys=False))
