"""
Bounded byte pipes from the reactor to one worker thread: the HTTP layer
writes a request body into them as it arrives, a worker (tar extraction,
``docker load``) reads it at the same time. Past a high-water mark the
writer is paused (the socket stops being read), below a low-water mark it
is resumed, so a fast client cannot outrun the disk or the engine.
"""

from __future__ import annotations

import collections
import threading
from typing import Any, Callable, Iterator

from plexagent import errors

#: Bytes buffered between the connection and the worker before the
#: connection is paused, and the level at which it is resumed.
#: Bytes buffered between the connection and the extracting thread before
#: the connection is paused, and the level at which it is resumed.
PIPE_HIGH_WATER = 8 << 20
PIPE_LOW_WATER = 2 << 20


class BodyPipe:
    """
    A bounded byte pipe from the reactor (``write``, ``finish``, ``abort``)
    to one worker thread (``read``). Past the high-water mark ``pause`` is
    called; once the worker drains below the low-water mark, ``resume``
    (both on the reactor).
    """

    def __init__(self, reactor: Any, pause: Callable[[], None], resume: Callable[[], None],
                 high: int = PIPE_HIGH_WATER, low: int = PIPE_LOW_WATER) -> None:
        self._reactor = reactor
        self._pause = pause
        self._resume = resume
        self._high = high
        self._low = low
        self._cond = threading.Condition()
        self._chunks: collections.deque[bytes] = collections.deque()
        self._size = 0
        self._eof = False
        self._error: errors.PlexError | None = None
        self._closed = False
        self._paused = False

    # reactor side

    def write(self, data: bytes) -> None:
        with self._cond:
            if self._closed:
                return
            self._chunks.append(data)
            self._size += len(data)
            self._cond.notify()
            pause = self._size > self._high and not self._paused
            if pause:
                self._paused = True
        if pause:
            self._pause()

    def finish(self) -> None:
        with self._cond:
            self._eof = True
            self._cond.notify()

    def abort(self, error: errors.PlexError) -> None:
        with self._cond:
            self._error = error
            self._cond.notify()

    @property
    def paused(self) -> bool:
        return self._paused

    # worker side

    def read(self, n: int = -1) -> bytes:
        with self._cond:
            while not self._chunks and not self._eof and self._error is None:
                self._cond.wait()
            if self._error is not None:
                raise self._error
            if not self._chunks:
                return b""
            first = self._chunks[0]
            if n is None or n < 0 or len(first) <= n:
                out = self._chunks.popleft()
            else:
                out, self._chunks[0] = first[:n], first[n:]
            self._size -= len(out)
            resume = self._paused and self._size < self._low
            if resume:
                self._paused = False
        if resume:
            self._reactor.callFromThread(self._resume)
        return out

    def close_reader(self) -> None:
        """The worker is done: drop what is buffered and discard what comes."""
        with self._cond:
            self._closed = True
            self._chunks.clear()
            self._size = 0
            resume = self._paused
            self._paused = False
        if resume:
            self._reactor.callFromThread(self._resume)


class TarFeed:
    """
    A bounded hand-over of tar bytes from the reactor (``put``) to the worker
    thread that streams them to Docker (``chunks``).

    When more than ``high_water`` bytes wait, ``pause()`` is called on the
    reactor (the HTTP layer stops reading the socket); when the worker has
    drained below ``low_water``, ``resume()`` is called on the reactor.
    """

    def __init__(
        self,
        reactor: Any,
        pause: Callable[[], None],
        resume: Callable[[], None],
        high_water: int = 8 * 1024 * 1024,
        low_water: int = 2 * 1024 * 1024,
    ) -> None:
        self._reactor = reactor
        self._pause = pause
        self._resume = resume
        self._high = high_water
        self._low = low_water
        self._chunks: collections.deque[bytes] = collections.deque()
        self._pending = 0
        self._cond = threading.Condition()
        self._eof = False
        self._aborted = False
        self._paused = False
        self.total = 0

    def put(self, data: bytes) -> None:
        """On the reactor: queue ``data`` for the worker."""
        if not data:
            return
        with self._cond:
            if self._aborted:
                return
            self._chunks.append(data)
            self._pending += len(data)
            self.total += len(data)
            over = self._pending > self._high and not self._paused
            if over:
                self._paused = True
            self._cond.notify()
        if over:
            self._pause()

    def close(self) -> None:
        """On the reactor: no more data."""
        with self._cond:
            self._eof = True
            self._cond.notify()

    def abort(self) -> None:
        """Drop everything; the worker's upload to Docker fails."""
        with self._cond:
            self._aborted = True
            self._chunks.clear()
            self._pending = 0
            was_paused, self._paused = self._paused, False
            self._cond.notify()
        if was_paused:
            self._reactor.callFromThread(self._resume)

    def chunks(self) -> Iterator[bytes]:
        """In the worker thread: the bytes, as they arrive."""
        while True:
            with self._cond:
                while not self._chunks and not self._eof and not self._aborted:
                    self._cond.wait()
                if self._aborted:
                    raise OSError("the upload was aborted")
                if not self._chunks:
                    return
                data = self._chunks.popleft()
                self._pending -= len(data)
                resume = self._paused and self._pending <= self._low
                if resume:
                    self._paused = False
            if resume:
                self._reactor.callFromThread(self._resume)
            yield data
