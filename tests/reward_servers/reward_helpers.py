"""Helpers for reward-server tests (a uniquely named module, importable from test files): a real grpc.aio server on loopback, run on its own event loop
thread, and a gated scorer that lets a test hold a batch inside the scorer."""

from __future__ import annotations

import asyncio
import io
import struct
import threading
import zlib

import numpy as np
from PIL import Image as PILImage

from protos.spie.reward.v1 import reward_pb2 as pb
from reward_servers.base import ScoreBatch, ScoreResult
from reward_servers.batcher import BatcherConfig
from reward_servers.client import ScorerClient
from reward_servers.config import ServerConfig
from reward_servers.server import RewardServer


class ServerThread:
    """A `RewardServer` on 127.0.0.1 (free port) with its event loop on a background thread."""

    def __init__(self, factory, name: str, config: ServerConfig, batching: BatcherConfig, load: bool):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server = RewardServer(factory, name, config, batching)
        self.port = self.call(self.server.start())
        self.target = f"127.0.0.1:{self.port}"
        if load:
            self.call(self.server.load())

    def call(self, coro, timeout: float = 60.0):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def client(self, **kwargs) -> ScorerClient:
        return ScorerClient(self.target, timeout_s=kwargs.pop("timeout_s", 30.0), **kwargs)

    def close(self) -> None:
        self.call(self.server.stop(grace_s=5.0))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


class GatedScorer:
    """Wraps a real scorer; every `score` call first waits for `gate` (up to 30 s) and records the
    batch size, so a test can hold the worker busy and fill the queue behind it."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.name, self.version, self.model_id = inner.name, inner.version, inner.model_id
        self.higher_is_better, self.max_batch_size = inner.higher_is_better, inner.max_batch_size
        self.gate = threading.Event()
        self.entered = threading.Event()
        self.sizes: list[int] = []

    def score(self, batch: ScoreBatch) -> ScoreResult:
        self.entered.set()
        if not self.gate.wait(30):
            raise TimeoutError("gate never opened")
        self.sizes.append(len(batch))
        return self.inner.score(batch)


class DigitTokenizer:
    """Stands in for a tokenizer's `encode` on fixed numbers: "k" -> [100 + k] per digit."""

    unk_token_id = 0

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [100 + int(ch) for ch in text]


JUDGE_INSTRUCTIONS = ["make it snowy", "add a red hat", "keep the sky blue", "add a hat"]


def judge_batch(n: int, seed: int = 0) -> ScoreBatch:
    """n seeded noise items for the VLM judges, sources and edits of sizes that differ per item."""
    rng = np.random.default_rng(seed)
    sources = [rng.integers(0, 256, (40 + 4 * k, 48, 3), dtype=np.uint8) for k in range(n)]
    edits = [rng.integers(0, 256, (48, 36 + 4 * k, 3), dtype=np.uint8) for k in range(n)]
    return ScoreBatch(edits, sources, (JUDGE_INSTRUCTIONS * n)[:n])


def score_served_judge(serve, scorer):
    """Serve `scorer` as "vlm_judge" (the `serve` fixture) and score `judge_batch(2)` through a client,
    instruction "add a hat", after checking that Info gives the scorer's version; returns the response."""
    from reward_servers.images import make_item

    st = serve(lambda: scorer, name="vlm_judge")
    batch = judge_batch(2)
    with st.client() as client:
        assert client.info().version == scorer.version
        return client.score(
            [make_item(str(i), batch.edited[i], batch.sources[i], "add a hat") for i in range(2)]
        )


def random_image(rng, h: int = 32, w: int = 32) -> np.ndarray:
    """(h, w, 3) uint8 noise."""
    return rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims width x height, with one tiny (wrong) IDAT: a decompression-bomb header."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0"))
        + chunk(b"IEND", b"")
    )


def _png(array) -> bytes:
    buffer = io.BytesIO()
    PILImage.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def bad_images(rng) -> dict[str, tuple[pb.Image, str]]:
    """Each kind of bad image from the issue, with a fragment its error message must contain."""
    good = rng.integers(0, 256, size=(32, 32, 3), dtype=np.uint8)
    png = _png(good)
    raw = pb.Image.ENCODING_RAW_UINT8
    return {
        "undecodable": (pb.Image(encoding=pb.Image.ENCODING_PNG, data=b"not an image"), "not a PNG"),
        "truncated": (pb.Image(encoding=pb.Image.ENCODING_PNG, data=png[: len(png) // 2]), "undecodable"),
        "zero_size_raw": (pb.Image(encoding=raw, data=b"", width=0, height=32, channels=3), "zero-size"),
        "empty_png": (pb.Image(encoding=pb.Image.ENCODING_PNG, data=b""), "empty"),
        "raw_dims_mismatch": (
            pb.Image(encoding=raw, data=good.tobytes(), width=31, height=32, channels=3),
            "states",
        ),
        "png_dims_mismatch": (
            pb.Image(encoding=pb.Image.ENCODING_PNG, data=png, width=64, height=32),
            "states",
        ),
        "bomb_png": (
            pb.Image(encoding=pb.Image.ENCODING_PNG, data=_png_header_only(50000, 50000)),
            "pixel cap",
        ),
        "bomb_raw": (
            pb.Image(encoding=raw, data=b"\0" * 3, width=100000, height=100000, channels=3),
            "pixel cap",
        ),
        "no_encoding": (pb.Image(data=png), "unsupported encoding"),
    }
