"""What scoring returns: per-scorer values, per-item errors and named per-item details."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class Scores:
    """Scores of N edits by S scorers, oriented so that higher is better.

    Attributes:
        values: scorer name -> (N,) float64.
        errors: scorer name -> N entries, None or the item's error message.
        details: "<scorer>.<detail>" -> (N,) float64 of the scorers' named per-item numbers (e.g.
            "oracle_edit.success"), NaN where an item has none; logged, not trained on.
    """

    values: dict[str, np.ndarray]
    errors: dict[str, list[str | None]]
    details: dict[str, np.ndarray] = field(default_factory=dict)

    def select(self, keep: list[int]) -> Scores:
        """The scores of items `keep`."""
        return Scores(
            {k: v[keep] for k, v in self.values.items()},
            {k: [e[i] for i in keep] for k, e in self.errors.items()},
            {k: v[keep] for k, v in self.details.items()},
        )

    @staticmethod
    def concat(parts: list[Scores]) -> Scores:
        """The scores of several batches, one after the other (the same scorers and details in each)."""
        first = parts[0]
        return Scores(
            {k: np.concatenate([p.values[k] for p in parts]) for k in first.values},
            {k: [e for p in parts for e in p.errors[k]] for k in first.errors},
            {k: np.concatenate([p.details[k] for p in parts]) for k in first.details},
        )

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
