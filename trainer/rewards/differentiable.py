"""Differentiable rewards for reward backpropagation (`train.objective: alignprop`).

`reward(images, rollout) -> {scorer: (N,) tensor}`: each configured scorer's score of the edits,
oriented so that higher is better, differentiable with respect to `images` ((N, 3, H, W) in [0, 1]).

- In process (`reward.transport: inprocess`): the scorers' own `score_differentiable`, so autograd
  runs through the reward model itself.
- Over the wire (the Redis queue, or gRPC servers): each edit travels with its float tensor and
  `want_gradient`; the server returns the score and d score / d edit, and `ServedGradient`, a custom
  autograd Function whose backward is that served gradient, puts it into the graph, so the trainer
  backpropagates it through the decoder and the chain. The reward model never shares the policy's
  device.

A scorer without a differentiable form is refused before any work, with one line naming it; a
server that returns no gradient (one from before reward gradients) fails the step, naming the scorer.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from protos.spie.reward.v1 import reward_pb2 as pb
from reward_servers.base import ScoreBatch, is_differentiable
from reward_servers.gradients import decode_tensor
from reward_servers.images import make_item
from sampler.rollout import Rollout, to_uint8
from trainer.errors import UserError


class RewardGradientError(UserError):
    """No usable score and gradient for an item (a server that predates reward gradients, a failed
    item); one line naming the scorer, as `spie` prints a `UserError`."""


class ServedGradient(torch.autograd.Function):
    """scores = fn(images) with a gradient computed elsewhere.

    forward(images (N, 3, H, W), fn) calls `fn(images as float32 numpy) -> ((N,) scores, (N, 3, H, W)
    gradients d score_i / d image_i)`; backward returns grad_output_i x gradient_i.
    """

    @staticmethod
    def forward(ctx, images: torch.Tensor, fn: Callable) -> torch.Tensor:
        scores, grads = fn(images.detach().float().cpu().numpy())
        ctx.save_for_backward(torch.as_tensor(grads, dtype=images.dtype, device=images.device))
        return torch.as_tensor(scores, dtype=images.dtype, device=images.device)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        (grads,) = ctx.saved_tensors
        return grad_output.view(-1, 1, 1, 1) * grads, None


def score_batch_of(rollout: Rollout) -> ScoreBatch:
    masks = None if rollout.masks is None else list(rollout.masks.cpu().numpy())
    return ScoreBatch(
        rollout.edited_uint8(),
        rollout.sources_uint8(),
        rollout.instructions,
        masks,
        metadata=rollout.metadata,
    )


def refuse_non_differentiable(scorers: dict) -> None:
    bad = [name for name, s in scorers.items() if not is_differentiable(s)]
    if bad:
        raise UserError(
            f"train.objective=alignprop needs differentiable scorers; {', '.join(bad)} "
            f"{'has' if len(bad) == 1 else 'have'} no differentiable form (reward.scorers)"
        )


class InProcessGradients:
    """The scorers' differentiable forms, called in this process (autograd through the reward model)."""

    def __init__(self, scorers: dict) -> None:
        refuse_non_differentiable(scorers)
        self.scorers = scorers
        # How another process (a Ray learner) builds the same reward: its own scorers from config.
        self.spec: dict = {"transport": "inprocess"}

    def close(self) -> None:
        pass

    def __call__(self, images: torch.Tensor, rollout: Rollout) -> dict[str, torch.Tensor]:
        batch = score_batch_of(rollout)
        out = {}
        for name, scorer in self.scorers.items():
            try:
                values = scorer.score_differentiable(images, batch).to(images.device)
            except ValueError as err:
                raise RewardGradientError(f"scorer {name!r}: {err}") from err
            out[name] = values if scorer.higher_is_better else -values
        return out


def gradient_items(images: np.ndarray, rollout: Rollout, encoding: str = "raw") -> list[pb.Item]:
    """N proto Items asking for gradients: the uint8 edit, its (3, H, W) float tensor, the rest."""
    edited = to_uint8(torch.from_numpy(images))
    sources = rollout.sources_uint8()
    masks = None if rollout.masks is None else list(rollout.masks.cpu().numpy())
    ids = list(rollout.item_ids) or [f"i{i}" for i in range(len(edited))]
    return [
        make_item(
            ids[i],
            edited[i],
            sources[i],
            rollout.instructions[i],
            None if masks is None else masks[i],
            metadata=None if rollout.metadata is None else rollout.metadata[i],
            encoding=encoding,
            tensor=images[i],
            want_gradient=True,
        )
        for i in range(len(edited))
    ]


def read_gradients(scorer: str, results: list[pb.Result], shape: tuple[int, ...], where: str):
    """(N,) scores and (N, 3, H, W) gradients from N results; `RewardGradientError` naming the
    scorer when an item failed or came back without a gradient."""
    scores, grads = np.zeros(len(results)), np.zeros((len(results), *shape), np.float32)
    for i, r in enumerate(results):
        if r.status != pb.Result.STATUS_OK:
            raise RewardGradientError(f"scorer {scorer!r} at {where} failed item {r.id!r}: {r.error}")
        if not r.HasField("gradient"):
            raise RewardGradientError(
                f"scorer {scorer!r} at {where} returned no gradient for item {r.id!r}: the server "
                "predates reward gradients (spie.reward.v1 Item.want_gradient); upgrade it"
            )
        g = decode_tensor(r.gradient, f"result {r.id!r}.gradient")
        if g.shape != shape:
            raise RewardGradientError(
                f"scorer {scorer!r} at {where}: gradient of shape {list(g.shape)}, expected {list(shape)}"
            )
        scores[i], grads[i] = r.score, g
    return scores, grads


class ServedGradients:
    """Scores and gradients from reward servers: `ask(scorer, items) -> N results` is the transport
    (the queue client's `gather_results`, or gRPC), `higher(scorer)` its orientation."""

    def __init__(
        self, scorers: list[str], ask, higher, where: str, encoding: str = "raw", close=None, spec=None
    ) -> None:
        self.scorers, self.ask, self.higher, self.where, self.encoding = scorers, ask, higher, where, encoding
        self.bytes_sent = self.bytes_received = 0
        self._close = close
        # How another process (a Ray learner) reaches the same servers (`gradient_rewards_from_spec`).
        self.spec: dict | None = spec

    def close(self) -> None:
        """Close the transport this object opened itself (the run's own client stays open)."""
        if self._close is not None:
            self._close()

    def __call__(self, images: torch.Tensor, rollout: Rollout) -> dict[str, torch.Tensor]:
        out = {}
        for name in self.scorers:
            sign = 1.0 if self.higher(name) else -1.0

            def fn(array: np.ndarray, name=name, sign=sign):
                items = gradient_items(array, rollout, self.encoding)
                self.bytes_sent += sum(it.ByteSize() for it in items)
                results = self.ask(name, items)
                self.bytes_received += sum(r.ByteSize() for r in results)
                scores, grads = read_gradients(name, results, array.shape[1:], self.where)
                return sign * scores, sign * grads

            out[name] = ServedGradient.apply(images, fn)
        return out


def grpc_gradients(
    clients: dict, encoding: str = "raw", timeout_s: float | None = None, close=None, spec=None
) -> ServedGradients:
    """`ServedGradients` over gRPC: `clients` maps scorer name -> `reward_servers.client.ScorerClient`."""
    higher = {name: bool(c.info().higher_is_better) for name, c in clients.items()}

    def ask(name: str, items: list[pb.Item]) -> list[pb.Result]:
        return list(clients[name].score(items, timeout_s=timeout_s, scorer=name).results)

    where = ", ".join(f"{c.target}" for c in clients.values())
    return ServedGradients(list(clients), ask, higher.__getitem__, where, encoding, close=close, spec=spec)


def refuse_non_differentiable_names(names: list[str]) -> None:
    """`refuse_non_differentiable` for scorers served elsewhere (their registered classes)."""
    from reward_servers import base

    base.available_scorers()
    refuse_non_differentiable({name: base._REGISTRY.get(name) for name in names})


def queue_gradients(client, password: str | None = None, owned: bool = False) -> ServedGradients:
    """`ServedGradients` through a `trainer.rewards.queue.RewardClient`; `owned`: closing it closes
    the client. Its `spec` lets a Ray learner open its own client to the same Redis."""
    from reward_servers.queue import protocol as P

    refuse_non_differentiable_names(client.scorers)

    def ask(name: str, items: list[pb.Item]) -> list[pb.Result]:
        from trainer.rewards.queue import RewardQueueError

        try:
            return client.gather_results(items, [name])[name]
        except RewardQueueError as err:
            raise UserError(f"scoring through {client.url}: {err}") from err

    spec = {"transport": "queue", "url": client.url, "password": password, "run_id": client.run_id}
    return ServedGradients(
        client.scorers,
        ask,
        client._higher_is_better,
        f"the queue at {P.describe(client.url)}",
        client.config.encoding,
        close=client.close if owned else None,
        spec=spec,
    )


def make_gradient_rewards(rewards) -> Callable[[torch.Tensor, Rollout], dict[str, torch.Tensor]]:
    """The differentiable reward for the run's scoring transport (`trainer.rewards.services.make_rewards`)."""
    scorers = getattr(rewards, "scorers", None)
    if isinstance(scorers, dict):  # InProcessRewards
        return InProcessGradients(scorers)
    clients = getattr(rewards, "clients", None)
    if isinstance(clients, dict):  # GrpcRewards
        refuse_non_differentiable_names(list(clients))
        timeout = rewards.config.reward.deadline_s
        return grpc_gradients(clients, timeout_s=timeout, spec={"transport": "grpc", "token": rewards.token})
    return queue_gradients(rewards.client, getattr(rewards, "password", None))  # QueueRewards


def gradient_rewards_from_spec(config, spec: dict):
    """The run's differentiable reward rebuilt in another process (a Ray learner actor) from the
    config and the driver's `reward.spec` (plain values: the transport; for the queue the Redis URL,
    password and run id; for gRPC the token): its own scorers in process, or its own clients of
    the same servers."""
    if spec["transport"] == "inprocess":
        from trainer.rewards.inprocess import build_scorers

        return InProcessGradients(build_scorers(config.reward))
    if spec["transport"] == "queue":
        import dataclasses

        from trainer.rewards.queue import QueueClientConfig, RewardClient

        r = config.reward
        queue = QueueClientConfig(
            url=spec["url"], run_id=spec["run_id"], deadline_s=r.deadline_s, **dataclasses.asdict(r.queue)
        )
        client = RewardClient([sc.name for sc in r.scorers], queue, password=spec["password"])
        return queue_gradients(client, spec["password"], owned=True)
    if spec["transport"] == "grpc":
        from trainer.rewards.grpc_servers import open_clients

        clients = open_clients(config, spec["token"])

        def close() -> None:
            for c in clients.values():
                c.close()

        return grpc_gradients(clients, timeout_s=config.reward.deadline_s, close=close, spec=spec)
    raise ValueError(f"no differentiable reward for transport {spec['transport']!r}")
