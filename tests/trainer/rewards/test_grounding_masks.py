"""The trainer's grounded masks: data without masks asks a real grounding server (tiny GroundingDINO
on loopback) once per distinct input, caches the masks in the run folder, and leaves data that has
masks alone."""

from __future__ import annotations

import asyncio
import threading

import pytest
import torch

from reward_servers.base import build_scorer
from reward_servers.batcher import BatcherConfig
from reward_servers.config import ServerConfig
from reward_servers.grounding import box_mask, save_tiny
from reward_servers.server import RewardServer
from trainer.config.schema import GroundingConfig
from trainer.errors import UserError
from trainer.rewards.grounding import CACHE_FILE, GroundedMasks, ground_missing_masks

BOX = (0.5, 0.25, 0.5, 0.5)  # cx, cy, w, h relative to the image: x 8..24, y 0..8 at 32 x 32


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    dino, _ = save_tiny(str(tmp_path_factory.mktemp("grounding")))
    scorer = build_scorer("grounding", model_id=dino, sam_id="", box_threshold=0.5)
    calls: list[list[str]] = []
    ground = scorer.ground

    def counting_ground(images, phrases):
        calls.append(list(phrases))
        return ground(images, phrases)

    scorer.ground = counting_ground

    def hook(module, args, kwargs, out):  # every query on BOX; phrases naming a "dog" found, others not
        out.pred_boxes = torch.tensor(BOX).expand_as(out.pred_boxes).clone()
        dog = (kwargs["input_ids"] == 8).any(dim=1)  # "dog" in the tiny vocabulary
        out.logits = torch.where(dog[:, None, None], 8.0, -8.0).expand_as(out.logits).clone()
        return out

    scorer.detector.register_forward_hook(hook, with_kwargs=True)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    srv = RewardServer(lambda: scorer, "grounding", ServerConfig(port=0), BatcherConfig(max_batch_size=4))
    port = asyncio.run_coroutine_threadsafe(srv.start(), loop).result(30)
    asyncio.run_coroutine_threadsafe(srv.load(), loop).result(60)
    yield f"127.0.0.1:{port}", calls
    asyncio.run_coroutine_threadsafe(srv.stop(grace_s=2), loop).result(30)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)


def test_masks_asked_once_per_input_and_cached(server, tmp_path):
    target, calls = server
    config = GroundingConfig(server=target, batch_size=2)
    sources = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    sources = torch.cat([sources, sources[:1]])  # the 4th input repeats the 1st
    instructions = ["make the dog red", "make the cat red", "add a hat", "make the dog red"]
    metadata = [{}, {}, {"phrase": "the dog"}, {}]
    masks = ground_missing_masks(config, sources, instructions, metadata, None, tmp_path)
    assert masks.shape == (4, 32, 32) and masks.dtype == torch.bool
    box = torch.from_numpy(box_mask((32, 32), (8, 0, 24, 16)))
    assert torch.equal(masks[0], box) and torch.equal(masks[3], box)
    assert masks[1].all()  # "cat" not found: the whole frame
    assert torch.equal(masks[2], box)  # the metadata's phrase, not the instruction
    # One question per distinct input (the repeat is asked once), in chunks of batch_size.
    assert [len(c) for c in calls] == [2, 1]
    assert sorted(p for call in calls for p in call) == ["make the cat red", "make the dog red", "the dog"]
    assert (tmp_path / CACHE_FILE).is_file()
    # A resumed run reads the cache: nothing is asked again, even with the server unreachable.
    offline = GroundedMasks(GroundingConfig(server="127.0.0.1:1", timeout_s=1), tmp_path)
    again = offline.masks(sources, offline.phrases(instructions, metadata))
    assert torch.equal(again, masks) and offline.asked == 0
    with pytest.raises(UserError, match="reward.grounding.server"):
        GroundedMasks(GroundingConfig(server="127.0.0.1:1", timeout_s=1)).masks(sources[:1], ["x"])


def test_data_masks_and_grounding_off_are_left_alone():
    given = torch.zeros(2, 8, 8, dtype=torch.bool)
    sources = torch.rand(2, 3, 8, 8)
    assert (
        ground_missing_masks(GroundingConfig(server="127.0.0.1:1"), sources, ["a", "b"], None, given, None)
        is given
    )
    assert ground_missing_masks(GroundingConfig(), sources, ["a", "b"], None, None, None) is None
