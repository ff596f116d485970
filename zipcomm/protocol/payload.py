"""Application values inside frames: a msgpack tree plus out-of-band buffers.

``pack_payload`` turns a value into a msgpack-able tree and a list of raw
buffers (numpy arrays, and bytes-likes of ``OUT_OF_BAND_MIN`` bytes or more);
the tree refers to them by index through msgpack extension types::

    ExtType(1, index)  bytes buffer, comes back as bytes
    ExtType(2, index)  numpy array, comes back as the received array (no copy)
    [ExtType(3, b""), item, ...]  a tuple, so that tuples come back as tuples

The tuple marker sits inside an ordinary list rather than wrapping a nested
msgpack document, so tuples cost three bytes and no second encoding pass.

Only plain data is allowed -- None, bool, int, float, str, bytes-likes, list,
tuple, dict, numpy arrays and numpy scalars -- and nothing is ever pickled.
Subclasses travel as their base type (an IntEnum arrives as an int, a
namedtuple as a tuple); bytearray and memoryview arrive as bytes.
"""

from __future__ import annotations

import struct

import msgpack
import numpy as np

from ..errors import LocalProtocolError, RemoteProtocolError, UnsupportedPayload
from .frames import Frame, array_problem, encode_frame
from .limits import DEFAULT_LIMITS, Limits

__all__ = [
    "BYTES_EXT",
    "ARRAY_EXT",
    "TUPLE_EXT",
    "OUT_OF_BAND_MIN",
    "pack_payload",
    "unpack_payload",
    "encode_payload_frame",
    "decode_payload_frame",
]

BYTES_EXT = 1
ARRAY_EXT = 2
TUPLE_EXT = 3

# Below this size a separate buffer costs more (descriptor, writelines piece,
# allocation on receipt) than carrying the bytes inside the header.
OUT_OF_BAND_MIN = 1024

ALLOWED = "None, bool, int, float, str, bytes, bytearray, memoryview, list, tuple, dict, numpy arrays, numpy scalars"

_INDEX = struct.Struct("<I")
_TUPLE_MARK = msgpack.ExtType(TUPLE_EXT, b"")
_INT_MIN = -(1 << 63)
_INT_MAX = (1 << 64) - 1  # msgpack carries int64 and uint64
_SCALARS = (bool, int, float, str, bytes)


class _PathError(Exception):
    """Raised inside the walkers; each container adds its key on the way out."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message
        self.path: list = []  # innermost key first

    def where(self) -> str:
        keys = [f"[{key!r:.40}]" for key in reversed(self.path)]
        if len(keys) > 16:  # a reference cycle would otherwise print max_depth keys
            keys[8:-4] = ["[...]"]
        return "payload" + "".join(keys)


# --- packing ----------------------------------------------------------------


def pack_payload(obj: object, limits: Limits = DEFAULT_LIMITS) -> tuple[object, list]:
    """Split ``obj`` into a msgpack-able tree and the buffers it refers to."""
    buffers: list = []
    try:
        tree = _pack(obj, buffers, limits.max_depth)
    except _PathError as exc:
        raise UnsupportedPayload(f"{exc.where()}: {exc.message}") from None
    return tree, buffers


def _pack(obj: object, buffers: list, depth: int) -> object:
    kind = type(obj)
    if kind is str or kind is float or kind is bool or obj is None:
        return obj
    if kind is int:
        if not _INT_MIN <= obj <= _INT_MAX:
            raise _PathError(f"int {obj} is outside the 64-bit range msgpack can carry")
        return obj
    if isinstance(obj, (list, tuple)) and not isinstance(obj, msgpack.ExtType):
        if depth <= 0:
            raise _PathError("nested too deeply (or the structure contains itself)")
        packed = [] if isinstance(obj, list) else [_TUPLE_MARK]
        for index, item in enumerate(obj):
            try:
                packed.append(_pack(item, buffers, depth - 1))
            except _PathError as exc:
                exc.path.append(index)
                raise
        return packed
    if isinstance(obj, dict):
        if depth <= 0:
            raise _PathError("nested too deeply (or the structure contains itself)")
        packed = {}
        for key, value in obj.items():
            packed_key = _pack_key(key)
            try:
                packed[packed_key] = _pack(value, buffers, depth - 1)
            except _PathError as exc:
                exc.path.append(key)
                raise
        return packed
    if isinstance(obj, (bytes, bytearray, memoryview)):
        size = obj.nbytes if isinstance(obj, memoryview) else len(obj)
        if size < OUT_OF_BAND_MIN:
            return bytes(obj)
        buffers.append(obj)
        return msgpack.ExtType(BYTES_EXT, _INDEX.pack(len(buffers) - 1))
    if isinstance(obj, np.ndarray):
        problem = array_problem(obj)
        if problem:
            raise _PathError(problem)
        buffers.append(obj)
        return msgpack.ExtType(ARRAY_EXT, _INDEX.pack(len(buffers) - 1))
    if isinstance(obj, np.generic):
        value = obj.item()
        if type(value) not in _SCALARS:
            raise _PathError(
                f"cannot send numpy scalar of type {kind.__name__} (it has no plain Python "
                "equivalent); send np.asarray(value) instead"
            )
        return _pack(value, buffers, depth)
    # str/int/float subclasses (enums, for instance) travel as their base type.
    for base in (str, int, float):
        if isinstance(obj, base):
            return _pack(base(obj), buffers, depth)
    raise _PathError(f"cannot send object of type {kind.__qualname__}; allowed: {ALLOWED}")


def _pack_key(key: object) -> object:
    kind = type(key)
    if kind is str or kind is bytes or kind is bool:
        return key
    plain = key.item() if isinstance(key, np.generic) else key
    if isinstance(plain, bool):
        return plain
    if isinstance(plain, int):
        if _INT_MIN <= plain <= _INT_MAX:
            return int(plain)
        raise _PathError(f"dict key {plain} is outside the 64-bit range msgpack can carry")
    for base in (str, bytes):
        if isinstance(plain, base):
            return base(plain)
    raise _PathError(f"dict key {key!r:.60} of type {kind.__qualname__} cannot be sent; keys must be str, int or bytes")


# --- unpacking --------------------------------------------------------------


def unpack_payload(tree: object, buffers: list, limits: Limits = DEFAULT_LIMITS) -> object:
    """Rebuild the value that ``pack_payload`` split; ``buffers`` are the frame's buffers.

    The tree comes from a peer, so anything ``pack_payload`` would not have
    produced raises RemoteProtocolError.
    """
    used = [False] * len(buffers)
    try:
        return _unpack(tree, buffers, used, limits.max_depth)
    except _PathError as exc:
        raise RemoteProtocolError(f"{exc.where()}: {exc.message}") from None


def _unpack(node: object, buffers: list, used: list[bool], depth: int) -> object:
    kind = type(node)
    if kind is str or kind is int or kind is float or kind is bool or kind is bytes or node is None:
        return node
    if kind is list:
        if depth <= 0:
            raise _PathError("nested too deeply")
        is_tuple = bool(node) and type(node[0]) is msgpack.ExtType and node[0] == _TUPLE_MARK
        items = []
        for index in range(1 if is_tuple else 0, len(node)):
            try:
                items.append(_unpack(node[index], buffers, used, depth - 1))
            except _PathError as exc:
                exc.path.append(index - is_tuple)
                raise
        return tuple(items) if is_tuple else items
    if kind is dict:
        if depth <= 0:
            raise _PathError("nested too deeply")
        result = {}
        for key, value in node.items():
            if type(key) not in (str, int, bytes, bool):
                raise _PathError(f"dict key of type {type(key).__name__} is not allowed")
            try:
                result[key] = _unpack(value, buffers, used, depth - 1)
            except _PathError as exc:
                exc.path.append(key)
                raise
        return result
    if kind is msgpack.ExtType and node.code in (BYTES_EXT, ARRAY_EXT):
        return _take_buffer(node, buffers, used)
    raise _PathError(f"unexpected {kind.__name__} in payload")


def _take_buffer(ext: msgpack.ExtType, buffers: list, used: list[bool]) -> object:
    if len(ext.data) != _INDEX.size:
        raise _PathError(f"buffer reference of {len(ext.data)} bytes, expected {_INDEX.size}")
    (index,) = _INDEX.unpack(ext.data)
    if index >= len(buffers):
        raise _PathError(f"refers to buffer {index} but the frame has {len(buffers)}")
    if used[index]:
        # Two references would alias one array where the sender had two values.
        raise _PathError(f"buffer {index} is referenced twice")
    buffer = buffers[index]
    if (ext.code == ARRAY_EXT) != isinstance(buffer, np.ndarray):
        raise _PathError(f"buffer {index} is of the wrong kind for extension type {ext.code}")
    used[index] = True
    return buffer if ext.code == ARRAY_EXT else bytes(buffer)


# --- frames carrying a payload ------------------------------------------------


def encode_payload_frame(
    op: str, fields: dict, obj: object, limits: Limits = DEFAULT_LIMITS
) -> list[bytes | memoryview]:
    """Encode a frame whose header is ``fields`` + ``op`` with ``obj`` under ``"data"``."""
    if "op" in fields or "data" in fields:
        raise LocalProtocolError("'op' and 'data' are set by encode_payload_frame, not by fields")
    tree, buffers = pack_payload(obj, limits)
    return encode_frame({"op": op, **fields, "data": tree}, buffers, limits)


def decode_payload_frame(frame: Frame, limits: Limits = DEFAULT_LIMITS) -> object:
    """The value that ``encode_payload_frame`` put into ``frame``."""
    if "data" not in frame.header:
        raise RemoteProtocolError(f"frame of op {frame.op!r} carries no payload")
    return unpack_payload(frame.header["data"], frame.buffers, limits)


def snapshot_payload(obj: object, limits: Limits = DEFAULT_LIMITS) -> object:
    """A private copy of ``obj`` (checked like ``pack_payload``): zipcomm keeps what it
    sends (queued on sockets, in histories for repair) after the call that sent it
    returned, so the caller may reuse its own buffers at once. One memcpy per array."""
    tree, buffers = pack_payload(obj, limits)
    copies = [np.array(b, copy=True, order="C") if isinstance(b, np.ndarray) else bytearray(b) for b in buffers]
    return unpack_payload(tree, copies, limits)
