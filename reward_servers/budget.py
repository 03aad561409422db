"""One decoded-bytes budget shared by all the work a reward server holds at once.

A request's images are small on the wire and large once decoded (a 1-bit PNG of 4096 x 4096 is a few
KiB and 48 MiB of RGB). A budget per request does not bound the server: N concurrent requests each
under it decode to N times as much. So every transport reserves the bytes its images will decode to
(read from the headers, see `images.item_decoded_bytes`) from one `DecodedBytesBudget` before decoding,
and gives them back once the items are scored:

    async with budget.hold(nbytes, deadline):   # waits its turn, FIFO, until `deadline`
        decoded = decode(...)
        results = await batcher.submit(...)

Work that does not fit waits in arrival order until earlier work is released; when its deadline
passes first, or when it could never fit (more than the whole budget), `BudgetExceeded` is raised
(gRPC answers RESOURCE_EXHAUSTED). Waiting is first come, first served, so a large request is not
starved by a stream of small ones.

It is safe to share between event loops and threads: state changes under a lock, and a waiter is
woken on its own loop.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

MIB = 1024 * 1024


class BudgetExceeded(Exception):
    """The bytes asked for exceed the whole budget, or did not fit before the deadline."""


@dataclass
class _Waiter:
    nbytes: int
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future
    granted: bool = field(default=False)


def _wake(future: asyncio.Future) -> None:
    if not future.done():
        future.set_result(None)


class DecodedBytesBudget:
    """At most `limit_bytes` of decoded images held at once, across every request and transport.

    Args:
        limit_bytes: the budget (`server.max_decoded_mb` MiB on a reward server).
    """

    def __init__(self, limit_bytes: int) -> None:
        if limit_bytes < 1:
            raise ValueError(f"a decoded-bytes budget must be >= 1 byte, got {limit_bytes}")
        self.limit = int(limit_bytes)
        self._used = 0
        self._lock = threading.Lock()
        self._waiters: collections.deque[_Waiter] = collections.deque()

    @property
    def in_use(self) -> int:
        """Bytes reserved now."""
        return self._used

    @property
    def waiting(self) -> int:
        """Reservations waiting for room."""
        return len(self._waiters)

    def _grant_locked(self) -> None:
        while self._waiters and self._used + self._waiters[0].nbytes <= self.limit:
            waiter = self._waiters.popleft()
            self._used += waiter.nbytes
            waiter.granted = True
            waiter.loop.call_soon_threadsafe(_wake, waiter.future)

    def _describe(self, nbytes: int) -> str:
        return f"{nbytes / MIB:.0f} MiB of decoded images, over the server's budget of {self.limit / MIB:.0f} MiB"

    async def acquire(self, nbytes: int, deadline: float | None = None) -> None:
        """Reserve `nbytes`, waiting in arrival order until they fit.

        Args:
            nbytes: bytes the work's images decode to (>= 0; 0 returns at once).
            deadline: `time.monotonic()` seconds to give up at; None waits as long as it takes.

        Raises:
            BudgetExceeded: `nbytes` exceeds the whole budget (at once), or the deadline passed
                before they fit (nothing stays reserved).
        """
        nbytes = max(0, int(nbytes))
        if nbytes > self.limit:
            raise BudgetExceeded(f"{self._describe(nbytes)} (server.max_decoded_mb)")
        if nbytes == 0:
            return
        loop = asyncio.get_running_loop()
        with self._lock:
            if not self._waiters and self._used + nbytes <= self.limit:
                self._used += nbytes
                return
            waiter = _Waiter(nbytes, loop, loop.create_future())
            self._waiters.append(waiter)
        timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
        try:
            await asyncio.wait_for(waiter.future, timeout)
        except BaseException as err:  # the deadline, or the caller was cancelled
            with self._lock:
                if waiter.granted:
                    self._used -= nbytes
                else:
                    self._waiters.remove(waiter)
                self._grant_locked()  # whoever queued behind it may fit now
            if isinstance(err, TimeoutError | asyncio.TimeoutError):
                raise BudgetExceeded(
                    f"{nbytes / MIB:.0f} MiB of decoded images did not fit in the server's budget of "
                    f"{self.limit / MIB:.0f} MiB (server.max_decoded_mb) before the deadline: the server "
                    "is busy with other requests; retry later or send fewer items"
                ) from None
            raise

    def release(self, nbytes: int) -> None:
        """Give back `nbytes` reserved by `acquire`, and wake whoever fits now."""
        nbytes = max(0, int(nbytes))
        if nbytes == 0:
            return
        with self._lock:
            self._used -= nbytes
            self._grant_locked()

    @contextlib.asynccontextmanager
    async def hold(self, nbytes: int, deadline: float | None = None) -> AsyncIterator[None]:
        """`acquire(nbytes, deadline)`, then `release(nbytes)` however the block ends."""
        await self.acquire(nbytes, deadline)
        try:
            yield
        finally:
            self.release(nbytes)


def limit_malloc_arenas(arenas: int = 2) -> bool:
    """Have glibc keep at most `arenas` malloc arenas (M_ARENA_MAX), process-wide; `spie serve`
    calls it. False where there is no glibc (nothing changes).

    glibc gives each thread that allocates its own arena, up to 8 per core, and each keeps the
    blocks freed into it for reuse by that arena alone. The decode threads, gRPC's threads and the
    scorer's thread each held on to the largest images they had seen, so RSS rose with concurrency
    past the decoded budget though the live images stayed within it (16 concurrent requests: +153
    MiB over a 128 MiB budget). With two arenas freed images are reused across threads: +126-128.

    (An earlier fix fixed the mmap threshold at 128 KiB instead: every large block a fresh,
    page-faulted mmap. RSS was exact, but it cost a sequential 12 MiB request +40 ms and a CPU
    model-backed scorer 30 % of its throughput.)"""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        return bool(libc.mallopt(-8, int(arenas)))  # M_ARENA_MAX
    except (OSError, AttributeError):
        return False
