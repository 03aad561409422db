"""The blob path: item payloads in a shared folder, only references in Redis.

Inline (the default), each item's serialised `reward.proto` Item is stored in Redis, so every byte
crosses Redis twice (client to Redis, Redis to replica) and costs Redis CPU. With a blob folder
(`reward.queue.blob_dir` on the trainer, `queue.blob_dir` or SPIE_BLOB_DIR on the replicas: the same
folder seen by both, e.g. /dev/shm/spie-blobs on one machine, or a shared mount across machines) the
client writes one file per rollout batch, every item's payload one after another, and stores in the
item's blob key a reference instead: `REF_PREFIX` + "<file> <offset> <length>". A replica reads the
bytes from the file; the stream, the attempts, the results and every guarantee of the queue stay
as they are, because only the blob key's value changed.

A reference can never be mistaken for an Item: it starts with a zero byte, and a protobuf message
cannot (field number 0 is invalid).

Lifetime: the client deletes its batch's file once the batch is gathered (or given up), so a job
still in a stream then finds the file gone, which a replica treats as "nothing left to score", as it
treats a released blob. A client that died leaves files behind: every client sweeps the folder of
files older than `blob_ttl_s` (the same lifetime as an inline blob) when it starts and then every
tenth of that.

Safety: a replica reads only plain files directly inside its own folder, named as a client names
them (no path separators, no leading dot); a reference naming anything else fails its item.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

from reward_servers.shm import sweep

REF_PREFIX = b"\x00spie-blob "
BLOB_DIR_ENV = "SPIE_BLOB_DIR"
SUFFIX = ".items"
_NAME = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9_.-]*\.items$")


class BlobError(ValueError):
    """A reference that cannot be read: malformed, outside the folder, or of the wrong length."""


def blob_dir(configured: str = "") -> str:
    """The blob folder: `configured`, else SPIE_BLOB_DIR, else "" (inline)."""
    return configured or os.environ.get(BLOB_DIR_ENV, "")


def is_reference(blob: bytes | None) -> bool:
    return blob is not None and blob.startswith(REF_PREFIX)


class BlobFolder:
    """A client's side of the folder: writes a batch's payloads, deletes them, sweeps old files."""

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder).expanduser()
        try:
            self.folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as err:
            raise BlobError(
                f"reward.queue.blob_dir {str(folder)!r}: cannot create it ({err.strerror})"
            ) from err
        if not os.access(self.folder, os.W_OK | os.X_OK):
            raise BlobError(f"reward.queue.blob_dir {str(folder)!r}: not writable by this user")
        self._next_sweep = 0.0

    def write(self, name: str, payloads: list[bytes]) -> list[bytes]:
        """Write `payloads` one after another to `<name>.items`; return each one's reference."""
        file = name + SUFFIX
        if not _NAME.match(file):
            raise BlobError(f"blob name {name!r}: letters, digits, '-', '_' and '.' only")
        refs, offset = [], 0
        with open(self.folder / file, "wb") as f:
            f.writelines(payloads)
        for payload in payloads:
            refs.append(REF_PREFIX + f"{file} {offset} {len(payload)}".encode())
            offset += len(payload)
        return refs

    def delete(self, name: str) -> None:
        (self.folder / (name + SUFFIX)).unlink(missing_ok=True)

    def sweep(self, older_than_s: float, now: float | None = None) -> int:
        """Delete batch files not modified for `older_than_s` (left by clients that died); at most
        once per tenth of that. Returns how many went."""
        if time.monotonic() < self._next_sweep:
            return 0
        self._next_sweep = time.monotonic() + older_than_s / 10
        return sweep(self.folder, _NAME, older_than_s, now)


class BlobReader:
    """A replica's side: turns references into payloads (`folder` "" : references fail their item)."""

    def __init__(self, folder: str | os.PathLike = "") -> None:
        self.folder = Path(folder).expanduser().resolve() if folder else None

    def resolve(self, blobs: list[bytes]) -> list[bytes | None | BlobError]:
        """Each blob as its payload: inline blobs as they are, references read from their file
        (opened once per file), None where the file is gone (the batch was gathered: nothing to
        score), a BlobError where the reference is bad."""
        out: list[bytes | None | BlobError] = list(blobs)
        by_file: dict[str, list[tuple[int, int, int]]] = {}
        for k, blob in enumerate(blobs):
            if not is_reference(blob):
                continue
            try:
                file, offset, length = blob[len(REF_PREFIX) :].decode().split(" ")
                spot = (k, int(offset), int(length))
            except ValueError:
                out[k] = BlobError(f"malformed blob reference {blob[:80]!r}")
                continue
            if self.folder is None:
                out[k] = BlobError(
                    "the item's payload is in a shared blob folder, but this replica has none: set "
                    f"queue.blob_dir or {BLOB_DIR_ENV} to the folder the trainer's reward.queue.blob_dir names"
                )
            elif not _NAME.match(file):
                out[k] = BlobError(f"blob reference names {file!r}, not a batch file")
            else:
                by_file.setdefault(file, []).append(spot)
        for file, spots in by_file.items():
            try:
                fd = os.open(self.folder / file, os.O_RDONLY | os.O_NOFOLLOW)
            except FileNotFoundError:
                for k, _, _ in spots:
                    out[k] = None
                continue
            except OSError as err:
                for k, _, _ in spots:
                    out[k] = BlobError(f"blob file {file} in {self.folder}: {err.strerror}")
                continue
            try:
                for k, offset, length in spots:
                    data = os.pread(fd, length, offset)
                    if len(data) != length:
                        out[k] = BlobError(
                            f"blob file {file}: {len(data)} bytes at {offset}, expected {length}"
                        )
                    else:
                        out[k] = data
            finally:
                os.close(fd)
        return out
