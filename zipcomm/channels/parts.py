"""Large arrays as parts: split at the root (or a sender), received in place, assembled.

A published array at least twice ``CHUNK_BYTES`` travels down the tree as parts of that size,
each its own stream item of kind ``"p"``: a node forwards a part as soon as it has it, so the
transfer is pipelined through the tree instead of stored and forwarded whole at every level.
The first part's meta names the whole item (``k`` its kind, ``m`` its meta, ``dt`` / ``sh`` the
array's dtype and shape, ``n`` the number of parts); the others carry ``i`` and ``n``. The
parts of one item are consecutive in the stream; the whole item is delivered with the last
part's key and the first part's ``prev``.

:class:`Assembler` is one channel member's receiving side: ``place`` names where a part's
bytes go as its frame header arrives (straight into the whole array, from the runtime's buffer
pool), ``add`` takes parts in stream order and returns the whole item once complete.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..buffers import BufferPool
from ..protocol import messages as m
from ..protocol.frames import _parse_dtype
from ..protocol.limits import DEFAULT_LIMITS

log = logging.getLogger("zipcomm.channels")

Key = tuple[int, int]

CHUNK_BYTES = int(os.environ.get("ZIPCOMM_CHUNK_BYTES", 4 << 20))  # (small values: for fault tests)
if CHUNK_BYTES < 1024:
    raise ValueError(f"ZIPCOMM_CHUNK_BYTES must be at least 1024, got {CHUNK_BYTES}")


def array_spec(dt: object, shape: object) -> tuple[np.dtype, tuple] | None:
    """The dtype and shape a peer announced for a large array sent as parts, or None if they
    are malformed (a dtype string as the frame codec accepts, a list of at most 64 sizes) or
    larger than a frame may carry."""
    dtype = _parse_dtype(dt) if type(dt) is str else None
    if dtype is None or type(shape) is not list or len(shape) > 64 or not all(type(x) is int and x >= 0 for x in shape):
        return None
    if dtype.itemsize * math.prod(shape) > DEFAULT_LIMITS.max_buffers:
        return None
    return dtype, tuple(shape)


def splittable(data: Any, chunk: int) -> bool:
    """Whether ``data`` travels as parts of ``chunk`` bytes (0: never)."""
    return bool(chunk) and type(data) is np.ndarray and data.nbytes >= 2 * chunk and data.flags.c_contiguous \
        and not data.dtype.hasobject


def split(data: np.ndarray, chunk: int) -> tuple[list, list[np.ndarray]]:
    """``data``'s spec ([dtype str, shape]) and its bytes as parts of ``chunk`` bytes (views)."""
    flat = data.reshape(-1).view(np.uint8)
    n = -(-flat.nbytes // chunk)
    return [data.dtype.str, list(data.shape)], [flat[i * chunk:(i + 1) * chunk] for i in range(n)]


def spans(item: m.Item) -> bool:
    """Whether ``item`` stands for several consecutive stream keys (a large item as one, as a
    host daemon feeds it to its members): keys within a term follow each other, and the first
    key of a term is 1."""
    (pt, pn), (kt, kn) = item.prev, item.key
    return kn != (pn + 1 if pt == kt else 1)


# What Filling.put says of a part
MORE, DONE, SKIP, BAD = "more", "done", "skip", "bad"


@dataclass(slots=True, kw_only=True)
class Filling:
    """An array being filled from its parts, in order."""

    n: int
    dtype: np.dtype
    shape: tuple
    buf: np.ndarray  # flat uint8, the whole array's bytes
    next_i: int = 0  # the next part and where it goes
    offset: int = 0

    def put(self, i: int, n: int, data: np.ndarray, copy: bool = True) -> str:
        """Part ``i`` of ``n``: MORE (more parts are due), DONE (it was the last), SKIP (it does
        not continue this array: another index or count) or BAD (the sizes do not add up)."""
        if i != self.next_i or n != self.n:
            return SKIP
        end = self.offset + data.nbytes
        if end > self.buf.nbytes or (i == n - 1 and end != self.buf.nbytes):
            return BAD
        if copy:
            self.buf[self.offset:end] = data
        self.offset, self.next_i = end, i + 1
        return DONE if self.next_i == n else MORE

    @property
    def value(self) -> np.ndarray:
        return self.buf.view(self.dtype).reshape(self.shape)


@dataclass(slots=True, kw_only=True)
class _Assembly(Filling):
    """One large item being received as parts (``next_i`` / ``offset``: delivery)."""

    first: Key  # the key of the first part
    prev: Key  # the key before the first part: the whole item's ``prev``
    kind: str
    meta: dict
    own: bool  # the root's own array: its parts need no copy
    place_i: int = 0  # reception: the next part received in place, its key and offset
    place_key: Key = (0, 0)
    place_offset: int = 0


class Assembler:
    """The parts of large items one member receives (see the module's docstring)."""

    def __init__(self, channel: str, pool: BufferPool) -> None:
        self.channel = channel
        self.pool = pool
        self.delivering: _Assembly | None = None  # the parts delivered
        self.placing: _Assembly | None = None  # the parts received in place (ahead of delivery)
        # Root: the arrays published as parts, by the key of their first part: their own
        # memory is the whole item (no copy).
        self.whole: dict[Key, np.ndarray] = {}

    def drop(self) -> None:
        """What is delivered next is not a part that continues the item being assembled."""
        self.delivering = None

    def add(self, part: m.Item) -> m.Item | None:
        """Add one part, delivered in stream order; the whole item once its last part is here.
        Parts that do not continue what we have (we joined after the first part, or a new root
        re-publishes the item from its start) drop the partial item: each stream position is
        delivered once either way."""
        meta = part.meta
        i, n, data = meta.get("i"), meta.get("n"), part.data
        if type(i) is not int or type(n) is not int or not isinstance(data, np.ndarray) or data.dtype != np.uint8:
            log.error("channel %s: malformed part at %s; dropped", self.channel, part.key)
            self.delivering = None
            return None
        if i == 0:
            key = tuple(part.key)
            if self.placing is not None and self.placing.first == key:
                self.delivering = self.placing  # its parts are being received in place
            else:
                self.delivering = self._start(key, tuple(part.prev), meta)  # type: ignore[arg-type]
        asm = self.delivering
        if asm is None:
            return None
        start = asm.offset
        in_place = asm.own or data.ctypes.data == asm.buf.ctypes.data + start
        got = asm.put(i, n, data, copy=not in_place)
        if got in (SKIP, BAD):
            if got is BAD:
                log.error("channel %s: parts at %s do not add up to the item's size; dropped", self.channel,
                          part.key)
            self.delivering = None
            return None
        if not in_place:
            part.data = asm.buf[start:asm.offset]  # the history serves it from the whole item: one copy held
        if got is MORE:
            return None
        self.delivering = None
        if self.placing is asm:
            self.placing = None
        return m.Item(channel=self.channel, key=list(part.key), prev=list(asm.prev), kind=asm.kind, meta=asm.meta,
                      data=asm.value)

    def place(self, header: dict, descriptors: list, last_key: Key) -> list | None:
        """As a peer frame's header arrives, before its body: if it is the next part of the large
        item being received, its bytes go straight into their place in the whole item's array
        (no copy, no fresh memory). None: receive it into a new array."""
        if len(descriptors) != 1 or descriptors[0][0] != "nd" or descriptors[0][1] != np.uint8:
            return None
        meta, key, prev = header.get("meta"), header.get("key"), header.get("prev")
        if type(meta) is not dict or type(key) is not list or type(prev) is not list or len(key) != 2 \
                or len(prev) != 2 or not all(type(x) is int for x in key + prev):
            return None
        i, size, key = meta.get("i"), descriptors[0][3], tuple(key)
        if i == 0:
            if key <= last_key or any(a is not None and a.first == key for a in (self.delivering, self.placing)):
                return None
            asm = self._start(key, tuple(prev), meta)  # type: ignore[arg-type]
            if asm is None or asm.own:
                return None
            self.placing = asm
        else:
            asm = self.placing
            if asm is None or i != asm.place_i or key != asm.place_key:
                return None
        end = asm.place_offset + size
        if end > asm.buf.nbytes:
            return None
        view = asm.buf[asm.place_offset:end]
        asm.place_i, asm.place_offset, asm.place_key = asm.place_i + 1, end, (key[0], key[1] + 1)
        return [view]

    def _start(self, key: Key, prev: Key, meta: dict) -> _Assembly | None:
        whole = self.whole.pop(key, None)
        for old in [k for k in self.whole if k < key]:
            del self.whole[old]
        kind, inner, n = meta.get("k"), meta.get("m"), meta.get("n")
        spec = array_spec(meta.get("dt"), meta.get("sh"))
        if type(kind) is not str or kind == "p" or type(inner) is not dict or type(n) is not int or n < 1 or not spec:
            log.error("channel %s: malformed first part at %s; dropped", self.channel, key)
            return None
        dtype, shape = spec
        nbytes = dtype.itemsize * math.prod(shape)
        if whole is not None and whole.nbytes == nbytes:
            buf, own = whole.reshape(-1).view(np.uint8), True
        else:
            buf, own = self.pool.take(nbytes), False  # (flat uint8)
        return _Assembly(first=key, prev=prev, kind=kind, meta=inner, n=n, dtype=dtype, shape=shape,
                         buf=buf, own=own, place_key=key)
