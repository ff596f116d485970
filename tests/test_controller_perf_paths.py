"""The fast paths of the controller's join storm (bench/controller.py) do what the general code does:
the decoder's loop over whole control frames, the reused msgpack Packer, Rewire.to_frame,
Connection.recv_batch, the controller state's spelled-out join, and the tree's join for data (the
wire entries the controller keeps with each member in its slot)."""

from __future__ import annotations

import asyncio
import random
import threading

import msgpack
import numpy as np
import pytest

from zipcomm.controller.state import ControllerState
from zipcomm.errors import LocalProtocolError, RemoteProtocolError
from zipcomm.protocol import messages as m
from zipcomm.protocol.frames import FrameDecoder, encode_control_frame, encode_frame
from zipcomm.protocol.limits import MAGIC, PREFIX, VERSION, Limits
from zipcomm.topology import Tree
from zipcomm.transport.connection import open_connection, start_server


def _mixed_frames(rng: random.Random) -> list[tuple[dict, list]]:
    frames: list[tuple[dict, list]] = []
    for i in range(300):
        kind = rng.random()
        if kind < 0.7:
            frames.append(({"op": "join", "req": i, "channel": "c" * rng.randint(0, 40), "member": rng.getrandbits(63)}, []))
        elif kind < 0.8:  # zero-length buffers: no buffer bytes, but described and allocated
            frames.append(({"op": "empty", "i": i}, [b"", np.zeros((0, 3), dtype="<f4")]))
        elif kind < 0.9:
            frames.append(({"op": "data", "i": i}, [rng.randbytes(rng.randint(1, 3000)),
                                                    np.arange(rng.randint(1, 500), dtype="<i8")]))
        else:  # a header larger than most receive chunks
            frames.append(({"op": "big", "blob": "x" * rng.randint(1000, 100_000)}, []))
    return frames


def _same(decoded, sent) -> None:
    assert len(decoded) == len(sent)
    for frame, (header, buffers) in zip(decoded, sent):
        assert frame.header == header
        assert len(frame.buffers) == len(buffers)
        for got, want in zip(frame.buffers, buffers):
            if isinstance(want, np.ndarray):
                assert isinstance(got, np.ndarray) and got.dtype == want.dtype and got.shape == want.shape
                assert np.array_equal(got, want)
            else:
                assert bytes(got) == bytes(want)


@pytest.mark.parametrize("seed", range(4))
def test_control_frames_between_buffered_frames_decode_in_any_chunking(seed: int) -> None:
    rng = random.Random(seed)
    sent = _mixed_frames(rng)
    data = b"".join(b"".join(encode_frame(h, b)) for h, b in sent)
    _same(FrameDecoder().feed(data), sent)
    decoder, got, offset = FrameDecoder(), [], 0
    while offset < len(data):
        n = rng.choice([1, 7, 19, 20, 21, 100, 4096, 70_000])
        got += decoder.feed(data[offset:offset + n])
        offset += n
    _same(got, sent)
    assert decoder.at_boundary


def test_a_bad_frame_after_good_ones_in_one_read_raises_and_poisons() -> None:
    good = b"".join(encode_control_frame({"op": "ok", "i": i}) for i in range(5))
    bad_key = msgpack.packb({"op": "x", 1: 2})
    bad = PREFIX.pack(MAGIC, VERSION, 0, 0, len(bad_key), 0) + bad_key
    decoder = FrameDecoder()
    with pytest.raises(RemoteProtocolError, match="keys must be str"):
        decoder.feed(good + bad + good)
    with pytest.raises(RemoteProtocolError):
        decoder.feed(good)


def test_header_caps_are_those_of_the_limits_for_every_length() -> None:
    # A 30-byte header that declares a 1000-element array is refused, not preallocated.
    lie = b"\x81\xa2op\xdd\x00\x00\x03\xe8" + b"\x00" * 20
    for _ in range(2):  # the second time with the cached caps of that length
        with pytest.raises(RemoteProtocolError, match=r"1000 exceeds max_array_len\(29\)"):
            FrameDecoder().feed(PREFIX.pack(MAGIC, VERSION, 0, 0, len(lie), 0) + lie)
    # Caps follow the decoder's own limits (a second Limits value gets its own cache).
    header = {"op": "x", "s": "y" * 500}
    frame = b"".join(encode_frame(header))
    assert FrameDecoder(Limits(max_header=1 << 16)).feed(frame)[0].header == header
    with pytest.raises(Exception):
        FrameDecoder(Limits(max_header=100)).feed(frame)


def test_encode_control_frame_is_encode_frame_and_refuses_the_same() -> None:
    header = {"op": "reply", "req": 7, "ok": True, "result": {"parent": (1, "a:1", "h", "both")}, "error": "", "code": ""}
    assert [encode_control_frame(header)] == encode_frame(header)
    assert encode_control_frame(header)[PREFIX.size:] == msgpack.packb(header)
    for bad in ({"no": "op"}, {"op": b"x"}, {"op": "x", "bufs": []}, {"op": "x", "what": object()}):
        with pytest.raises(LocalProtocolError):
            encode_control_frame(bad)
    # a failed pack leaves the reused Packer clean
    assert encode_control_frame({"op": "after"})[PREFIX.size:] == msgpack.packb({"op": "after"})
    with pytest.raises(LocalProtocolError, match="limit"):
        encode_control_frame({"op": "x", "blob": "x" * 2000}, Limits(max_header=1000))


def test_threads_encoding_at_once_each_get_their_own_frames() -> None:
    errors: list[str] = []

    def work(t: int) -> None:
        for i in range(3000):
            header = {"op": "t", "thread": t, "i": i, "pad": "p" * (i % 50)}
            if encode_frame(header)[0][PREFIX.size:] != msgpack.packb(header):
                errors.append(f"thread {t} frame {i}")
                return

    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors


def test_rewire_to_frame_is_the_generic_encoding() -> None:
    for msg in (m.Rewire("c", 3, [1, "a:1", "h", "both"], [[2, "b:2", "h", "sender"]], 2, 1, None, None),
                m.Rewire("d", 9, None, [], 0, 9, 5, 77), m.Rewire(channel="e", epoch=1)):
        fast, generic = msg.to_frame(), m.Message.to_frame(msg)
        assert fast == generic and list(fast[0]) == list(generic[0])
        assert m.decode(FrameDecoder().feed(b"".join(encode_frame(*fast)))[0]) == msg


def test_state_join_replies_and_pushes_match_the_tree() -> None:
    """The state's spelled-out join reports exactly Tree.join's places (epochs, terms, wires)."""
    state, tree = ControllerState(fanout=3), Tree(3)
    for member in range(1, 400):
        state.hello(member, f"10.0.0.{member % 250}:{member}", f"h{member % 7}")
        result, pushes = state.join(member, "ch", "broadcast", "both" if member % 2 else "sender", 0)
        changes = tree.join(member)
        own, others = changes.rewires[0], changes.rewires[1:]
        assert result["depth"] == own.depth and result["children"] == []
        assert (result["parent"] is None) == (own.parent is None)
        if own.parent is not None:
            assert result["parent"][0] == own.parent
        assert result["epoch"] == member  # one bump per join
        assert result["term"] == 1
        assert [(target, msg.parent and msg.parent[0], [c[0] for c in msg.children], msg.depth)
                for target, msg in pushes] == [(rw.member, rw.parent, list(rw.children), rw.depth) for rw in others]
        for _, msg in pushes:
            assert isinstance(msg, m.Rewire) and msg.epoch == member and msg.removed is None
            assert all(c[3] == ("both" if c[0] % 2 else "sender") for c in msg.children)
    state.channels["ch"].tree.check_invariants()


def test_tree_join_data_reports_what_join_does() -> None:
    """Tree.join_data is Tree.join with each member's data instead of its id, through joins that
    reuse the slots of removed members."""
    rng = random.Random(7)
    by_ids, by_data = Tree(3), Tree(3)
    members: list[int] = []
    for step in range(3000):
        if members and rng.random() < 0.3:
            victim = members.pop(rng.randrange(len(members)))
            assert by_ids.remove(victim) == by_data.remove(victim)
            continue
        member = step
        members.append(member)
        changes = by_ids.join(member)
        placed = by_data.join_data(member, ("wire", member))
        if placed is None:
            assert changes.root_changed and changes.rewires == [(member, None, (), 0)]
            continue
        (_, parent, _, depth), (_, above, below, level) = changes.rewires
        assert placed == (parent, ("wire", parent), depth, None if above is None else ("wire", above),
                          [("wire", kid) for kid in below], level)
        assert by_data.data(member) == ("wire", member)
    by_data.check_invariants()
    assert {m: (by_ids.parent(m), by_ids.children(m)) for m in by_ids} == {
        m: (by_data.parent(m), by_data.children(m)) for m in by_data}


def test_a_new_address_reaches_the_wire_entries_of_every_channel() -> None:
    """The trees keep wire entries; a hello with a new address (a reconnect) updates them, roles kept."""
    state = ControllerState()
    state.hello(1, "10.0.0.1:1", "h1")
    state.join(1, "a", "broadcast", "sender", 0)
    state.join(1, "b", "reduce", "both", 0)
    state.hello(1, "10.0.0.9:9", "h9")
    state.hello(2, "10.0.0.2:2", "h2")
    for channel, kind, role in (("a", "broadcast", "sender"), ("b", "reduce", "both")):
        result, pushes = state.join(2, channel, kind, "member", 0)
        assert result["parent"] == (1, "10.0.0.9:9", "h9", role)
        assert [(target, msg.children) for target, msg in pushes] == [(1, [(2, "10.0.0.2:2", "h2", "member")])]
        assert state.root(channel)["root"] == (1, "10.0.0.9:9", "h9", role)
    state.hello(1, "10.0.0.9:9", "h9")  # the same address again: nothing to update
    assert state.member_list("a")["members"] == [(1, "10.0.0.9:9", "h9", "sender"), (2, "10.0.0.2:2", "h2", "member")]


@pytest.mark.asyncio
async def test_recv_batch_returns_every_queued_frame_in_order() -> None:
    got: list = []
    done = asyncio.Event()

    async def serve(conn) -> None:
        while len(got) < 1000:
            frames = await conn.recv_batch()
            assert frames
            got.extend(frame.header["i"] for frame in frames)
        done.set()
        await conn.recv_batch()  # until the client closes: raises ConnectionClosed

    server = await start_server("127.0.0.1:0", serve)
    try:
        client = await open_connection(server.address)
        for i in range(1000):
            client.send({"op": "n", "i": i})
        await asyncio.wait_for(done.wait(), 20)
        assert got == list(range(1000))
        await client.aclose()
    finally:
        await server.aclose()
