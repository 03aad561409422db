"""The held-out probe with intervals, and the guards checked on it (`guard` section of the config).

The probe (`eval.probe_items` held-out inputs, fixed per-item noise) is sampled before the first
epoch and every `eval.probe_every` epochs (or every epoch with `guard.every_epoch`). Its first
sample is the starting policy's: its image statistics and per-item scores are the reference, saved
in the run folder (`guard_start.json`) so a resumed run compares with the same start; each probe's
interval is that of its change since then, paired over the same inputs and noise. Every later probe logs each
statistic (`guard.<stat>`) and its change from the start (`guard.<stat>.change`; relative for
`x0_norm`), and `check` names the statistics that moved past their thresholds.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from trainer.config import Config
from trainer.guard.stats import image_stats

STATS = (
    "brightness",
    "saturation",
    "dark_fraction",
    "bright_fraction",
    "high_frequency",
    "grid",
    "x0_norm",
)
RELATIVE = ("x0_norm",)


def probe_values(scores) -> dict[str, np.ndarray]:
    """Per-item values of the probe: `<scorer>.mean` (the score) and every detail."""
    named = {**{f"{k}.mean": v for k, v in scores.values.items()}, **scores.details}
    return {k: np.asarray(v, dtype=float) for k, v in named.items()}


def probe_record(values: dict[str, np.ndarray], start: dict[str, list] | None) -> dict[str, float]:
    """`probe.<key>` (the mean over the probe's items) and `probe_ci.<key>`: the half-width of the
    normal 95 % interval of the change since the first probe, paired over the items (same inputs
    and noise; 0 at the first probe), or of the mean itself without a first probe; `probe_items`."""
    out: dict[str, float] = {"probe_items": float(len(next(iter(values.values()), [])))}
    for key, v in values.items():
        finite = v[np.isfinite(v)]
        if not finite.size:
            continue
        out[f"probe.{key}"] = float(finite.mean())
        ref = np.asarray(start[key], dtype=float) if start and key in start else None
        x = v - ref if ref is not None and ref.shape == v.shape else v
        x = x[np.isfinite(x)]
        sd = float(x.std(ddof=1)) if x.size > 1 else 0.0
        out[f"probe_ci.{key}"] = 1.96 * sd / math.sqrt(max(x.size, 1))
    return out


class Guards:
    """The probe and the guards of one run.

    Args:
        config: the run's configuration (`guard`, `eval.probe_every`, `train.kl_coef`).
        run_dir: the run folder (holds `guard_start.json`).
    """

    def __init__(self, config: Config, run_dir: Path) -> None:
        self.cfg = config.guard
        self.probe_every = config.eval.probe_every
        self.kl_logged = config.train.kl_coef > 0
        self.path = Path(run_dir) / "guard_start.json"
        self.start = json.loads(self.path.read_text()) if self.path.is_file() else None

    @property
    def active(self) -> bool:
        return self.cfg.action != "off"

    @property
    def wanted(self) -> bool:
        """Whether the run samples a probe set at all."""
        return bool(self.probe_every) or (self.active and self.cfg.every_epoch)

    def due(self, epoch: int, last: bool) -> bool:
        """Whether the probe runs after `epoch`'s update."""
        if self.active and self.cfg.every_epoch:
            return True
        return bool(self.probe_every) and (last or (epoch + 1) % self.probe_every == 0)

    def probe(self, engine, rewards, shards: list) -> dict[str, float]:
        """Sample the probe `shards` under the current weights and score them: `probe_record`'s keys
        and, after the first (the reference, kept in `guard_start.json`), `guard.<stat>` and
        `guard.<stat>.change`."""
        rollout = engine.sample(shards, False)
        values = probe_values(rewards.score(rollout))
        stats = image_stats(rollout.images, rollout.latents[:, -1]) if self.active else {}
        if self.start is None:
            self.start = {"stats": stats, "probe": {k: v.tolist() for k, v in values.items()}}
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text(json.dumps(self.start) + "\n")
            return probe_record(values, self.start["probe"])
        out = probe_record(values, self.start["probe"])
        for name, value in stats.items():
            ref = self.start["stats"].get(name)
            out[f"guard.{name}"] = value
            if ref is not None:
                change = (value - ref) / max(abs(ref), 1e-12) if name in RELATIVE else value - ref
                out[f"guard.{name}.change"] = change
        return out

    def check(self, record: dict) -> tuple[list[str], bool]:
        """The guards on an epoch's record: one line per statistic past its threshold, and whether
        the run must stop (`guard.action: stop` and a line)."""
        if not self.active:
            return [], False
        lines = []
        for name in STATS:
            limit = getattr(self.cfg, name)
            change = record.get(f"guard.{name}.change")
            if not limit or change is None or abs(change) <= limit:
                continue
            was, now = self.start["stats"][name], record[f"guard.{name}"]
            how = f"{change:+.0%}" if name in RELATIVE else f"{change:+.3f}"
            lines.append(
                f"[spie] guard: {name} moved {how} from the starting policy's edits of the probe "
                f"({was:.3f} -> {now:.3f}; guard.{name} = {limit:g})"
            )
        if self.cfg.kl and self.kl_logged and record.get("kl", 0.0) > self.cfg.kl:
            lines.append(
                f"[spie] guard: kl to the reference is {record['kl']:.3g} (guard.kl = {self.cfg.kl:g})"
            )
        stop = bool(lines) and self.cfg.action == "stop"
        if stop:
            lines.append(f"[spie] guard: stopping after epoch {record.get('epoch')} (guard.action = stop)")
        return lines, stop
