"""An epoch's sampling work, cut into shards that any rollout worker can sample reproducibly.

The epoch generator is a pure function of (seed, epoch); `plan_epoch` draws each shard's inputs and
records where its noise starts, so one process or many workers produce the same edits.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from sampler.rollout import Rollout
from trainer.config import Config
from trainer.data.inputs import Inputs


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """The epoch's random stream (noise, input draws, shuffles): a pure function of (seed, epoch), so
    a resumed run draws exactly what an uninterrupted one would."""
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch)


@dataclass
class Shard:
    """One sampling batch of an epoch: the unit of work handed to a rollout worker.

    Attributes:
        epoch: the epoch it belongs to.
        index: its position b in 0 .. sample.num_batches_per_epoch - 1.
        inputs: sample.batch_size (source, instruction[, mask, exemplar]) inputs.
        noise_state: the epoch generator's state where this shard's noise starts (a uint8 tensor),
            or None when `seeds` gives every item its own noise.
        seeds: M noise seeds, one generator per input (the held-out probe: an item's edit then
            depends on its seed alone), or None.
        nb_gen: edits per input, when not `sample.nb_gen`.
    """

    epoch: int
    index: int
    inputs: Inputs
    noise_state: torch.Tensor | None
    seeds: list[int] | None = None
    nb_gen: int | None = None


def item_seed(seed: int, index: int) -> int:
    """The noise seed of item `index` of a fixed set: a pure function of (seed, index) (63 bits)."""
    a, b = np.random.SeedSequence([seed, index]).generate_state(2, dtype=np.uint32)
    return ((int(a) << 32) | int(b)) & (2**63 - 1)


def probe_shards(inputs: Inputs, batch_size: int, seed: int) -> list[Shard]:
    """A fixed set of inputs cut into shards of one edit per input, input i drawn from its own
    generator seeded with `item_seed(seed, i)`: the same edits for the same weights, every time."""
    shards = []
    for b, start in enumerate(range(0, len(inputs), batch_size)):
        index = torch.arange(start, min(start + batch_size, len(inputs)))
        seeds = [item_seed(seed, int(i)) for i in index]
        shards.append(Shard(-1, b, inputs.take(index), None, seeds=seeds, nb_gen=1))
    return shards


def latent_shape(policy, resolution: int) -> tuple[int, int, int]:
    """(C, h, w) of the policy's latents for resolution x resolution images."""
    return policy.latent_shape(resolution)


def plan_epoch(
    inputs: Inputs, config: Config, epoch: int, generator: torch.Generator, latents: tuple[int, int, int]
) -> list[Shard]:
    """Draw the epoch's shards from the epoch generator, as one process sampling them in turn would.

    For each shard: draw its inputs, record the generator state, then skip over the noise its
    rollout draws from that state (x_T, then one draw per step: `EditPolicy.rollout`). Any worker
    can then sample any shard, and the edits, and the generator the learner gets afterwards, are
    those of the single-process loop, whatever the number of workers.

    Args:
        latents: (C, h, w) latent shape (`latent_shape`).
    """
    s = config.sample
    n = s.batch_size * s.nb_gen
    shards = []
    for b in range(config.batches_per_epoch):  # x learners with Ray: the sizes are per process
        pick = torch.randint(len(inputs), (s.batch_size,), generator=generator)
        shards.append(Shard(epoch, b, inputs.take(pick), generator.get_state()))
        torch.randn((s.batch_size if s.shared_noise else n, *latents), generator=generator)
        for _ in range(s.num_steps):
            torch.randn((n, *latents), generator=generator)
    return shards


def sample_shard(policy, shard: Shard, config: Config, progress: bool, policy_version: int = 0) -> Rollout:
    """Sample nb_gen edits of each of a shard's inputs from the shard's noise: batch_size x nb_gen items."""
    s = config.sample
    nb_gen = shard.nb_gen or s.nb_gen
    if shard.seeds is not None:  # one generator per edit
        generator = [
            torch.Generator().manual_seed(x if nb_gen == 1 else item_seed(x, j))
            for x in shard.seeds
            for j in range(nb_gen)
        ]
    else:
        generator = torch.Generator()
        generator.set_state(shard.noise_state)
    with policy.eval_mode():
        r = policy.rollout(
            shard.inputs.sources,
            shard.inputs.instructions,
            nb_gen=nb_gen,
            generator=generator,
            shared_noise=s.shared_noise,
            exemplars=shard.inputs.exemplars,
            masks=shard.inputs.masks,
            progress=progress,
            policy_version=policy_version,
        )
    r.item_ids = [f"e{shard.epoch}-b{shard.index}-i{i}" for i in range(len(r))]
    meta = getattr(shard.inputs, "metadata", None)
    if meta is not None:
        r.metadata = [dict(m) for m in meta for _ in range(nb_gen)]
    return r
