"""Application payloads: round trip through the whole codec, out-of-band buffers,
clear refusals at the sender, typed errors for malformed trees from a peer."""

from __future__ import annotations

import enum
import math
import random
from collections import namedtuple

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from zipcomm.errors import LocalProtocolError, RemoteProtocolError, UnsupportedPayload
from zipcomm.protocol.frames import FrameDecoder, encode_frame
from zipcomm.protocol.payload import (
    ARRAY_EXT,
    BYTES_EXT,
    OUT_OF_BAND_MIN,
    decode_payload_frame,
    encode_payload_frame,
    pack_payload,
    unpack_payload,
)

# --- helpers ------------------------------------------------------------------


def assert_same(got, sent, path="payload"):
    """Equality that also checks types, treats nan as equal and compares arrays exactly."""
    if isinstance(sent, np.ndarray):
        assert isinstance(got, np.ndarray), path
        assert got.dtype == sent.dtype and got.shape == sent.shape, path
        if sent.dtype.kind in "mM":  # NaT != NaT, and equal_nan does not cover it
            got, sent = got.view(np.int64), sent.view(np.int64)
        assert np.array_equal(got, sent, equal_nan=sent.dtype.kind in "fc"), path
    elif isinstance(sent, (bytes, bytearray, memoryview)):
        assert type(got) is bytes and got == bytes(sent), path
    elif isinstance(sent, float) and math.isnan(sent):
        assert type(got) is float and math.isnan(got), path
    elif isinstance(sent, (list, tuple)):
        assert type(got) is type(sent) and len(got) == len(sent), path
        for index, (a, b) in enumerate(zip(got, sent)):
            assert_same(a, b, f"{path}[{index}]")
    elif isinstance(sent, dict):
        assert type(got) is dict and got.keys() == sent.keys(), path
        for key in sent:
            assert_same(got[key], sent[key], f"{path}[{key!r}]")
    else:
        assert type(got) is type(sent) and got == sent, path


def send_in_chunks(obj, seed: int):
    """pack_payload -> encode_frame -> FrameDecoder in random chunks -> unpack_payload."""
    tree, buffers = pack_payload(obj)
    data = b"".join(encode_frame({"op": "put", "data": tree}, buffers))
    rng = random.Random(seed)
    decoder = FrameDecoder()
    frames, offset = [], 0
    while offset < len(data):
        size = rng.randint(1, max(1, len(data) // 3))
        frames += decoder.feed(data[offset : offset + size])
        offset += size
    (frame,) = frames
    return unpack_payload(frame.header["data"], frame.buffers)


# --- round trip ---------------------------------------------------------------

dtypes = st.sampled_from(
    ["<f8", "<f4", "<f2", "<i8", "<i4", "|i1", "|u1", ">u4", "<c16", "|b1", "<M8[s]", "<U3", "|S4"]
)
arrays = hnp.arrays(dtype=dtypes, shape=hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4))
scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=20)
    | st.binary(max_size=40)
    | st.binary(min_size=OUT_OF_BAND_MIN, max_size=OUT_OF_BAND_MIN + 200)
    | arrays
)
keys = st.text(max_size=6) | st.integers(min_value=-(2**63), max_value=2**64 - 1) | st.binary(max_size=6)
trees = st.recursive(
    scalars,
    lambda children: (
        st.lists(children, max_size=4)
        | st.lists(children, max_size=4).map(tuple)
        | st.dictionaries(keys, children, max_size=4)
    ),
    max_leaves=20,
)


@settings(
    max_examples=200, deadline=None, database=None, print_blob=True, suppress_health_check=[HealthCheck.too_slow]
)
@given(obj=trees, seed=st.integers(min_value=0, max_value=2**32 - 1))
def test_random_payloads_round_trip_through_the_codec(obj, seed):
    try:
        assert_same(send_in_chunks(obj, seed), obj)
    except AssertionError as exc:
        raise AssertionError(f"chunking seed={seed}: {exc}") from exc


def test_round_trip_keeps_types_and_moves_large_values_out_of_band():
    big = np.arange(1000.0)
    obj = {
        "tuple": (1, "a", (2.5, None)),
        "empty tuple": (),
        "list": [True, False, None],
        7: b"small",
        b"raw": bytearray(b"x" * OUT_OF_BAND_MIN),
        "view": memoryview(b"y" * 5000),
        "array": big,
        "zero-d": np.array(3, dtype=np.int16),
    }
    tree, buffers = pack_payload(obj)
    assert len(buffers) == 4  # the bytearray, the memoryview and the two arrays
    assert buffers[2] is big  # numpy arrays are never copied when packed
    assert tree[7] == b"small"
    assert tree["array"] == msgpack.ExtType(ARRAY_EXT, (2).to_bytes(4, "little"))
    assert tree[b"raw"] == msgpack.ExtType(BYTES_EXT, (0).to_bytes(4, "little"))
    assert_same(send_in_chunks(obj, seed=1), obj)


def test_received_arrays_are_the_frame_buffers_themselves():
    pieces = encode_payload_frame("put", {"channel": "c"}, {"w": np.ones(10)})
    (frame,) = FrameDecoder().feed(b"".join(pieces))
    assert frame.op == "put" and frame.header["channel"] == "c"
    value = decode_payload_frame(frame)
    assert value["w"] is frame.buffers[0]


def test_numpy_scalars_and_subclasses_arrive_as_plain_python_values():
    class Color(enum.IntEnum):
        RED = 1

    Point = namedtuple("Point", "x y")
    tree, buffers = pack_payload([np.float32(1.5), np.int64(-3), np.bool_(True), np.str_("s"), Color.RED, Point(1, 2)])
    value = unpack_payload(tree, buffers)
    assert value == [1.5, -3, True, "s", 1, (1, 2)]
    assert [type(v) for v in value] == [float, int, bool, str, int, tuple]
    assert unpack_payload(*pack_payload({np.int32(4): 1})) == {4: 1}


# --- refused at the sender ----------------------------------------------------


class Foo:
    pass


@pytest.mark.parametrize(
    "obj, message",
    [
        ({1: {"x": [1, {2, 3}]}}, r"payload\[1\]\['x'\]\[1\]: cannot send object of type set; allowed:"),
        ([0, 1, Foo()], r"payload\[2\]: cannot send object of type .*Foo"),
        ({"z": np.array([1, None], dtype=object)}, r"payload\['z'\]: .*dtype object"),
        ((1, np.zeros(2, dtype=[("a", "<f8")])), r"payload\[1\]: .*structured"),
        ({"m": np.ma.masked_array([1, 2], mask=[0, 1])}, r"payload\['m'\]: masked"),
        ([1j], r"payload\[0\]: cannot send object of type complex"),
        ([np.datetime64("2024-01-01")], r"payload\[0\]: cannot send numpy scalar"),
        ([2**64], r"payload\[0\]: int .* outside"),
        ({(1, 2): 3}, r"payload: dict key \(1, 2\) of type tuple"),
        ({1.5: 3}, r"payload: dict key 1.5 of type float"),
        (msgpack.ExtType(1, b"\0\0\0\0"), r"payload: cannot send object of type ExtType"),
    ],
)
def test_unsupported_values_are_refused_with_their_path(obj, message):
    with pytest.raises(UnsupportedPayload, match=message):
        pack_payload(obj)


def test_unsupported_payload_is_a_type_error():
    with pytest.raises(TypeError):
        pack_payload(print)


def test_reference_cycles_and_deep_nesting_are_refused():
    cycle: list = []
    cycle.append(cycle)
    with pytest.raises(UnsupportedPayload, match="nested too deeply"):
        pack_payload(cycle)
    deep: list = []
    for _ in range(500):
        deep = [deep]
    with pytest.raises(UnsupportedPayload, match="nested too deeply"):
        pack_payload(deep)


def test_encode_payload_frame_owns_op_and_data():
    with pytest.raises(LocalProtocolError):
        encode_payload_frame("put", {"data": 1}, None)


# --- malformed trees from a peer ----------------------------------------------


def _ref(code: int, index: int) -> msgpack.ExtType:
    return msgpack.ExtType(code, index.to_bytes(4, "little"))


@pytest.mark.parametrize(
    "tree, buffers, message",
    [
        ([_ref(ARRAY_EXT, 1)], [np.zeros(1)], r"payload\[0\]: refers to buffer 1"),
        ([_ref(ARRAY_EXT, 0), _ref(ARRAY_EXT, 0)], [np.zeros(1)], "referenced twice"),
        ([_ref(ARRAY_EXT, 0)], [bytearray(3)], "wrong kind"),
        ([_ref(BYTES_EXT, 0)], [np.zeros(1)], "wrong kind"),
        ([msgpack.ExtType(BYTES_EXT, b"\0")], [bytearray(1)], "expected 4"),
        ({"a": msgpack.ExtType(9, b"")}, [], r"payload\['a'\]: unexpected ExtType"),
        ({1.5: 1}, [], "dict key of type float"),
        ([msgpack.Timestamp(0)], [], "unexpected Timestamp"),
    ],
)
def test_malformed_trees_from_a_peer_raise_remote_protocol_error(tree, buffers, message):
    with pytest.raises(RemoteProtocolError, match=message):
        unpack_payload(tree, buffers)


def test_deeply_nested_tree_from_a_peer_is_refused_without_recursion_error():
    # msgpack accepts 1024 levels, more than Python's default recursion limit.
    data = b"\x91" * 1000 + b"\xc0"
    with pytest.raises(RemoteProtocolError, match="nested too deeply"):
        unpack_payload(msgpack.unpackb(data), [])


def test_frame_without_payload():
    (frame,) = FrameDecoder().feed(b"".join(encode_frame({"op": "ping"})))
    with pytest.raises(RemoteProtocolError, match="no payload"):
        decode_payload_frame(frame)
