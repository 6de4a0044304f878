"""A TCP send buffer: bytes appended at the tail, acknowledged bytes dropped from the
head, segments copied out from anywhere in between.

Theory of operation: a ``bytearray`` does all three, but dropping from its head leaves
a gap that the next append past its allocation closes by moving the whole contents --
with a 4 MB send buffer that is a multi-megabyte ``memmove`` every few writes, the
single largest cost of a bulk sender.  Here the data lives in immutable chunks: large
writes become a chunk of their own (no copy when they are ``bytes``), and so does a
write into an empty buffer (a request or a response, usually sent whole before the
next write: gathering it would cost two copies for nothing); other small writes are
gathered in a ``bytearray`` tail that is frozen into a chunk at ``COALESCE`` bytes, so a
stream of tiny writes does not become a list of tiny chunks.  Dropping from the head
only moves a start offset and forgets whole chunks; a segment is normally one slice of
one chunk, found by bisecting the chunks' start positions.

Positions given to :meth:`peek` are relative to the head, as they were with the
``bytearray`` (offset 0 is the oldest unacknowledged byte).
"""

from __future__ import annotations

import bisect

COALESCE = 64 * 1024  # the tail becomes a chunk at this size
LARGE = 4 * 1024  # writes this big skip the tail (when it is empty)
_COMPACT = 64  # forget consumed chunk slots once this many pile up


class SendBuffer:
    """FIFO of bytes with random-access reads; ``len()`` is the bytes held."""

    __slots__ = ("_chunks", "_first", "_head", "_length", "_starts", "_tail", "_tail_start")

    def __init__(self) -> None:
        self._chunks: list[bytes] = []
        self._starts: list[int] = []  # absolute stream position of each chunk
        self._first = 0  # index of the first live chunk
        self._head = 0  # absolute position of the oldest byte held
        self._length = 0
        self._tail = bytearray()
        self._tail_start = 0  # absolute position of the tail's first byte

    def __len__(self) -> int:
        return self._length

    def __bool__(self) -> bool:
        return self._length > 0

    def append(self, data: bytes | bytearray | memoryview) -> None:
        """Add ``data`` at the tail (copied unless it is already ``bytes``)."""
        size = len(data)
        if not size:
            return
        tail = self._tail
        if not tail and (size >= LARGE or not self._length):
            self._chunks.append(data if type(data) is bytes else bytes(data))
            self._starts.append(self._head + self._length)
        else:
            if not tail:
                self._tail_start = self._head + self._length
            tail += data
            if len(tail) >= COALESCE:
                self._freeze_tail()
        self._length += size

    def _freeze_tail(self) -> None:
        self._chunks.append(bytes(self._tail))
        self._starts.append(self._tail_start)
        self._tail = bytearray()

    def consume(self, count: int) -> None:
        """Drop the ``count`` oldest bytes (all of them if ``count`` is larger)."""
        if count <= 0:
            return
        if count >= self._length:
            self.clear()
            return
        self._head += count
        self._length -= count
        head = self._head
        chunks, starts = self._chunks, self._starts
        first = self._first
        while first < len(chunks) and starts[first] + len(chunks[first]) <= head:
            chunks[first] = b""  # release the memory now
            first += 1
        if first >= _COMPACT:
            del chunks[:first]
            del starts[:first]
            first = 0
        self._first = first
        if self._tail and self._tail_start < head:
            del self._tail[: head - self._tail_start]
            self._tail_start = head

    def peek(self, offset: int, count: int) -> bytes:
        """A copy of ``count`` bytes starting ``offset`` bytes after the head (fewer at
        the end of the buffer)."""
        if offset < 0 or count <= 0 or offset >= self._length:
            return b""
        start = self._head + offset
        end = min(start + count, self._head + self._length)
        if self._tail and end > self._tail_start:
            self._freeze_tail()
        chunks, starts = self._chunks, self._starts
        index = bisect.bisect_right(starts, start, self._first) - 1
        chunk = chunks[index]
        local = start - starts[index]
        if local + (end - start) <= len(chunk):
            if local == 0 and end - start == len(chunk):
                return chunk
            return chunk[local : local + (end - start)]
        parts = [chunk[local:]]
        position = starts[index] + len(chunk)
        while position < end:
            index += 1
            chunk = chunks[index]
            parts.append(chunk[: end - position])
            position += len(chunk)
        return b"".join(parts)

    def clear(self) -> None:
        """Drop everything (the next byte appended keeps the stream position)."""
        self._head += self._length
        self._length = 0
        self._chunks = []
        self._starts = []
        self._first = 0
        self._tail = bytearray()
