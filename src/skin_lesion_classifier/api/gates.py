"""Admission control: a bounded number of jobs at once and a bounded queue behind them.

A request that finds the queue full is answered 503 with ``Retry-After`` at once instead
of waiting without limit. When the last job of a burst finishes, freed heap pages are
handed back to the operating system (glibc ``malloc_trim``), so the resident memory after
a burst returns near its level before it.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from skin_lesion_classifier.api.schemas import APIError

logger = logging.getLogger(__name__)


def _load_malloc_trim():
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to trim
        return None


_MALLOC_TRIM = _load_malloc_trim()


def release_free_memory() -> None:
    """Return free heap memory to the OS (a no-op where glibc is not the allocator)."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


class Gate:
    """At most ``slots`` jobs inside, at most ``queue`` waiting; others get 503.

    ``name`` and ``setting`` appear in the 503 detail (which endpoint is busy, which
    setting sizes its queue); ``retry_after_s`` is the ``Retry-After`` header.
    """

    def __init__(
        self, name: str, slots: int, queue: int, setting: str, retry_after_s: int = 1
    ):
        self.name, self.slots, self.queue, self.setting = name, slots, queue, setting
        self.retry_after_s = retry_after_s
        self._semaphore = asyncio.Semaphore(slots)
        self.waiting = 0
        self.inside = 0

    @asynccontextmanager
    async def enter(self) -> AsyncIterator[None]:
        if self._semaphore.locked() and self.waiting >= self.queue:
            raise APIError(
                503,
                "busy",
                f"{self.name}: {self.inside} request(s) running and {self.waiting} "
                f"waiting (the queue holds {self.queue}, {self.setting}); retry later",
                headers={"Retry-After": str(self.retry_after_s)},
            )
        self.waiting += 1
        try:
            await self._semaphore.acquire()
        finally:
            self.waiting -= 1
        self.inside += 1
        try:
            yield
        finally:
            self.inside -= 1
            self._semaphore.release()
            if self.inside == 0 and self.waiting == 0:
                release_free_memory()
