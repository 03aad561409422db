"""What scoring returns: per-scorer values, per-item errors and named per-item details and texts."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from protos.spie.reward.v1 import reward_pb2 as pb


@dataclass
class Scores:
    """Scores of N edits by S scorers, oriented so that higher is better.

    Attributes:
        values: scorer name -> (N,) float64.
        errors: scorer name -> N entries, None or the item's error message.
        details: "<scorer>.<detail>" -> (N,) float64 of the scorers' named per-item numbers (e.g.
            "oracle_edit.success"), NaN where an item has none; logged, not trained on.
        texts: "<scorer>.<name>" -> N strings of the scorers' named per-item texts (e.g.
            "vlm_judge.sc_reasoning", EditScore's reasoning), "" where an item has none.
    """

    values: dict[str, np.ndarray]
    errors: dict[str, list[str | None]]
    details: dict[str, np.ndarray] = field(default_factory=dict)
    texts: dict[str, list[str]] = field(default_factory=dict)

    def __len__(self) -> int:
        """N, the number of items (0 without scorers)."""
        return len(next(iter(self.values.values()), ()))

    def select(self, keep: list[int]) -> Scores:
        """The scores of items `keep`."""
        return Scores(
            {k: v[keep] for k, v in self.values.items()},
            {k: [e[i] for i in keep] for k, e in self.errors.items()},
            {k: v[keep] for k, v in self.details.items()},
            {k: [s[i] for i in keep] for k, s in self.texts.items()},
        )

    @staticmethod
    def from_results(results: dict[str, list[pb.Result]], higher_is_better: dict[str, bool]) -> Scores:
        """Scores from each scorer's N wire results (gRPC or the queue), in item order: NaN and the
        reason for an item that is not STATUS_OK or not finite; values negated where lower is better."""
        values, errors, details, texts = {}, {}, {}, {}
        for name, rs in results.items():
            v = np.full(len(rs), math.nan)
            errs: list[str | None] = []
            for i, r in enumerate(rs):
                ok = r.status == pb.Result.STATUS_OK and math.isfinite(r.score)
                if ok:
                    v[i] = r.score
                errs.append(None if ok else r.error or pb.Result.Status.Name(r.status))
            values[name] = v if higher_is_better[name] else -v
            errors[name] = errs
            details.update(details_arrays(name, [dict(r.details) for r in rs]))
            texts.update(texts_lists(name, [dict(r.texts) for r in rs]))
        return Scores(values, errors, details, texts)

    @staticmethod
    def concat(parts: list[Scores]) -> Scores:
        """The scores of several batches, one after the other (the same scorers in each; a detail or
        text that a batch lacks, e.g. one whose items all failed, is NaN or "" for its items)."""
        first = parts[0]
        details = sorted({k for p in parts for k in p.details})
        texts = sorted({k for p in parts for k in p.texts})
        return Scores(
            {k: np.concatenate([p.values[k] for p in parts]) for k in first.values},
            {k: [e for p in parts for e in p.errors[k]] for k in first.errors},
            {k: np.concatenate([p.details.get(k, np.full(len(p), np.nan)) for p in parts]) for k in details},
            {k: [s for p in parts for s in p.texts.get(k, [""] * len(p))] for k in texts},
        )

    def rows(self, n: int) -> list[dict]:
        """The first n items as JSON-ready dicts: {"scores": {scorer: value or None}, "details":
        {"<scorer>.<detail>": value}, "texts": {"<scorer>.<name>": text}} (texts only where given)."""

        def number(v: float) -> float | None:
            return float(v) if math.isfinite(v) else None

        out = []
        for i in range(min(n, len(self))):
            row: dict = {
                "scores": {k: number(v[i]) for k, v in self.values.items()},
                "details": {k: number(v[i]) for k, v in self.details.items()},
            }
            texts = {k: s[i] for k, s in self.texts.items() if s[i]}
            if texts:
                row["texts"] = texts
            out.append(row)
        return out

    def failed(self) -> list[tuple[str, int, str]]:
        return [
            (name, i, e) for name, errs in self.errors.items() for i, e in enumerate(errs) if e is not None
        ]


def details_arrays(scorer: str, per_item: list[dict[str, float]]) -> dict[str, np.ndarray]:
    """N dicts of named numbers -> {"<scorer>.<name>": (N,) float64}, NaN where an item lacks one
    (entries that are not numbers are left out)."""
    names = sorted({k for d in per_item for k, v in d.items() if isinstance(v, int | float)})
    return {
        f"{scorer}.{k}": np.array([float(d.get(k, np.nan)) for d in per_item], dtype=np.float64)
        for k in names
    }


def texts_lists(scorer: str, per_item: list[dict[str, str]]) -> dict[str, list[str]]:
    """N dicts of named strings -> {"<scorer>.<name>": N strings}, "" where an item lacks one."""
    names = sorted({k for d in per_item for k in d})
    return {f"{scorer}.{k}": [str(d.get(k, "")) for d in per_item] for k in names}
