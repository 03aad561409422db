"""Reward gradients: d score / d edit for the items that ask for it, and the raw tensors that carry
edits and gradients on the wire (`reward.proto` `Tensor`: shape, dtype, little-endian bytes; no pickle).

A transport calls `score_batch(scorer, batch)` instead of `scorer.score(batch)`. Items without
`want_gradient` are scored as always. Items with it are scored by the scorer's differentiable form
(`score_differentiable`, see `reward_servers.base`) at their float edit (`ScoreBatch.tensors`, else
the uint8 edit / 255); their result carries that form's value and its gradient. A scorer without a
differentiable form fails those items with one line naming it.
"""

from __future__ import annotations

import math

import numpy as np

from protos.spie.reward.v1 import reward_pb2 as pb
from reward_servers.base import ScoreBatch, Scorer, ScoreResult, is_differentiable

# Tensor dtypes accepted on the wire (numpy little-endian).
DTYPES = {"float32": np.dtype("<f4"), "float16": np.dtype("<f2")}


class TensorError(ValueError):
    """A bad Tensor message: unknown dtype, or a byte count that does not match its shape."""


def encode_tensor(array: np.ndarray, dtype: str = "float32") -> pb.Tensor:
    """An array as a proto Tensor of `dtype` ("float32" or "float16")."""
    if dtype not in DTYPES:
        raise TensorError(f"tensor dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    data = np.ascontiguousarray(np.asarray(array), dtype=DTYPES[dtype]).tobytes()
    return pb.Tensor(shape=list(np.shape(array)), dtype=dtype, data=data)


def decode_tensor(tensor: pb.Tensor, field: str, max_values: int | None = None) -> np.ndarray:
    """A proto Tensor as a float32 array; `TensorError` naming `field` when it is malformed."""
    if tensor.dtype not in DTYPES:
        raise TensorError(f"{field}: dtype must be one of {sorted(DTYPES)}, got {tensor.dtype!r}")
    shape = tuple(int(d) for d in tensor.shape)
    count = math.prod(shape)  # Python ints: np.prod wraps around past 2^63
    if max_values is not None and count > max_values:
        raise TensorError(f"{field}: {count} values exceed the limit of {max_values}")
    if len(tensor.data) != count * DTYPES[tensor.dtype].itemsize:
        raise TensorError(
            f"{field}: {len(tensor.data)} bytes do not hold {tensor.dtype} values of shape {list(shape)}"
        )
    return np.frombuffer(tensor.data, dtype=DTYPES[tensor.dtype]).reshape(shape).astype(np.float32)


def _sub(batch: ScoreBatch, index: list[int]) -> ScoreBatch:
    pick = lambda v: None if v is None else [v[i] for i in index]  # noqa: E731
    return ScoreBatch(
        pick(batch.edited),
        pick(batch.sources),
        pick(batch.instructions),
        pick(batch.masks),
        pick(batch.exemplars),
        pick(batch.metadata),
        pick(batch.tensors),
    )


def _images(batch: ScoreBatch):
    """(B, 3, H, W) float32 torch tensor of the batch's float edits (or uint8 edits / 255)."""
    import torch

    out = []
    for i in range(len(batch)):
        t = batch.tensor(i)
        if t is None:
            t = np.asarray(batch.edited[i], dtype=np.float32).transpose(2, 0, 1) / 255.0
        out.append(torch.from_numpy(np.ascontiguousarray(t, dtype=np.float32)))
    return torch.stack(out)


def differentiable_scores(scorer: Scorer, batch: ScoreBatch) -> tuple[np.ndarray, list[np.ndarray]]:
    """(B,) values of the differentiable form and B (3, H, W) gradients d score_i / d edit_i.

    Items of different sizes are run in groups of one size. Raises what the scorer raises.
    """
    import torch

    scores = np.full(len(batch), np.nan)
    grads: list[np.ndarray | None] = [None] * len(batch)
    sizes: dict[tuple, list[int]] = {}
    for i in range(len(batch)):
        t = batch.tensor(i)
        sizes.setdefault(tuple(t.shape) if t is not None else (3, *batch.edited[i].shape[:2]), []).append(i)
    for index in sizes.values():
        sub = _sub(batch, index)
        with torch.enable_grad():
            images = _images(sub).requires_grad_(True)
            values = scorer.score_differentiable(images, sub)
            (grad,) = torch.autograd.grad(values.sum(), images)
        for k, i in enumerate(index):
            scores[i] = float(values[k].detach())
            grads[i] = grad[k].detach().cpu().numpy().astype(np.float32)
    return scores, grads  # type: ignore[return-value]


def score_batch(scorer: Scorer, batch: ScoreBatch) -> ScoreResult:
    """`scorer.score(batch)`, with the differentiable value and gradient for the items that want one."""
    want = [i for i in range(len(batch)) if batch.wants_gradient(i)]
    if not want:
        return scorer.score(batch)
    rest = [i for i in range(len(batch)) if i not in set(want)]
    n = len(batch)
    scores, details = np.full(n, np.nan), [{} for _ in range(n)]
    errors: list[str | None] = [None] * n
    gradients: list[np.ndarray | None] = [None] * n
    if rest:
        plain = scorer.score(_sub(batch, rest))
        for k, i in enumerate(rest):
            scores[i], details[i], errors[i] = plain.scores[k], plain.details[k], plain.errors[k]
    if not is_differentiable(scorer):
        for i in want:
            errors[i] = f"scorer {scorer.name!r} has no differentiable form: it cannot return a gradient"
        return ScoreResult(scores, details, errors, gradients)
    sub = _sub(batch, want)
    try:
        values, grads = differentiable_scores(scorer, sub)
        per_item = [(values[k], grads[k], None) for k in range(len(want))]
    except ValueError:  # a bad item fails alone: score them one by one
        per_item = []
        for k in range(len(want)):
            try:
                v, g = differentiable_scores(scorer, _sub(sub, [k]))
                per_item.append((v[0], g[0], None))
            except ValueError as err:
                per_item.append((np.nan, None, str(err)))
    for i, (v, g, e) in zip(want, per_item, strict=True):
        scores[i], gradients[i], errors[i] = v, g, e
    return ScoreResult(scores, details, errors, gradients)
