"""Configuration of one reward server: frozen dataclasses mirrored by a YAML file.

A YAML file has three optional sections (see reward_servers/configs/*.yaml):

    server:    # ServerConfig fields
    batching:  # BatcherConfig fields
    scorer:    # keyword arguments of the scorer's constructor (model_id, rec_lambda, ...)
    queue:     # ConsumerConfig fields (the Redis stream consumer; see reward_servers/queue/)

Command-line flags of `spie serve` override the file.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from reward_servers.batcher import BatcherConfig
from reward_servers.errors import UserError
from reward_servers.images import DEFAULT_MAX_DECODED_MB, DEFAULT_MAX_PIXELS
from reward_servers.queue.consumer import ConsumerConfig


@dataclass(frozen=True)
class ServerConfig:
    # Address to bind; 127.0.0.1 keeps the server on this machine, 0.0.0.0 exposes it (`spie serve`
    # then needs an auth token, or --insecure-no-token).
    host: str = "127.0.0.1"
    # Port to bind; 0 picks a free one (printed on start).
    port: int = 50051
    # Largest request or response message, in MiB.
    max_message_mb: int = 64
    # Largest image accepted, in pixels (width x height), checked before decoding.
    max_pixels: int = DEFAULT_MAX_PIXELS
    # Most bytes of decoded images the server holds at once, in MiB, across all its Score and Ground
    # calls (one shared budget, reward_servers/budget.py), reserved from the image headers before
    # anything is decoded: an item over it alone fails alone (INVALID_INPUT); a request over it gets
    # RESOURCE_EXHAUSTED; one that does not fit beside the others waits its turn until its
    # deadline. A queue read is scored in parts of at most this much.
    max_decoded_mb: int = DEFAULT_MAX_DECODED_MB
    # Most items in one Score request (more: INVALID_ARGUMENT).
    max_items_per_request: int = 256
    # Deadline applied to requests that carry none, in seconds.
    default_deadline_s: float = 300.0
    # On SIGTERM, how long in-flight requests may take to finish, in seconds.
    drain_grace_s: float = 30.0
    # Port of the Prometheus /metrics endpoint on `host`; 0 turns it off.
    metrics_port: int = 0
    # Threads decoding images (PNG decoding runs beside scoring).
    decode_threads: int = 2
    # PEM files for TLS; both empty: plaintext.
    tls_cert: str = ""
    tls_key: str = ""
    # Shared secret a client must send as `authorization: Bearer <token>`; empty: no auth.
    # `spie serve` reads it from the SPIE_REWARD_TOKEN environment variable, never from argv.
    auth_token: str = field(default="", repr=False)
    # Folder of the shared-memory regions same-host clients send raw pixels through
    # (`ScorerClient(shared_dir=...)`, reward_servers/shm.py): a tmpfs such as /dev/shm/spie, private
    # to the user running the trainer and the servers. Empty: SPIE_BLOB_DIR, else such images fail.
    shared_dir: str = ""

    def __post_init__(self) -> None:
        if bool(self.tls_cert) != bool(self.tls_key):
            raise UserError("server.tls_cert and server.tls_key must be given together")
        for name in (
            "max_message_mb",
            "max_pixels",
            "max_decoded_mb",
            "max_items_per_request",
            "decode_threads",
        ):
            if getattr(self, name) < 1:
                raise UserError(f"server.{name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.port < 65536:
            raise UserError(f"server.port must be in [0, 65535], got {self.port}")


@dataclass(frozen=True)
class ServeConfig:
    """Everything `spie serve` needs besides the scorer name and device."""

    server: ServerConfig = field(default_factory=ServerConfig)
    batching: BatcherConfig = field(default_factory=BatcherConfig)
    # Keyword arguments of the scorer's constructor.
    scorer: dict[str, Any] = field(default_factory=dict)
    # Redis stream consumer settings (used when a Redis URL is given).
    queue: ConsumerConfig = field(default_factory=ConsumerConfig)


def _build(cls: type, section: str, values: Any, path: Path) -> Any:
    if values is None:
        return cls()
    if not isinstance(values, dict):
        raise UserError(f"{path}: section {section!r} must be a mapping")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise UserError(f"{path}: unknown field(s) {section}.{', '.join(unknown)}; known: {sorted(known)}")
    try:
        return cls(**values)
    except (TypeError, ValueError) as err:
        raise UserError(f"{path}: section {section!r}: {err}") from None


def load_serve_config(path: str | Path | None) -> ServeConfig:
    """Read a YAML file into a ServeConfig (None: defaults)."""
    if path is None:
        return ServeConfig()
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except OSError as err:
        raise UserError(f"cannot read config {path}: {err.strerror}") from None
    except yaml.YAMLError as err:
        raise UserError(f"{path}: invalid YAML: {err}") from None
    return serve_config_from_dict(data, path)


def serve_config_from_dict(data: Any, path: Path | str = "config") -> ServeConfig:
    """A ServeConfig from the mapping a YAML file holds (`path` names it in errors)."""
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a mapping with server / batching / scorer sections")
    unknown = sorted(set(data) - {"server", "batching", "scorer", "queue"})
    if unknown:
        raise UserError(f"{path}: unknown section(s) {unknown}; known: server, batching, scorer, queue")
    scorer = data.get("scorer") or {}
    if not isinstance(scorer, dict):
        raise UserError(f"{path}: section 'scorer' must be a mapping of constructor arguments")
    return ServeConfig(
        server=_build(ServerConfig, "server", data.get("server"), path),
        batching=_build(BatcherConfig, "batching", data.get("batching"), path),
        scorer=scorer,
        queue=_build(ConsumerConfig, "queue", data.get("queue"), path),
    )
