"""The frame codec, sans-IO: bytes in, frames out; frames in, buffers out.

A frame is::

    prefix (20 bytes, see limits.PREFIX) | msgpack header | buffer 0 | buffer 1 | ...

The header is a map with a str ``"op"``; when the frame carries raw buffers it
also holds their descriptors under ``"bufs"``: ``["nd", dtype_str, shape,
nbytes]`` for a numpy array, ``["b", nbytes]`` for bytes.  Buffers travel as
raw bytes so that numpy data is neither pickled nor copied: the encoder hands
out memoryviews of the arrays themselves and the decoder receives straight
into the ``np.empty`` arrays it returns.
"""

from __future__ import annotations

import math
import re
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache

import msgpack
import numpy as np

from ..errors import FrameTooLarge, LocalProtocolError, RemoteProtocolError, UnsupportedPayload
from .limits import DEFAULT_LIMITS, KNOWN_FLAGS, MAGIC, PREFIX, PREFIX_SIZE, VERSION, Limits

__all__ = ["Frame", "FrameDecoder", "encode_frame", "encode_control_frame", "array_problem", "WINDOW_SIZE"]

# Big enough that a burst of small frames is parsed from one receive call,
# small enough to stay cache-resident.
WINDOW_SIZE = 64 * 1024

# Compacting the window costs a copy of the unparsed tail, so it only happens
# once the free space has become too small to be worth offering as is.
_COMPACT_BELOW = WINDOW_SIZE // 4

_MAX_NDIM = 64  # numpy's own limit; a larger shape cannot be allocated anyway

# Exactly the shape of ``dtype.str`` for the dtypes we send.  Anything else
# (object, structured, subarray dtypes) never reaches np.dtype(), whose string
# parser accepts far more than we want a peer to exercise.
_DTYPE_RE = re.compile(r"[<>|=][biufcmMSUV][0-9]{1,10}(?:\[[0-9]{0,6}[A-Za-z]{1,2}\])?")


@dataclass(slots=True)
class Frame:
    """One decoded frame: the header (without ``"bufs"``) and its buffers."""

    header: dict
    buffers: list[np.ndarray | bytearray] = field(default_factory=list)

    @property
    def op(self) -> str:
        return self.header["op"]


# --- encoding ---------------------------------------------------------------


def encode_frame(
    header: dict,
    buffers: Sequence[np.ndarray | bytes | bytearray | memoryview] = (),
    limits: Limits = DEFAULT_LIMITS,
) -> list[bytes | memoryview]:
    """Encode one frame as pieces for ``transport.writelines()``.

    The first piece is prefix + header; each non-empty buffer follows as a
    memoryview of the caller's memory, so the caller must not modify the
    buffers until the transport has sent them.  ``"bufs"`` is added to a copy
    of ``header`` only when there are buffers, to keep control frames lean.
    """
    if not buffers:
        return [encode_control_frame(header, limits)]
    if not isinstance(header, dict) or type(header.get("op")) is not str:
        raise LocalProtocolError(f"a frame header must be a dict with a str 'op', got {header!r:.200}")
    if "bufs" in header:
        raise LocalProtocolError("header key 'bufs' is reserved for the buffer descriptors")
    if len(buffers) > limits.max_buffer_count:
        raise LocalProtocolError(f"{len(buffers)} buffers exceed the limit of {limits.max_buffer_count}")
    described = [_describe(buffer, index) for index, buffer in enumerate(buffers)]
    total = sum(view.nbytes for _, view in described)
    if total > limits.max_buffers:
        raise LocalProtocolError(f"frame buffers of {total} bytes exceed the limit of {limits.max_buffers} bytes")
    views = [view for _, view in described if view.nbytes]
    header = {**header, "bufs": [descriptor for descriptor, _ in described]}
    return [_prefixed_header(header, total, limits), *views]


def encode_control_frame(header: dict, limits: Limits = DEFAULT_LIMITS) -> bytes:
    """A frame without buffers as one ``bytes`` (what ``encode_frame(header)`` returns as its only piece)."""
    if not isinstance(header, dict) or type(header.get("op")) is not str:
        raise LocalProtocolError(f"a frame header must be a dict with a str 'op', got {header!r:.200}")
    if "bufs" in header:
        raise LocalProtocolError("header key 'bufs' is reserved for the buffer descriptors")
    return _prefixed_header(header, 0, limits)


# One msgpack Packer per thread, reused: msgpack.packb() builds a Packer (and mallocs its 256 KiB
# buffer) on every call, which cost more than packing a control frame's header. A Packer is not
# thread-safe, hence one per thread; packing plain data runs no Python code, so it is not re-entered.
_packers = threading.local()


def _prefixed_header(header: dict, buffers_len: int, limits: Limits) -> bytes:
    """Prefix + msgpack header of a checked ``header``."""
    try:
        pack = _packers.pack
    except AttributeError:
        pack = _packers.pack = msgpack.Packer().pack
    try:
        packed = pack(header)
    except (TypeError, ValueError, OverflowError) as exc:
        raise LocalProtocolError(f"cannot encode the header of op {header['op']!r}: {exc}") from exc
    n = len(packed)
    if n > limits.max_header:
        raise LocalProtocolError(
            f"header of op {header['op']!r} is {n} bytes, over the limit of {limits.max_header} bytes"
        )
    return _pack_prefix(MAGIC, VERSION, 0, 0, n, buffers_len) + packed


_pack_prefix = PREFIX.pack
_unpack_prefix = PREFIX.unpack_from


def array_problem(array: np.ndarray) -> str | None:
    """Why ``array`` cannot travel as a raw buffer, or None if it can."""
    if isinstance(array, np.ma.MaskedArray):
        return "masked arrays cannot be sent (the mask would be lost); send .data and .mask"
    dtype = array.dtype
    if dtype.hasobject:
        return f"arrays of dtype {dtype} hold Python objects and cannot be sent (nothing is pickled)"
    if _parse_dtype(dtype.str) != dtype:
        return f"arrays of dtype {dtype} cannot be sent (structured, subarray and empty dtypes are not supported)"
    return None


def _describe(buffer: object, index: int) -> tuple[list, memoryview]:
    if isinstance(buffer, np.ndarray):
        problem = array_problem(buffer)
        if problem:
            raise UnsupportedPayload(f"buffers[{index}]: {problem}")
        # ascontiguousarray copies only arrays that are not C-contiguous, and
        # drops subclasses (np.matrix would reshape to 2-D).  A uint8 view
        # rather than memoryview.cast() because datetime64 has no buffer format.
        view = memoryview(np.ascontiguousarray(buffer).reshape(-1).view(np.uint8))
        return ["nd", buffer.dtype.str, list(buffer.shape), view.nbytes], view
    if isinstance(buffer, (bytes, bytearray, memoryview)):
        view = memoryview(buffer)
        if not view.c_contiguous:
            view = memoryview(view.tobytes())
        if view.ndim != 1 or view.format != "B":
            view = view.cast("B")
        return ["b", view.nbytes], view
    raise UnsupportedPayload(
        f"buffers[{index}]: cannot send a buffer of type {type(buffer).__name__}; "
        "allowed: numpy arrays, bytes, bytearray, memoryview"
    )


@lru_cache(maxsize=256)
def _parse_dtype(text: str) -> np.dtype | None:
    """The dtype a receiver builds from ``text``, or None if it refuses it."""
    if len(text) > 24 or not _DTYPE_RE.fullmatch(text):
        return None
    try:
        dtype = np.dtype(text)
    except (TypeError, ValueError):
        return None
    return dtype if dtype.itemsize else None


# --- decoding ---------------------------------------------------------------

_PREFIX_STATE = "prefix"  # waiting for a prefix in the window
_HEADER_STATE = "header"  # waiting for a header that fits the window
_BIG_HEADER_STATE = "big-header"  # receiving a header larger than the window into its own buffer
_BODY_STATE = "body"  # filling the current frame's buffers


class FrameDecoder:
    """Incremental frame decoder shaped for ``asyncio.BufferedProtocol``.

    ``get_buffer()`` says where the next received bytes must be written and
    ``buffer_updated(n)`` returns the frames they completed.  Prefixes and
    headers land in a 64 KiB window, so a burst of small frames costs one call;
    buffer bodies land straight in the arrays the frame will hold, so large
    payloads are never copied.  Only body bytes that arrived in the window with
    their header are copied out of it: at most one window per frame.

    Every limit is checked before anything is allocated.  After an error the
    decoder is poisoned (the stream position is lost): every later call raises
    the same error.  Frames completed earlier in the failing call are dropped;
    the connection is being closed anyway.
    """

    def __init__(self, limits: Limits = DEFAULT_LIMITS) -> None:
        self._limits = limits
        self._caps = _caps_for(limits)
        self._window = memoryview(bytearray(WINDOW_SIZE))
        self._start = 0  # first unparsed byte in the window
        self._end = 0  # one past the last received byte in the window
        self._state = _PREFIX_STATE
        self._header_len = 0
        self._buffers_len = 0
        self._frame: Frame | None = None
        self._views: list[memoryview] = []  # flat byte views of the frame's non-empty buffers
        self._view_index = 0
        # While set, bytes are received straight into it rather than into the
        # window: a header larger than the window, or the current buffer body.
        self._target: memoryview | None = None
        self._filled = 0  # bytes already in the big header or the current buffer
        self._error: BaseException | None = None
        # Optional: ``placer(header, descriptors)`` may name the arrays a frame's buffers are
        # received into (e.g. a region of a larger array being assembled) instead of new ones;
        # it returns None to decline. Arrays that do not match the descriptors are not used.
        self.placer: Callable[[dict, list], list | None] | None = None

    @property
    def at_boundary(self) -> bool:
        """True when no partial frame is buffered (an EOF here is clean)."""
        return self._state is _PREFIX_STATE and self._start == self._end

    def get_buffer(self, sizehint: int = -1) -> memoryview:
        self._raise_if_poisoned()
        if self._target is not None:
            return self._target[self._filled :]
        if self._start == self._end:
            self._start = self._end = 0
        elif self._start and WINDOW_SIZE - self._end < _COMPACT_BELOW:
            pending = self._end - self._start
            # bytes() because source and destination may overlap.
            self._window[:pending] = bytes(self._window[self._start : self._end])
            self._start, self._end = 0, pending
        return self._window[self._end :]

    def buffer_updated(self, nbytes: int) -> list[Frame]:
        self._raise_if_poisoned()
        target = self._target
        room = WINDOW_SIZE - self._end if target is None else len(target) - self._filled
        if not 0 <= nbytes <= room:
            raise ValueError(f"buffer_updated({nbytes}) overflows the {room} bytes handed out by get_buffer()")
        try:
            if target is None:
                self._end += nbytes
            else:
                self._filled += nbytes
                if self._filled < len(target):
                    return []
                self._target_full()
            return self._parse_window()
        except BaseException as exc:
            self._error = exc
            raise

    def feed(self, data: bytes | bytearray | memoryview) -> list[Frame]:
        """Decode ``data`` through get_buffer/buffer_updated (for tests and simple callers)."""
        self._raise_if_poisoned()
        source = memoryview(data).cast("B")
        frames: list[Frame] = []
        offset = 0
        while offset < len(source):
            target = self.get_buffer(len(source) - offset)
            n = min(len(target), len(source) - offset)
            target[:n] = source[offset : offset + n]
            offset += n
            frames += self.buffer_updated(n)
        return frames

    # -- internals ------------------------------------------------------------

    def _raise_if_poisoned(self) -> None:
        if self._error is not None:
            raise self._error.with_traceback(None)

    def _parse_window(self) -> list[Frame]:
        frames: list[Frame] = []
        while self._target is None:
            available = self._end - self._start
            if self._state is _PREFIX_STATE:
                if available >= PREFIX_SIZE:
                    self._parse_small_frames(frames)
                    available = self._end - self._start
                if available < PREFIX_SIZE:
                    break
                self._parse_prefix()
            elif self._state is _HEADER_STATE:
                if available < self._header_len:
                    break
                self._start += self._header_len
                self._begin_frame(self._window[self._start - self._header_len : self._start])
            elif self._copy_window_into_body():
                frames.append(self._finish_frame())
            else:  # the window is drained; the rest of the body arrives directly
                self._target = self._views[self._view_index]
        if self._start == self._end:
            self._start = self._end = 0
        return frames

    def _parse_small_frames(self, frames: list[Frame]) -> None:
        """The fast path of a burst of control frames: decode every frame that lies whole in the
        window and carries no buffer bytes, in one loop. It stops at anything else (a frame still
        arriving, one with buffers, a prefix to refuse), which the general path then handles
        from the same position, so every check and error stays the general path's."""
        window, start, end = self._window, self._start, self._end
        limits, caps = self._limits, self._caps
        max_header = limits.max_header
        try:
            while end - start >= PREFIX_SIZE:
                magic, version, flags, reserved, header_len, buffers_len = _unpack_prefix(window, start)
                stop = start + PREFIX_SIZE + header_len
                if (buffers_len or stop > end or magic != MAGIC or version != VERSION or flags & ~KNOWN_FLAGS
                        or reserved or header_len > max_header):
                    break
                header, descriptors = _decode_header(window[start + PREFIX_SIZE : stop], 0, limits, caps)
                if descriptors:  # zero-length buffers, still described: the general path makes them
                    break
                start = stop
                frames.append(Frame(header, []))
        finally:
            self._start = start

    def _parse_prefix(self) -> None:
        magic, version, flags, reserved, header_len, buffers_len = PREFIX.unpack_from(self._window, self._start)
        if magic != MAGIC:
            raise RemoteProtocolError(f"bad frame magic {magic!r} (expected {MAGIC!r}): not a zipcomm frame stream")
        if version != VERSION:
            raise RemoteProtocolError(f"peer sent frame version {version}, this side speaks version {VERSION}")
        if flags & ~KNOWN_FLAGS or reserved:
            raise RemoteProtocolError(f"unknown frame flags {flags:#x} / reserved field {reserved:#x}")
        if header_len > self._limits.max_header:
            raise FrameTooLarge("frame header", header_len, self._limits.max_header)
        if buffers_len > self._limits.max_buffers:
            raise FrameTooLarge("frame buffers", buffers_len, self._limits.max_buffers)
        self._start += PREFIX_SIZE
        self._header_len = header_len
        self._buffers_len = buffers_len
        self._state = _HEADER_STATE
        if header_len > WINDOW_SIZE:
            # Cannot fit the window, so the window holds only part of it: move
            # that part to a buffer of its own and receive the rest there.
            self._state = _BIG_HEADER_STATE
            self._target = memoryview(bytearray(header_len))
            self._filled = self._end - self._start
            self._target[: self._filled] = self._window[self._start : self._end]
            self._start = self._end

    def _target_full(self) -> None:
        target, self._target = self._target, None
        self._filled = 0
        if self._state is _BIG_HEADER_STATE:
            self._begin_frame(target)
        else:
            self._view_index += 1

    def _begin_frame(self, header_bytes: memoryview) -> None:
        header, descriptors = self._parse_header(header_bytes)
        placed = self.placer(header, descriptors) if self.placer is not None and descriptors else None
        if placed is not None and _fits(placed, descriptors):
            buffers = placed
            self._views = [memoryview(b.reshape(-1).view(np.uint8)) for b in placed if b.nbytes]
        else:
            buffers, self._views = _allocate(descriptors)
        self._frame = Frame(header, buffers)
        self._view_index = 0
        self._filled = 0
        self._state = _BODY_STATE

    def _parse_header(self, data: memoryview) -> tuple[dict, list]:
        return _decode_header(data, self._buffers_len, self._limits, self._caps)

    def _copy_window_into_body(self) -> bool:
        """Move body bytes already in the window into the buffers; True once all are full."""
        while self._view_index < len(self._views):
            view = self._views[self._view_index]
            n = min(len(view) - self._filled, self._end - self._start)
            view[self._filled : self._filled + n] = self._window[self._start : self._start + n]
            self._start += n
            self._filled += n
            if self._filled < len(view):
                return False
            self._view_index += 1
            self._filled = 0
        return True

    def _finish_frame(self) -> Frame:
        frame, self._frame = self._frame, None
        self._views = []
        self._state = _PREFIX_STATE
        return frame


# The msgpack caps of a header (Limits.unpacker_caps) by header length, shared by all decoders of
# equal limits: building them for every frame cost as much as decoding a small header.
_CAP_NAMES = ("max_str_len", "max_bin_len", "max_ext_len", "max_array_len", "max_map_len")
_CACHED_CAPS_BELOW = 4096  # header lengths whose caps are kept (control frames)
_CAPS_BY_LIMITS: dict[Limits, dict[int, tuple[int, ...]]] = {}


def _caps_for(limits: Limits) -> dict[int, tuple[int, ...]]:
    caps = _CAPS_BY_LIMITS.get(limits)
    if caps is None:
        caps = {}
        if len(_CAPS_BY_LIMITS) < 64:
            _CAPS_BY_LIMITS[limits] = caps
    return caps


def _decode_header(data: memoryview, buffers_len: int, limits: Limits,
                   cache: dict[int, tuple[int, ...]]) -> tuple[dict, list]:
    """The checked header dict of a frame (without "bufs") and its validated buffer descriptors."""
    n = len(data)
    caps = cache.get(n)
    if caps is None:
        named = limits.unpacker_caps(n)
        if set(named) != set(_CAP_NAMES):
            raise RuntimeError(f"Limits.unpacker_caps gave {sorted(named)}, the decoder passes {_CAP_NAMES}")
        caps = tuple(named[name] for name in _CAP_NAMES)
        if n < _CACHED_CAPS_BELOW:
            cache[n] = caps
    max_str, max_bin, max_ext, max_array, max_map = caps
    try:
        header = msgpack.unpackb(data, raw=False, strict_map_key=False, max_str_len=max_str, max_bin_len=max_bin,
                                 max_ext_len=max_ext, max_array_len=max_array, max_map_len=max_map)
    except Exception as exc:  # msgpack raises several unrelated types for bad input
        raise RemoteProtocolError(f"frame header is not valid msgpack: {exc!r:.200}") from exc
    if type(header) is not dict:
        raise RemoteProtocolError(f"frame header must be a msgpack map, got {type(header).__name__}")
    if type(header.get("op")) is not str:
        raise RemoteProtocolError(f"frame header has no str 'op' (got {header.get('op')!r:.100})")
    for key in header:
        if type(key) is not str:
            raise RemoteProtocolError(f"frame header keys must be str, got {key!r:.100}")
    if "bufs" not in header:
        if buffers_len:
            raise RemoteProtocolError(f"buffer descriptors add up to 0 bytes but the prefix announces {buffers_len}")
        return header, _NO_DESCRIPTORS
    descriptors = header.pop("bufs")
    _check_descriptors(descriptors, buffers_len, limits)
    return header, descriptors


_NO_DESCRIPTORS: list = []  # never modified: _allocate only reads it


def _check_descriptors(descriptors: object, buffers_len: int, limits: Limits) -> None:
    """Validate buffer descriptors against the prefix before anything is allocated."""
    if type(descriptors) is not list:
        raise RemoteProtocolError(f"'bufs' must be a list, got {type(descriptors).__name__}")
    if len(descriptors) > limits.max_buffer_count:
        raise RemoteProtocolError(f"{len(descriptors)} buffers exceed the limit of {limits.max_buffer_count}")
    total = 0
    for index, descriptor in enumerate(descriptors):
        total += _descriptor_nbytes(descriptor, index, limits)
        if total > buffers_len:
            break
    if total != buffers_len:
        raise RemoteProtocolError(f"buffer descriptors add up to {total} bytes but the prefix announces {buffers_len}")


def _descriptor_nbytes(descriptor: object, index: int, limits: Limits) -> int:
    if type(descriptor) is list and len(descriptor) == 4 and descriptor[0] == "nd":
        _, dtype_text, shape, nbytes = descriptor
        dtype = _parse_dtype(dtype_text) if type(dtype_text) is str else None
        if dtype is None:
            raise RemoteProtocolError(f"bufs[{index}]: unsupported dtype {dtype_text!r:.60}")
        if type(shape) is not list or len(shape) > _MAX_NDIM or not all(type(n) is int and n >= 0 for n in shape):
            raise RemoteProtocolError(f"bufs[{index}]: bad shape {shape!r:.200}")
        # numpy refuses shapes whose non-zero extents overflow, even when a
        # zero extent makes the array empty, so they are bounded too.
        if math.prod(max(n, 1) for n in shape) * dtype.itemsize > limits.max_buffers:
            raise RemoteProtocolError(f"bufs[{index}]: shape {shape!r:.200} is too large")
        expected = math.prod(shape) * dtype.itemsize
        if type(nbytes) is not int or nbytes != expected:
            raise RemoteProtocolError(
                f"bufs[{index}]: {nbytes!r:.40} bytes declared for shape {shape} of {dtype_text}, expected {expected}"
            )
        descriptor[1] = dtype  # parsed once, reused by _allocate
        return nbytes
    if type(descriptor) is list and len(descriptor) == 2 and descriptor[0] == "b":
        nbytes = descriptor[1]
        if type(nbytes) is not int or nbytes < 0:
            raise RemoteProtocolError(f"bufs[{index}]: bad byte length {nbytes!r:.40}")
        return nbytes
    raise RemoteProtocolError(f"bufs[{index}]: bad buffer descriptor {descriptor!r:.200}")


def _fits(arrays: list, descriptors: list) -> bool:
    """Whether ``arrays`` can receive the buffers ``descriptors`` announce, exactly."""
    if type(arrays) is not list or len(arrays) != len(descriptors):
        return False
    for array, descriptor in zip(arrays, descriptors):
        if (descriptor[0] != "nd" or type(array) is not np.ndarray or array.dtype != descriptor[1]
                or list(array.shape) != descriptor[2] or not array.flags.c_contiguous or not array.flags.writeable):
            return False
    return True


def _allocate(descriptors: list) -> tuple[list[np.ndarray | bytearray], list[memoryview]]:
    buffers: list[np.ndarray | bytearray] = []
    views: list[memoryview] = []
    for descriptor in descriptors:
        if descriptor[0] == "nd":
            buffers.append(np.empty(descriptor[2], dtype=descriptor[1]))
            view = memoryview(buffers[-1].reshape(-1).view(np.uint8))
        else:
            buffers.append(bytearray(descriptor[1]))
            view = memoryview(buffers[-1])
        if view.nbytes:
            views.append(view)
    return buffers, views
