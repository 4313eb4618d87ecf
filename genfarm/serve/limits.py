"""Admission control of one replica: at most `concurrent` requests generate, at most `queued` wait; the rest are
turned away at once (429 with Retry-After) instead of piling up in an unbounded queue."""

from __future__ import annotations

import asyncio


class Overloaded(Exception):
    pass


class Limiter:
    def __init__(self, concurrent: int, queued: int):
        self.concurrent, self.queued = concurrent, queued
        self.running = 0
        self.waiting = 0
        self._slots = asyncio.Semaphore(concurrent)

    async def acquire(self) -> Slot:
        """Take a generation slot (waiting in the queue if need be); Overloaded when the queue is full too."""
        if self._slots.locked():
            if self.waiting >= self.queued:
                raise Overloaded(f"{self.running} requests generating and {self.waiting} waiting")
            self.waiting += 1
            try:
                await self._slots.acquire()
            finally:
                self.waiting -= 1
        else:
            await self._slots.acquire()
        self.running += 1
        return Slot(self)

    def _release(self) -> None:
        self.running -= 1
        self._slots.release()


class Slot:
    """A held generation slot; release() is safe to call more than once (a stream's end and its cleanup)."""

    def __init__(self, limiter: Limiter):
        self._limiter = limiter

    def release(self) -> None:
        limiter, self._limiter = self._limiter, None
        if limiter is not None:
            limiter._release()
