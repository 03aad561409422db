"""Raw pixels handed to a reward server on the same machine through shared memory, not the socket.

Like Triton's system shared memory: a client (`ScorerClient(shared_dir=...)`) keeps a few files in
a folder both processes see (/dev/shm/... by default in spirit: any tmpfs), mapped once and reused
for every request. It copies each raw image's pixels into one of them and sends the image as
`ENCODING_RAW_UINT8_SHARED` with `data` = "<file> <offset>"; the server (`server.shared_dir`, else
SPIE_BLOB_DIR) maps the same file once and decodes the image as a read-only view of those pages.
The 12 MiB of a batch of 32 images of 256 px then cost the client one memcpy and the server none,
instead of gRPC's framing, the socket and three copies (reward_servers/README.md has the figures).

A region is reused only after its request's response came back (one region per request in
flight), so the server never reads a region the client is refilling for a request it still scores.

Safety: the server maps only plain files directly in its own folder, named as a client names them
(`spie-shm-<hex>-<n>.region`), never following a symlink, and checks every image against the file's
size before making a view. Whoever can write the folder can also shrink a mapped file, which would
crash the server (SIGBUS): keep the folder private to the user that runs the trainer and the
servers (the client creates it 0700).
"""

from __future__ import annotations

import mmap
import os
import re
import secrets
import threading
import time
from pathlib import Path

import numpy as np

from protos.spie.reward.v1 import reward_pb2 as pb
from reward_servers.images import ImageError

SHARED_DIR_ENV = "SPIE_BLOB_DIR"
_NAME = re.compile(r"^spie-shm-[0-9a-f]{8,32}-[0-9]{1,6}\.region$")
_ALIGN = 64


class SharedMemoryError(ImageError):
    """An image reference the server cannot read: bad name, outside the folder, past the file's end."""


def sweep(folder: Path, name: re.Pattern, older_than_s: float, now: float | None = None) -> int:
    """Delete the plain files in `folder` whose names match `name` and that were not written for
    `older_than_s` (what clients that died left: shared-memory regions here, blob-path batch files
    in queue/blobs.py). Returns how many went."""
    now = time.time() if now is None else now
    gone = 0
    with os.scandir(folder) as entries:
        for entry in entries:
            try:
                if name.match(entry.name) and now - entry.stat(follow_symlinks=False).st_mtime > older_than_s:
                    os.unlink(entry.path)
                    gone += 1
            except FileNotFoundError:  # another client swept it first
                continue
    return gone


def _aligned(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


class _Region:
    """One client file, grown as needed and mapped read-write."""

    def __init__(self, folder: Path, name: str) -> None:
        self.name = name
        self.fd = os.open(folder / name, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        self.size = 0
        self.map: mmap.mmap | None = None

    def fit(self, nbytes: int) -> mmap.mmap:
        if nbytes > self.size:
            size = max(nbytes, 2 * self.size, 1 << 20)
            os.ftruncate(self.fd, size)
            self.map = mmap.mmap(self.fd, size)  # the old map goes when nothing views it any more
            self.size = size
        assert self.map is not None
        return self.map

    def close(self) -> None:
        os.close(self.fd)


class SharedRegions:
    """A client's regions in `folder`: `pack(items)` gives a region holding the items' raw pixels
    and the items that refer to it; `release(region)` once the response is in."""

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder).expanduser()
        try:
            self.folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as err:
            raise SharedMemoryError(f"shared_dir {str(folder)!r}: cannot create it ({err.strerror})") from err
        self._tag = secrets.token_hex(6)
        sweep(self.folder, _NAME, older_than_s=3600)  # regions of clients that died
        self._free: list[_Region] = []
        self._all: list[_Region] = []
        self._lock = threading.Lock()

    def _acquire(self) -> _Region:
        with self._lock:
            if self._free:
                return self._free.pop()
            region = _Region(self.folder, f"spie-shm-{self._tag}-{len(self._all)}.region")
            self._all.append(region)
            return region

    def release(self, region: _Region) -> None:
        with self._lock:
            self._free.append(region)

    def pack(self, items: list[pb.Item]) -> tuple[_Region | None, list[pb.Item]]:
        """The items with every raw image (edited, source, mask, exemplars) moved into a region;
        (None, items) when none is raw. The caller's items are not changed."""
        images = [(im, len(im.data)) for it in items for im in _images(it) if _is_raw(im)]
        if not images:
            return None, items
        region = self._acquire()
        try:
            view = region.fit(sum(_aligned(n) for _, n in images))
            offset, where = 0, {}
            for image, n in images:
                view[offset : offset + n] = image.data
                where[id(image)] = offset
                offset += _aligned(n)
        except BaseException:
            self.release(region)
            raise
        os.utime(region.fd)  # a region in use is never swept as a dead client's
        return region, [_moved(it, region.name, where) for it in items]

    def close(self) -> None:
        """Unmap and delete every region (the server's maps stay valid until it drops them)."""
        with self._lock:
            for region in self._all:
                region.close()
                (self.folder / region.name).unlink(missing_ok=True)
            self._all, self._free = [], []


def _images(item: pb.Item) -> list[pb.Image]:
    out = [item.edited, item.source, *item.exemplars]
    if item.HasField("mask"):
        out.append(item.mask)
    return out


def _is_raw(image: pb.Image) -> bool:
    return image.encoding == pb.Image.ENCODING_RAW_UINT8


def _moved(item: pb.Item, file: str, where: dict[int, int]) -> pb.Item:
    """A new Item like `item` whose raw images refer to `file` at their offsets in `where`."""

    def ref(image: pb.Image) -> pb.Image:
        if id(image) not in where:
            return image
        return pb.Image(
            encoding=pb.Image.ENCODING_RAW_UINT8_SHARED,
            data=f"{file} {where[id(image)]}".encode(),
            width=image.width,
            height=image.height,
            channels=image.channels,
        )

    out = pb.Item(id=item.id, instruction=item.instruction, want_gradient=item.want_gradient)
    out.edited.CopyFrom(ref(item.edited))
    out.source.CopyFrom(ref(item.source))
    out.exemplars.extend(ref(e) for e in item.exemplars)
    if item.HasField("mask"):
        out.mask.CopyFrom(ref(item.mask))
    if item.HasField("metadata"):
        out.metadata.CopyFrom(item.metadata)
    if item.HasField("edited_tensor"):
        out.edited_tensor.CopyFrom(item.edited_tensor)
    return out


class SharedReader:
    """The server's side: read-only maps of client regions, each opened once."""

    def __init__(self, folder: str | os.PathLike = "") -> None:
        self.folder = Path(folder).expanduser().resolve() if folder else None
        self._maps: dict[str, tuple[int, mmap.mmap]] = {}  # name -> (fd, map)
        self._lock = threading.Lock()
        self._next_prune = 0.0

    def pixels(self, data: bytes, nbytes: int, field: str) -> np.ndarray:
        """`nbytes` uint8 of the region and offset that `data` names, as a read-only view."""
        if self.folder is None:
            raise SharedMemoryError(
                f"{field}: the image is in shared memory, but this server has no shared folder "
                f"(server.shared_dir or {SHARED_DIR_ENV}); send it as RAW_UINT8 or PNG"
            )
        try:
            name, offset_text = data.decode().split(" ")
            offset = int(offset_text)
        except (UnicodeDecodeError, ValueError):
            raise SharedMemoryError(f"{field}: malformed shared-memory reference {data[:80]!r}") from None
        if not _NAME.match(name) or offset < 0:
            raise SharedMemoryError(f"{field}: shared-memory reference names {name!r}, not a region")
        with self._lock:
            if time.monotonic() >= self._next_prune:
                self._prune()
            fd, region = self._map(name, field)
            size = os.fstat(fd).st_size
            if offset + nbytes > min(size, len(region)):
                if offset + nbytes <= size:  # the client grew the file: map it again
                    self._maps.pop(name)
                    os.close(fd)
                    fd, region = self._map(name, field)
                if offset + nbytes > min(size, len(region)):
                    raise SharedMemoryError(
                        f"{field}: {nbytes} bytes at {offset} lie past the end of {name} ({size} bytes)"
                    )
        return np.frombuffer(region, dtype=np.uint8, count=nbytes, offset=offset)

    def _prune(self) -> None:
        """Forget the maps of regions their clients deleted (or replaced), at most every 5 s, so a
        long-lived server does not keep their memory: an open file keeps a deleted region alive."""
        self._next_prune = time.monotonic() + 5.0
        assert self.folder is not None
        for name, (fd, _) in list(self._maps.items()):
            try:
                alive = os.stat(self.folder / name, follow_symlinks=False).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                alive = False
            if not alive:
                del self._maps[name]
                os.close(fd)

    def _map(self, name: str, field: str) -> tuple[int, mmap.mmap]:
        if name in self._maps:
            return self._maps[name]
        assert self.folder is not None
        try:
            fd = os.open(self.folder / name, os.O_RDONLY | os.O_NOFOLLOW)
        except OSError as err:
            raise SharedMemoryError(f"{field}: shared-memory region {name}: {err.strerror}") from None
        try:
            region = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
        except (OSError, ValueError) as err:
            os.close(fd)
            raise SharedMemoryError(f"{field}: shared-memory region {name}: {err}") from None
        if len(self._maps) >= 256:  # clients come and go: forget the oldest maps
            old = next(iter(self._maps))
            os.close(self._maps.pop(old)[0])
        self._maps[name] = (fd, region)
        return fd, region
