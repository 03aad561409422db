"""Grounded edit masks for data that has none (SPIE's Grounded-SAM step): each input's object is sent
once to a `spie serve grounding` server (the `Ground` RPC: GroundingDINO box + SAM mask), and the
masks are cached, in memory and in the run folder, keyed by (source pixels, phrase), so a resumed run,
the probe set and repeated inputs never ask twice. The exemplar scorer then compares inside the mask
and the reconstruction term measures outside it, as with masks that come with the data.

An input whose phrase the server does not find gets the whole frame as its region (what "no mask"
means to the scorers); the count is reported.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import numpy as np
import torch

from reward_servers.client import ScorerClient
from reward_servers.grounding_rpc import make_ground_item, result_mask
from trainer.config.schema import GroundingConfig
from trainer.errors import UserError

log = logging.getLogger("spie.grounding")
CACHE_FILE = "grounded_masks.npz"


def input_key(source: np.ndarray, phrase: str) -> str:
    """Hex digest of an input's (H, W, 3) uint8 pixels and its phrase."""
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{source.shape}".encode())
    h.update(np.ascontiguousarray(source).tobytes())
    h.update(phrase.encode())
    return h.hexdigest()


class GroundedMasks:
    """Masks of each input's phrase from a grounding server, asked once per input.

    Args:
        config: `reward.grounding`.
        cache_dir: folder for the mask cache (`grounded_masks.npz`); None: memory only.
    """

    def __init__(self, config: GroundingConfig, cache_dir: str | Path | None = None) -> None:
        self.config = config
        self.cache_file = Path(cache_dir) / CACHE_FILE if cache_dir else None
        self.cache: dict[str, np.ndarray] = {}
        self.asked = 0  # inputs sent to the server so far
        self.not_found = 0  # inputs whose phrase the server did not find (whole frame used)
        if self.cache_file is not None and self.cache_file.is_file():
            with np.load(self.cache_file) as saved:
                self.cache = {k: saved[k].astype(bool) for k in saved.files}

    def phrases(self, instructions: list[str], metadata: list[dict] | None) -> list[str]:
        key = self.config.phrase_key
        meta = metadata or [{} for _ in instructions]
        return [str(m.get(key) or ins) for m, ins in zip(meta, instructions, strict=True)]

    def masks(self, sources: torch.Tensor, phrases: list[str]) -> torch.Tensor:
        """(M, R, R) bool masks for (M, 3, R, R) sources in [0, 1] and their M phrases."""
        images = [
            (s.permute(1, 2, 0).clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy() for s in sources
        ]
        keys = [input_key(im, p) for im, p in zip(images, phrases, strict=True)]
        missing, seen = [], set()
        for i, k in enumerate(keys):  # each input once, however often it repeats
            if k not in self.cache and k not in seen:
                seen.add(k)
                missing.append(i)
        if missing:
            self._ask([images[i] for i in missing], [phrases[i] for i in missing], [keys[i] for i in missing])
        return torch.from_numpy(np.stack([self.cache[k] for k in keys]))

    def _ask(self, images: list[np.ndarray], phrases: list[str], keys: list[str]) -> None:
        import grpc

        token = os.environ.get("SPIE_REWARD_TOKEN") or None
        size = self.config.batch_size
        with ScorerClient(self.config.server, token=token, timeout_s=self.config.timeout_s) as client:
            for start in range(0, len(images), size):
                chunk = range(start, min(start + size, len(images)))
                items = [make_ground_item(str(i), images[i], phrases[i]) for i in chunk]
                try:
                    response = client.ground(items)
                except grpc.RpcError as err:
                    raise UserError(
                        f"reward.grounding.server {self.config.server}: Ground failed: {err.code().name}: {err.details()}"
                    ) from None
                for i, result in zip(chunk, response.results, strict=True):
                    mask = result_mask(result)
                    if mask is None:
                        self.not_found += 1
                        log.warning("grounding: %s; the whole frame is the edit region", result.error)
                        mask = np.ones(images[i].shape[:2], bool)
                    self.cache[keys[i]] = mask
                self.asked += len(chunk)
        if self.cache_file is not None:
            self.cache_file.parent.mkdir(parents=True, exist_ok=True)
            np.savez_compressed(self.cache_file, **self.cache)


def ground_missing_masks(
    config: GroundingConfig,
    sources: torch.Tensor,
    instructions: list[str],
    metadata: list[dict] | None,
    masks: torch.Tensor | None,
    cache_dir: str | Path | None = None,
) -> torch.Tensor | None:
    """The inputs' masks: `masks` when the data has them or grounding is off, else grounded ones."""
    if masks is not None or not config.server:
        return masks
    grounded = GroundedMasks(config, cache_dir)
    out = grounded.masks(sources, grounded.phrases(instructions, metadata))
    log.info("grounding: %d inputs asked, %d not found", grounded.asked, grounded.not_found)
    return out
