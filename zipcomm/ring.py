"""Single-producer single-consumer ring of variable-length records in caller-provided memory.

The memory can be a ``multiprocessing.shared_memory.SharedMemory(...).buf`` mapped by two
processes: one pushes, the other pops, without locks.  Two implementations share one memory
layout (described in ``csrc/ring.h``) and one interface, so either can attach a ring the other
created:

* :class:`CRing` wraps the C ring (``csrc/ring.c``, C11 atomics, cffi extension
  ``zipcomm._ring_c`` built by ``pip install -e .``);
* :class:`PyRing` is a pure-Python twin built on :mod:`struct` and memoryviews.

:data:`Ring` is the one selected by the environment variable ``ZIPCOMM_RING`` (``c`` or
``python``).  Unset, it is the C ring if the extension is built, else the Python twin;
``ZIPCOMM_RING=c`` without the extension raises :class:`ImportError`.

::

    shm = SharedMemory(create=True, size=memory_size(1 << 20))
    ring = Ring.create(shm.buf)                # producer;  the consumer: Ring.attach(shm.buf)
    ring.push(b"descriptor")                   # False if full (push_wait() waits)
    ring.pop()                                 # bytes, or None if empty (pop_wait() waits)
    ring.close()                               # release the memory before shm.close()

Records up to :attr:`~_RingBase.max_record` bytes (about half the capacity) are accepted: a
record of that size always fits into an empty ring, so a full ring never blocks one forever.
At most one producer and one consumer may use a ring at a time; a handle is not thread-safe.

The Python twin has no atomics.  It relies on the GIL and on head/tail being aligned 8-byte
words stored and loaded whole through a ``memoryview.cast("Q")``; it writes a record before it
publishes the new head (and reads it before it publishes the new tail), in program order.
That is enough for another process on a CPU that does not reorder stores with stores or loads
with loads (x86-64, TSO); on weakly ordered CPUs (ARM) use the C ring across processes.
"""
from __future__ import annotations

import ctypes
import os
import struct
import time
from abc import ABC, abstractmethod
from typing import Any, Callable, Self, TypeVar

from .errors import (
    BufferTooSmall,
    InvalidRingMemory,
    RecordTooLarge,
    RingClosed,
    RingCorrupt,
    RingEmpty,
    RingError,
    RingFull,
)

__all__ = [
    "Ring", "CRing", "PyRing", "implementation", "memory_size", "max_record_for",
    "HEADER_SIZE", "HEAD_OFFSET", "TAIL_OFFSET", "RECORD_HEADER", "MIN_CAPACITY", "SKIP",
]

# --- the layout (csrc/ring.h) ------------------------------------------------------------

MAGIC = 0x7A63726E67303031  # "zcrng001"
VERSION = 1
HEADER_SIZE = 192  # magic u64 | version u32 | header_size u32 | capacity u64 | ... then data
HEAD_OFFSET = 64  # producer position (u64, a growing byte count), own cache line
TAIL_OFFSET = 128  # consumer position (u64, a growing byte count), own cache line
ALIGN = 8
RECORD_HEADER = 8  # u32 length, u32 reserved (0); payload padded to 8
MIN_CAPACITY = 16
SKIP = 0xFFFFFFFF  # length of the wrap-around marker

_MASK64 = (1 << 64) - 1
_W_MAGIC, _W_CAPACITY, _W_HEAD, _W_TAIL = 0, 2, HEAD_OFFSET // 8, TAIL_OFFSET // 8
_VERSION_WORDS = struct.Struct("=II")  # version, header_size at offset 8
_RECORD = struct.Struct("=II")  # length, reserved

# status codes shared with the C ring
_OK, _FULL, _EMPTY, _TOO_BIG, _SMALL_BUFFER = 0, -1, -2, -3, -4
_CORRUPT, _BAD_VERSION, _BAD_SIZE, _BAD_ALIGN, _CLOSED = -5, -6, -7, -8, -9

try:
    from . import _ring_c  # type: ignore[attr-defined]
except ImportError as exc:
    _ring_c = None
    _C_MISSING = f"the C ring extension zipcomm._ring_c is not built ({exc})"
else:
    _layout = {name: getattr(_ring_c.lib, "RING_" + name) for name in (
        "MAGIC", "VERSION", "HEADER_SIZE", "HEAD_OFFSET", "TAIL_OFFSET", "RECORD_HEADER",
        "MIN_CAPACITY", "SKIP", "OK", "FULL", "EMPTY", "TOO_BIG", "SMALL_BUFFER", "CORRUPT",
        "BAD_VERSION", "BAD_SIZE", "BAD_ALIGN", "CLOSED")}
    _expected = dict(
        MAGIC=MAGIC, VERSION=VERSION, HEADER_SIZE=HEADER_SIZE, HEAD_OFFSET=HEAD_OFFSET,
        TAIL_OFFSET=TAIL_OFFSET, RECORD_HEADER=RECORD_HEADER, MIN_CAPACITY=MIN_CAPACITY, SKIP=SKIP,
        OK=_OK, FULL=_FULL, EMPTY=_EMPTY, TOO_BIG=_TOO_BIG, SMALL_BUFFER=_SMALL_BUFFER,
        CORRUPT=_CORRUPT, BAD_VERSION=_BAD_VERSION, BAD_SIZE=_BAD_SIZE, BAD_ALIGN=_BAD_ALIGN,
        CLOSED=_CLOSED)
    _functions = ("ring_init", "ring_attach", "ring_close", "ring_push", "ring_push_bytes",
                  "ring_pop", "ring_peek_len", "ring_used")
    if _layout != _expected or not all(hasattr(_ring_c.lib, f) for f in _functions):
        _C_MISSING = ("the C ring extension zipcomm._ring_c is stale (it does not match "
                      "zipcomm/ring.py)")
        _ring_c = None
    del _layout, _expected, _functions


def memory_size(capacity: int) -> int:
    """Bytes of memory for a ring whose data area holds ``capacity`` bytes (rounded up to 8)."""
    if capacity < MIN_CAPACITY:
        raise ValueError(f"a ring's capacity is at least {MIN_CAPACITY} bytes, not {capacity}")
    return HEADER_SIZE + ((capacity + 7) & ~7)


def max_record_for(capacity: int) -> int:
    """The largest payload a ring of ``capacity`` data bytes accepts."""
    # A record of 8 * ceil(capacity / 16) bytes fits an empty ring at any offset: either before
    # the end of the data area or, after a skip marker, before the offset.
    return min(max(((capacity // 8 + 1) // 2) * 8 - RECORD_HEADER, 0), SKIP - 1)


def _bytes_view(buf: Any) -> memoryview:
    """``buf`` as a flat memoryview of bytes; InvalidRingMemory unless writable and contiguous."""
    try:
        mv = memoryview(buf)
    except TypeError:
        raise InvalidRingMemory(
            f"a ring needs a writable bytes-like buffer, not {type(buf).__name__}") from None
    if mv.readonly:
        mv.release()
        raise InvalidRingMemory("a ring's memory must be writable")
    if not mv.c_contiguous:
        mv.release()
        raise InvalidRingMemory("a ring's memory must be contiguous")
    if mv.format != "B" or mv.ndim != 1:
        flat = mv.cast("B")
        mv.release()
        mv = flat
    return mv


def _address(mv: memoryview) -> int:
    if mv.nbytes == 0:
        return 0
    probe = ctypes.c_char.from_buffer(mv)
    try:
        return ctypes.addressof(probe)
    finally:
        del probe


def _error(code: int, what: str, *, size: int = 0, capacity: int = 0, version: int = 0,
           bad_magic: bool = False) -> RingError:
    """The exception for a failed status ``code`` (shared by both implementations)."""
    if code == _BAD_ALIGN:
        return InvalidRingMemory(f"{what}: the memory is not {ALIGN}-byte aligned")
    if code == _BAD_SIZE:
        if capacity:
            return InvalidRingMemory(
                f"{what}: the ring's capacity of {capacity} bytes does not fit in {size} bytes")
        return InvalidRingMemory(f"{what}: {size} bytes of memory is too small; a ring needs at "
                                 f"least {HEADER_SIZE + MIN_CAPACITY}")
    if code == _BAD_VERSION:
        return RingCorrupt(f"{what}: the ring has format version {version}, this zipcomm reads "
                           f"version {VERSION}")
    if code == _CORRUPT:
        if bad_magic:
            return RingCorrupt(f"{what}: no ring in this memory (bad magic number)")
        return RingCorrupt(f"{what}: the ring's memory is corrupt (header, positions or records)")
    if code == _CLOSED:
        return RingClosed(f"{what}: the ring is closed")
    return RingError(f"{what}: unexpected ring status {code}")


def _payload(data: Any) -> memoryview:
    try:
        mv = memoryview(data)
        if mv.format != "B" or mv.ndim != 1:
            mv = mv.cast("B")
    except (TypeError, ValueError, BufferError):
        raise TypeError(
            f"a ring record must be a contiguous bytes-like object, not {type(data).__name__}"
        ) from None
    return mv


_R = TypeVar("_R")
_SPIN = 64  # polls without sleeping before the backoff starts
_MIN_SLEEP, _MAX_SLEEP = 10e-6, 1e-3


def _poll(attempt: Callable[[], _R | None], timeout: float | None) -> _R | None:
    """Call ``attempt`` until it returns something else than None, or the deadline passes:
    spin first, then sleep with exponential backoff (10 µs .. 1 ms)."""
    result = attempt()
    if result is not None:
        return result
    deadline = None if timeout is None else time.monotonic() + timeout
    polls, delay = 0, _MIN_SLEEP
    while True:
        polls += 1
        if polls > _SPIN:
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                return attempt()
            time.sleep(delay if deadline is None else min(delay, max(deadline - now, 0.0)))
            delay = min(delay * 2, _MAX_SLEEP)
        elif deadline is not None and polls % 16 == 0 and time.monotonic() >= deadline:
            return attempt()
        result = attempt()
        if result is not None:
            return result


class _RingBase(ABC):
    """The interface and the waiting logic common to both implementations."""

    implementation: str = ""
    _capacity: int
    _max_record: int

    @classmethod
    def create(cls, buf: Any) -> Self:
        """Format ``buf`` (a writable, 8-byte aligned buffer of at least
        ``HEADER_SIZE + MIN_CAPACITY`` bytes) as an empty ring using all of it; the data area
        is not cleared.  Raises :class:`InvalidRingMemory`."""
        return cls(buf, create=True)

    @classmethod
    def attach(cls, buf: Any) -> Self:
        """Use the ring that ``create`` made in ``buf`` (maybe in another process or by the
        other implementation).  Raises :class:`RingCorrupt` for memory without a valid ring and
        :class:`InvalidRingMemory` for unusable memory."""
        return cls(buf, create=False)

    @property
    def capacity(self) -> int:
        """Bytes in the data area."""
        return self._capacity

    @property
    def max_record(self) -> int:
        """The largest record :meth:`push` accepts (about half the capacity)."""
        return self._max_record

    @property
    def used(self) -> int:
        """Bytes in use, record headers, padding and skip markers included."""
        used = self._used()
        if used > self._capacity:
            raise _error(_CORRUPT, "used")
        return used

    @property
    def free(self) -> int:
        """``capacity - used``: free bytes (a record needs 8 bytes more than its payload, and
        may need the rest of the data area when it wraps)."""
        return self._capacity - self.used

    @property
    @abstractmethod
    def closed(self) -> bool:
        """True once :meth:`close` was called."""

    @abstractmethod
    def push(self, data: Any) -> bool:
        """Append one record (any contiguous bytes-like object); False if the ring is too full
        now.  Raises :class:`RecordTooLarge` beyond :attr:`max_record`."""

    @abstractmethod
    def pop(self) -> bytes | None:
        """Remove and return the next record, or None if the ring is empty."""

    @abstractmethod
    def pop_into(self, buf: Any) -> int | None:
        """Move the next record into the start of the writable buffer ``buf``; return its length,
        or None if the ring is empty.  Raises :class:`BufferTooSmall` (record kept)."""

    @abstractmethod
    def peek_len(self) -> int | None:
        """Length of the next record, or None if the ring is empty."""

    @abstractmethod
    def close(self) -> None:
        """Release the memory (idempotent); needed before ``SharedMemory.close()``."""

    @abstractmethod
    def _used(self) -> int:
        """Bytes in use, from a consistent snapshot of head and tail (unchecked)."""

    def push_wait(self, data: Any, timeout: float | None = None) -> None:
        """:meth:`push`, polling with backoff while the ring is full; raises :class:`RingFull`
        if it is still too full after ``timeout`` seconds (None: wait forever)."""
        if _poll(lambda: True if self.push(data) else None, timeout) is None:
            raise RingFull(f"the ring stayed too full for a record of {memoryview(data).nbytes} "
                           f"bytes for {timeout} s")

    def pop_wait(self, timeout: float | None = None) -> bytes:
        """:meth:`pop`, polling with backoff while the ring is empty; raises :class:`RingEmpty`
        if it is still empty after ``timeout`` seconds (None: wait forever)."""
        record = _poll(self.pop, timeout)
        if record is None:
            raise RingEmpty(f"the ring stayed empty for {timeout} s")
        return record

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        if self.closed:
            return f"<{type(self).__name__} closed>"
        return (f"<{type(self).__name__} capacity={self._capacity} used={self._used()} "
                f"max_record={self._max_record}>")


class PyRing(_RingBase):
    """The pure-Python twin of the C ring: same layout, same behaviour, same errors."""

    implementation = "python"

    def __init__(self, buf: Any, *, create: bool) -> None:
        what = "create" if create else "attach"
        mv = _bytes_view(buf)
        try:
            size = mv.nbytes
            if _address(mv) % ALIGN:
                raise _error(_BAD_ALIGN, what)
            if size < HEADER_SIZE + MIN_CAPACITY:
                raise _error(_BAD_SIZE, what, size=size)
            words = mv[:HEADER_SIZE].cast("Q")
            try:
                if create:
                    capacity = (size - HEADER_SIZE) & ~7
                    words[_W_MAGIC] = 0
                    mv[8:HEADER_SIZE] = bytes(HEADER_SIZE - 8)
                    _VERSION_WORDS.pack_into(mv, 8, VERSION, HEADER_SIZE)
                    words[_W_CAPACITY] = capacity
                    words[_W_MAGIC] = MAGIC  # last: the header is complete
                else:
                    capacity = self._check_header(words, mv, size, what)
            except BaseException:
                words.release()
                raise
        except BaseException:
            mv.release()
            raise
        self._mv: memoryview | None = mv
        self._words: memoryview | None = words
        self._data: memoryview | None = mv[HEADER_SIZE:HEADER_SIZE + capacity]
        self._capacity = capacity
        self._max_record = max_record_for(capacity)

    @staticmethod
    def _check_header(words: memoryview, mv: memoryview, size: int, what: str) -> int:
        if words[_W_MAGIC] != MAGIC:
            raise _error(_CORRUPT, what, bad_magic=True)
        version, header_size = _VERSION_WORDS.unpack_from(mv, 8)
        if version != VERSION:
            raise _error(_BAD_VERSION, what, version=version)
        capacity = words[_W_CAPACITY]
        if header_size != HEADER_SIZE or capacity < MIN_CAPACITY or capacity % ALIGN:
            raise _error(_CORRUPT, what)
        if capacity > size - HEADER_SIZE:
            raise _error(_BAD_SIZE, what, size=size, capacity=capacity)
        head, tail = words[_W_HEAD], words[_W_TAIL]
        if (head | tail) % ALIGN or (head - tail) & _MASK64 > capacity:
            raise _error(_CORRUPT, what)
        return capacity

    @property
    def closed(self) -> bool:
        return self._words is None

    def _live(self, what: str) -> tuple[memoryview, memoryview]:
        words, data = self._words, self._data
        if words is None or data is None:
            raise _error(_CLOSED, what)
        return words, data

    def push(self, data: Any) -> bool:
        words, ring = self._live("push")
        payload = _payload(data)
        n = payload.nbytes
        if n > self._max_record:
            raise RecordTooLarge(n, self._max_record)
        cap = self._capacity
        need = RECORD_HEADER + ((n + 7) & ~7)
        head = words[_W_HEAD]
        tail = words[_W_TAIL]
        used = (head - tail) & _MASK64
        if (head | tail) % ALIGN or used > cap:
            raise _error(_CORRUPT, "push")
        free = cap - used
        off = head % cap
        contig = cap - off
        if need <= contig:
            if need > free:
                return False
            at, advance = off, need
        else:
            if contig + need > free:
                return False
            _RECORD.pack_into(ring, off, SKIP, 0)
            at, advance = 0, contig + need
        _RECORD.pack_into(ring, at, n, 0)
        ring[at + RECORD_HEADER:at + RECORD_HEADER + n] = payload
        words[_W_HEAD] = (head + advance) & _MASK64  # publish, after the record is written
        return True

    def _next(self, what: str) -> tuple[int, int, int] | None:
        """(payload offset, length, new tail) of the next record, or None if empty."""
        words, ring = self._live(what)
        cap = self._capacity
        tail = words[_W_TAIL]
        head = words[_W_HEAD]
        if head == tail:
            return None
        used = (head - tail) & _MASK64
        if (head | tail) % ALIGN or used > cap:
            raise _error(_CORRUPT, what)
        off = tail % cap
        skip = 0
        n = _RECORD.unpack_from(ring, off)[0]
        if n == SKIP:
            skip = cap - off
            if skip >= used:
                raise _error(_CORRUPT, what)
            off = 0
            n = _RECORD.unpack_from(ring, 0)[0]
        need = RECORD_HEADER + ((n + 7) & ~7)
        if n > self._max_record or need > used - skip or need > cap - off:
            raise _error(_CORRUPT, what)
        return off + RECORD_HEADER, n, (tail + skip + need) & _MASK64

    def pop(self) -> bytes | None:
        found = self._next("pop")
        if found is None:
            return None
        at, n, new_tail = found
        record = bytes(self._data[at:at + n])  # type: ignore[index]
        self._words[_W_TAIL] = new_tail  # type: ignore[index]  # publish, after the copy
        return record

    def pop_into(self, buf: Any) -> int | None:
        out = _payload(buf)
        if out.readonly:
            raise TypeError("pop_into() needs a writable buffer")
        found = self._next("pop_into")
        if found is None:
            return None
        at, n, new_tail = found
        if n > out.nbytes:
            raise BufferTooSmall(n, out.nbytes)
        out[:n] = self._data[at:at + n]  # type: ignore[index]
        self._words[_W_TAIL] = new_tail  # type: ignore[index]
        return n

    def peek_len(self) -> int | None:
        found = self._next("peek_len")
        return None if found is None else found[1]

    def _used(self) -> int:
        words, _ = self._live("used")
        head = words[_W_HEAD]
        while True:  # a consistent snapshot: head did not move while tail was read
            tail = words[_W_TAIL]
            again = words[_W_HEAD]
            if again == head:
                return (head - tail) & _MASK64
            head = again

    def close(self) -> None:
        for view in (self._data, self._words, self._mv):
            if view is not None:
                view.release()
        self._data = self._words = self._mv = None


class CRing(_RingBase):
    """The C ring (``csrc/ring.c``) through the cffi extension ``zipcomm._ring_c``."""

    implementation = "c"
    _SCRATCH = 4096  # initial size of the buffer pop() copies records through

    def __init__(self, buf: Any, *, create: bool) -> None:
        if _ring_c is None:
            raise ImportError(f"{_C_MISSING}; build it with `pip install -e .`")
        ffi, lib = _ring_c.ffi, _ring_c.lib
        what = "create" if create else "attach"
        mv = _bytes_view(buf)
        try:
            mem = ffi.from_buffer(mv, require_writable=True)
        except BaseException:
            mv.release()
            raise
        handle = ffi.new("ring_t *")
        size = mv.nbytes
        rc = (lib.ring_init if create else lib.ring_attach)(handle, mem, size)
        if rc != _OK:
            error = self._init_error(rc, what, mv)
            ffi.release(mem)
            mv.release()
            raise error
        self._ffi, self._lib = ffi, lib
        self._mv: memoryview | None = mv
        self._mem = mem
        self._r = handle
        self._len = ffi.new("uint32_t *")
        self._scratch_size = min(self._SCRATCH, int(handle.max_record))
        self._scratch = ffi.new("char[]", self._scratch_size)  # pop() copies records via this
        self._capacity = int(handle.capacity)
        self._max_record = int(handle.max_record)

    @staticmethod
    def _init_error(rc: int, what: str, mv: memoryview) -> RingError:
        size, details = mv.nbytes, {}
        if size >= HEADER_SIZE:
            magic, version, capacity = struct.unpack_from("=QI4xQ", mv, 0)
            details = {_BAD_VERSION: {"version": version}, _BAD_SIZE: {"capacity": capacity},
                       _CORRUPT: {"bad_magic": magic != MAGIC}}.get(rc, {})
        return _error(rc, what, size=size, **details)

    @property
    def closed(self) -> bool:
        return self._mv is None

    def push(self, data: Any) -> bool:
        if type(data) is bytes:  # passed to C as it is
            n, rc = len(data), self._lib.ring_push_bytes(self._r, data, min(len(data), SKIP))
        else:
            try:
                src = self._ffi.from_buffer(data)
            except (TypeError, ValueError, BufferError):
                _payload(data)  # raises the same TypeError as the Python twin
                raise
            n = len(src)
            rc = self._lib.ring_push(self._r, src, min(n, SKIP))
        if rc == _OK:
            return True
        if rc == _FULL:
            return False
        if rc == _TOO_BIG:
            raise RecordTooLarge(n, self._max_record)
        raise _error(rc, "push")

    def pop(self) -> bytes | None:
        scratch, size = self._scratch, self._scratch_size
        rc = self._lib.ring_pop(self._r, scratch, size, self._len)
        if rc == _SMALL_BUFFER:  # grow the scratch buffer (up to max_record) and try again
            size = min(max(self._len[0], 2 * size), self._max_record)
            scratch = self._scratch = self._ffi.new("char[]", size)
            self._scratch_size = size
            rc = self._lib.ring_pop(self._r, scratch, size, self._len)
        if rc == _OK:
            return self._ffi.unpack(scratch, self._len[0])
        if rc == _EMPTY:
            return None
        raise _error(rc, "pop")

    def pop_into(self, buf: Any) -> int | None:
        try:
            out = self._ffi.from_buffer(buf, require_writable=True)
        except (TypeError, ValueError, BufferError):
            if _payload(buf).readonly:
                raise TypeError("pop_into() needs a writable buffer") from None
            raise
        rc = self._lib.ring_pop(self._r, out, len(out), self._len)
        if rc == _OK:
            return self._len[0]
        if rc == _EMPTY:
            return None
        if rc == _SMALL_BUFFER:
            raise BufferTooSmall(self._len[0], len(out))
        raise _error(rc, "pop_into")

    def peek_len(self) -> int | None:
        rc = self._lib.ring_peek_len(self._r, self._len)
        if rc == _OK:
            return self._len[0]
        if rc == _EMPTY:
            return None
        raise _error(rc, "peek_len")

    def _used(self) -> int:
        if self._mv is None:
            raise _error(_CLOSED, "used")
        return int(self._lib.ring_used(self._r))

    def close(self) -> None:
        if self._mv is None:
            return
        self._lib.ring_close(self._r)
        self._ffi.release(self._mem)
        self._mv.release()
        self._mv = None


def _select() -> type[_RingBase]:
    choice = os.environ.get("ZIPCOMM_RING", "").strip().lower()
    if choice == "python":
        return PyRing
    if choice not in ("", "c"):
        raise ImportError(f"ZIPCOMM_RING={os.environ['ZIPCOMM_RING']!r}: expected 'c' or 'python'")
    if _ring_c is not None:
        return CRing
    if choice == "c":
        raise ImportError(f"ZIPCOMM_RING=c but {_C_MISSING}; build it with `pip install -e .` "
                          f"(a C compiler and cffi are needed) or set ZIPCOMM_RING=python")
    return PyRing


#: The ring implementation selected by ``ZIPCOMM_RING`` (:class:`CRing` or :class:`PyRing`).
Ring: type[_RingBase] = _select()


def implementation() -> str:
    """The name of the selected implementation: ``"c"`` or ``"python"``."""
    return Ring.implementation
