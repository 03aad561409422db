"""The `Scorer` protocol, the batch it takes, the result it gives, and the registry of scorers.

A scorer is a pure function of a batch: it knows nothing about gRPC, Redis or Ray. Transports
(the gRPC servicer, the Redis consumer, the in-process trainer path) convert their inputs into a
`ScoreBatch`, call `Scorer.score`, and convert the `ScoreResult` back.

Images are `uint8` numpy arrays of shape (H, W, 3), RGB. Masks are `bool` arrays of shape (H, W),
True inside the edit region.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np


@dataclass(frozen=True)
class ScoreBatch:
    """A batch of N edits to score.

    Attributes:
        edited: N images (H, W, 3) uint8, the edits to judge.
        sources: N images (H, W, 3) uint8, the source each edit was made from.
        instructions: N edit instructions.
        masks: N optional (H, W) bool masks of the edit region (None: unknown / whole frame).
        exemplars: N lists of exemplar images (H', W', 3) uint8 (empty list: none).
        metadata: N dicts of extra per-item fields (strings or numbers).
        tensors: N optional (3, H, W) float32 arrays in [0, 1], the edits before quantisation to
            uint8 (sent with a gradient request, so the gradient is taken where the trainer's image is).
        want_gradient: N flags, True where the caller asks for d score / d edit (`reward_servers.gradients`).
    """

    edited: Sequence[np.ndarray]
    sources: Sequence[np.ndarray]
    instructions: Sequence[str]
    masks: Sequence[np.ndarray | None] | None = None
    exemplars: Sequence[Sequence[np.ndarray]] | None = None
    metadata: Sequence[dict[str, Any]] | None = None
    tensors: Sequence[np.ndarray | None] | None = None
    want_gradient: Sequence[bool] | None = None

    def __post_init__(self) -> None:
        n = len(self.edited)
        if len(self.sources) != n or len(self.instructions) != n:
            raise ValueError(
                f"ScoreBatch: edited ({n}), sources ({len(self.sources)}) and instructions "
                f"({len(self.instructions)}) must have the same length"
            )
        for name in ("masks", "exemplars", "metadata", "tensors", "want_gradient"):
            value = getattr(self, name)
            if value is not None and len(value) != n:
                raise ValueError(f"ScoreBatch: {name} has {len(value)} entries, expected {n}")

    def __len__(self) -> int:
        return len(self.edited)

    def mask(self, i: int) -> np.ndarray | None:
        return None if self.masks is None else self.masks[i]

    def exemplar_list(self, i: int) -> Sequence[np.ndarray]:
        return () if self.exemplars is None else self.exemplars[i]

    def meta(self, i: int) -> dict[str, Any]:
        return {} if self.metadata is None else self.metadata[i]

    def tensor(self, i: int) -> np.ndarray | None:
        return None if self.tensors is None else self.tensors[i]

    def wants_gradient(self, i: int) -> bool:
        return bool(self.want_gradient is not None and self.want_gradient[i])


@dataclass
class ScoreResult:
    """Scores for a batch of N items.

    Attributes:
        scores: (N,) float64, one score per item (NaN where the item failed).
        details: N dicts of named numbers per item (sub-scores, diagnostics).
        errors: N entries, None for a scored item or a one-line message for a failed one.
        gradients: N entries, None or the (3, H, W) float32 gradient of the item's score with
            respect to its edit in [0, 1] (only for items that asked for one).
        texts: N dicts of named strings per item (a generative judge's reasoning); they travel in
            `Result.texts` over gRPC and the queue.
    """

    scores: np.ndarray
    details: list[dict[str, float]] = field(default_factory=list)
    errors: list[str | None] = field(default_factory=list)
    gradients: list[np.ndarray | None] = field(default_factory=list)
    texts: list[dict[str, str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.scores = np.asarray(self.scores, dtype=np.float64).reshape(-1)
        n = len(self.scores)
        if not self.details:
            self.details = [{} for _ in range(n)]
        if not self.errors:
            self.errors = [None] * n
        if not self.gradients:
            self.gradients = [None] * n
        if not self.texts:
            self.texts = [{} for _ in range(n)]
        if (
            len(self.details) != n
            or len(self.errors) != n
            or len(self.gradients) != n
            or len(self.texts) != n
        ):
            raise ValueError(
                "ScoreResult: scores, details, errors, gradients and texts must have the same length"
            )


# Most UTF-8 bytes of texts (names and values together) one item's result carries; see `clean_texts`.
DEFAULT_MAX_TEXT_BYTES = 64 * 1024
TRUNCATED = "[truncated:"  # starts the marker that ends a cut text


def utf8_safe(text: str) -> str:
    """`text` as a string every wire can encode: a lone surrogate ('\\ud800', which protobuf and
    UTF-8 refuse) becomes its escape, visibly, instead of failing the message it travels in."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


def clean_texts(texts: dict, max_bytes: int = DEFAULT_MAX_TEXT_BYTES) -> dict[str, str]:
    """One item's named texts made safe to send: UTF-8 encodable (`utf8_safe`) and at most
    `max_bytes` UTF-8 bytes in all (names included), in order; a text that does not fit is cut at a
    character boundary and ends with `TRUNCATED` and its full size, one past the budget is dropped."""
    out: dict[str, str] = {}
    left = max_bytes
    for key, value in texts.items():
        name, text = utf8_safe(str(key)), utf8_safe(str(value))
        data = text.encode("utf-8")
        room = left - len(name.encode("utf-8"))
        if len(data) > room:
            marker = f" {TRUNCATED} {len(data)} bytes, limit {max_bytes} per item]"
            keep = room - len(marker.encode("utf-8"))
            if keep < 0:
                break  # not even the marker fits: this text and the rest are dropped
            text = data[:keep].decode("utf-8", "ignore") + marker
            data = text.encode("utf-8")
        out[name] = text
        left = room - len(data)
    return out


@runtime_checkable
class Scorer(Protocol):
    """What every reward model implements.

    Attributes:
        name: registry name, e.g. "brightness".
        version: version string of the scoring logic.
        model_id: the weights it uses (hub id or local folder), "" for weight-free scorers.
        higher_is_better: whether a larger score means a better edit.
        max_batch_size: the largest batch `score` accepts at once.
    """

    name: str
    version: str
    model_id: str
    higher_is_better: bool
    max_batch_size: int

    def score(self, batch: ScoreBatch) -> ScoreResult:
        """Score a batch; one result per item, in order."""
        ...


# A scorer may also offer a differentiable form of its score (AlignProp's reward backpropagation):
#
#     def score_differentiable(self, images: torch.Tensor, batch: ScoreBatch) -> torch.Tensor
#
# images: (B, 3, H, W) float in [0, 1] (on any device; the scorer moves them to its own); batch: the
# same B items (sources, instructions, masks, metadata); returns (B,) scores, differentiable with
# respect to `images`, in the scorer's own orientation. `reward_servers.gradients` calls it for the
# items that ask for a gradient, and the trainer calls it in process.


def is_differentiable(scorer: Any) -> bool:
    """Whether `scorer` offers `score_differentiable`."""
    return callable(getattr(scorer, "score_differentiable", None))


ScorerFactory = Callable[..., Scorer]
_REGISTRY: dict[str, ScorerFactory] = {}
_BUILTIN_MODULES = (
    "reward_servers.weightfree",
    "reward_servers.oracle",
    "reward_servers.depth",
    "reward_servers.segmentation",
    "reward_servers.aesthetic",
    "reward_servers.exemplar",
    "reward_servers.vlm_judge",
    "reward_servers.hps",
    "reward_servers.clip_score",
    "reward_servers.grounding",
    "reward_servers.edit_reward",
    "reward_servers.sleep",
)


def register_scorer(name: str) -> Callable[[ScorerFactory], ScorerFactory]:
    """Class/function decorator registering a scorer factory under `name` (duplicates are refused)."""

    def wrap(factory: ScorerFactory) -> ScorerFactory:
        if name in _REGISTRY and _REGISTRY[name] is not factory:
            raise ValueError(f"scorer {name!r} is already registered by {_REGISTRY[name]!r}")
        _REGISTRY[name] = factory
        return factory

    return wrap


# Scorers of other packages: a distribution declares `[project.entry-points."spie.scorers"]` with
# `<name> = "<module>"` (the module registers itself with `@register_scorer`) or
# `<name> = "<module>:<factory>"` (registered here under `<name>`). Every transport (in process,
# `spie-reward serve <name>` over gRPC and the queue) looks names up here, so a plugin needs no change
# to this package, the protos or the servers.
ENTRY_POINT_GROUP = "spie.scorers"
_plugins_loaded = False


def _load_plugins() -> None:
    global _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True
    import inspect
    from importlib.metadata import entry_points

    for ep in entry_points(group=ENTRY_POINT_GROUP):
        obj = ep.load()
        if not inspect.ismodule(obj) and ep.name not in _REGISTRY:
            register_scorer(ep.name)(obj)


def _load_builtins() -> None:
    import importlib

    for module in _BUILTIN_MODULES:
        importlib.import_module(module)
    _load_plugins()


def available_scorers() -> list[str]:
    """Names of every registered scorer."""
    _load_builtins()
    return sorted(_REGISTRY)


def build_scorer(name: str, **kwargs: Any) -> Scorer:
    """Construct the scorer registered as `name` with keyword arguments from config."""
    _load_builtins()
    if name not in _REGISTRY:
        raise KeyError(f"unknown scorer {name!r}; known scorers: {', '.join(sorted(_REGISTRY))}")
    try:
        return _REGISTRY[name](**kwargs)
    except TypeError as err:
        raise ValueError(f"scorer {name!r}: bad arguments {sorted(kwargs)}: {err}") from err
