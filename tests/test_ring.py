"""The SPSC ring (zipcomm.ring): the C ring and its pure-Python twin, side by side.

* a Hypothesis state machine drives both (each over its own buffer) with the same operations and
  checks them against a model and against each other, byte for byte;
* unit tests of the edge cases (empty, full, exact fit, wrap-around, too large), for both;
* each implementation attaches rings the other made, in one process and across two processes;
* attach validation.
"""
from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import time
import zlib
from collections import Counter, deque
from multiprocessing import shared_memory
from pathlib import Path

import numpy as np
import pytest
from hypothesis import event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (RuleBasedStateMachine, initialize, invariant, precondition, rule,
                                 run_state_machine_as_test)

from zipcomm import ring as ringmod
from zipcomm.errors import (BufferTooSmall, InvalidRingMemory, RecordTooLarge, RingClosed,
                            RingCorrupt, RingEmpty, RingError, RingFull, ZipError, ZipTimeout)
from zipcomm.ring import (HEAD_OFFSET, HEADER_SIZE, MIN_CAPACITY, RECORD_HEADER, SKIP, TAIL_OFFSET,
                          CRing, PyRing, max_record_for, memory_size)

ROOT = Path(__file__).resolve().parent.parent
IMPLS = [pytest.param(CRing, id="c"), pytest.param(PyRing, id="python")]
PAIRS = [pytest.param(a, b, id=f"{a.implementation}-{b.implementation}")
         for a in (CRing, PyRing) for b in (CRing, PyRing)]


def make(cls, capacity: int):
    buf = bytearray(memory_size(capacity))
    return cls.create(buf), buf


def positions(buf) -> tuple[int, int]:
    return (struct.unpack_from("=Q", buf, HEAD_OFFSET)[0],
            struct.unpack_from("=Q", buf, TAIL_OFFSET)[0])


def record_at(buf, offset: int) -> int:
    """The length field of the record header at data offset ``offset``."""
    return struct.unpack_from("=I", buf, HEADER_SIZE + offset)[0]


def payload(n: int, seed: int = 0) -> bytes:
    return bytes((seed + i * 31) & 0xFF for i in range(n))


def round8(n: int) -> int:
    return (n + 7) & ~7


# --- the model and the differential state machine ---------------------------------------------

class Model:
    """What the ring must do: FIFO records; a record takes 8 + round8(len) bytes, and a record
    that does not fit before the end of the data area also takes the rest of it (skip marker)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.max_record = max_record_for(capacity)
        self.head = self.tail = 0
        self.records: deque[tuple[bytes, int]] = deque()  # (payload, bytes taken)

    @property
    def used(self) -> int:
        return self.head - self.tail

    @property
    def contig(self) -> int:
        return self.capacity - self.head % self.capacity

    def push(self, data: bytes) -> str:
        """'too_big', 'full', or how the record went in: 'plain', 'exact_end', 'wrap'."""
        if len(data) > self.max_record:
            return "too_big"
        need = RECORD_HEADER + round8(len(data))
        free, contig = self.capacity - self.used, self.contig
        if need <= contig:
            if need > free:
                return "full"
            taken, kind = need, ("exact_end" if need == contig else "plain")
        else:
            if contig + need > free:
                return "full"
            taken, kind = contig + need, "wrap"
        self.records.append((data, taken))
        self.head += taken
        return kind

    def pop(self) -> bytes | None:
        if not self.records:
            return None
        data, taken = self.records.popleft()
        self.tail += taken
        return data


COVERAGE: Counter[str] = Counter()
MUST_COVER = {"wrap", "exact_end", "exact_fill", "full", "empty_pop", "too_big", "zero_length",
              "small_buffer", "max_record"}


def outcome(ring, data) -> str | bool:
    try:
        return ring.push(data)
    except RecordTooLarge as exc:
        assert exc.size == len(data) and exc.limit == ring.max_record
        return "too_big"


class RingMachine(RuleBasedStateMachine):
    """The C ring and the Python twin, each over its own buffer, given the same operations."""

    @initialize(capacity=st.integers(MIN_CAPACITY // 8, 64).map(lambda k: 8 * k))
    def setup(self, capacity: int) -> None:
        self.model = Model(capacity)
        self.rings = []
        self.bufs = []
        for cls in (CRing, PyRing):
            r, buf = make(cls, capacity)
            self.rings.append(r)
            self.bufs.append(buf)
        self.seed = 0

    def teardown(self) -> None:
        for r in getattr(self, "rings", ()):
            r.close()

    def _push(self, size: int) -> str:
        self.seed += 1
        data = payload(size, self.seed)
        before_used = self.model.used
        kind = self.model.push(data)
        results = [outcome(r, data) for r in self.rings]
        expected = kind if kind == "too_big" else kind != "full"
        assert results == [expected, expected], (kind, results)
        if kind == "full":
            # Never full for a record the ring accepts if it is empty.
            assert before_used > 0
        elif kind != "too_big" and self.model.used == self.model.capacity:
            COVERAGE["exact_fill"] += 1
            event("exact fill")
        if size == 0 and kind not in ("full", "too_big"):
            COVERAGE["zero_length"] += 1
        if size == self.model.max_record and kind not in ("full", "too_big"):
            COVERAGE["max_record"] += 1
        COVERAGE[kind] += 1
        event(kind)
        return kind

    @rule(size=st.one_of(st.integers(0, 40), st.integers(0, 300)))
    def push(self, size: int) -> None:
        self._push(size)

    @rule(slack=st.integers(0, 7))
    def push_to_end(self, slack: int) -> None:
        """A record whose 8-byte-padded end is exactly the end of the data area."""
        size = self.model.contig - RECORD_HEADER - slack
        if size >= 0:
            self._push(size)

    @rule(slack=st.integers(0, 7))
    def push_exact_fill(self, slack: int) -> None:
        """A record that takes exactly the free space (with its skip marker, if it wraps)."""
        free, contig = self.model.capacity - self.model.used, self.model.contig
        size = (free if free <= contig else free - contig) - RECORD_HEADER - slack
        if size >= 0:
            self._push(size)

    @rule()
    def push_max_record(self) -> None:
        self._push(self.model.max_record)

    @rule(sizes=st.lists(st.integers(0, 64), min_size=1, max_size=8))
    def fill_until_full(self, sizes: list[int]) -> None:
        for _ in range(self.model.capacity // 8 + 1):
            for size in sizes:
                if self._push(min(size, self.model.max_record)) == "full":
                    return

    @rule()
    def pop(self) -> None:
        expected = self.model.pop()
        assert [r.pop() for r in self.rings] == [expected, expected]
        if expected is None:
            COVERAGE["empty_pop"] += 1

    @rule(size=st.integers(0, 300))
    def pop_into(self, size: int) -> None:
        nxt = self.model.records[0][0] if self.model.records else None
        results = []
        for r in self.rings:
            out = bytearray(size)
            try:
                n = r.pop_into(out)
            except BufferTooSmall as exc:
                results.append(("small", exc.needed, exc.size))
            else:
                results.append(n if n is None else ("ok", bytes(out[:n])))
        if nxt is None:
            expected = None
            COVERAGE["empty_pop"] += 1
        elif len(nxt) > size:
            expected = ("small", len(nxt), size)
            COVERAGE["small_buffer"] += 1
        else:
            expected = ("ok", self.model.pop())
        assert results == [expected, expected]

    @precondition(lambda self: self.model.records)
    @rule()
    def drain(self) -> None:
        while self.model.records:
            self.pop()
        self.pop()

    @invariant()
    def agree(self) -> None:
        m = self.model
        nxt = len(m.records[0][0]) if m.records else None
        for r in self.rings:
            assert r.used == m.used and r.free == m.capacity - m.used
            assert r.capacity == m.capacity and r.max_record == m.max_record
            assert r.peek_len() == nxt
        assert self.bufs[0] == self.bufs[1]  # the same layout, byte for byte
        assert positions(self.bufs[0]) == (m.head, m.tail)


def test_differential_c_python_and_model() -> None:
    COVERAGE.clear()
    run_state_machine_as_test(
        RingMachine, settings=settings(max_examples=120, stateful_step_count=40, deadline=None))
    missing = MUST_COVER - {k for k, v in COVERAGE.items() if v}
    assert not missing, f"the state machine never hit {sorted(missing)}: {dict(COVERAGE)}"


# --- edge cases, for both implementations ---------------------------------------------------

@pytest.mark.parametrize("cls", IMPLS)
def test_empty(cls) -> None:
    r, _ = make(cls, 64)
    assert (r.pop(), r.peek_len(), r.pop_into(bytearray(8))) == (None, None, None)
    assert (r.used, r.free, r.capacity, r.max_record) == (0, 64, 64, 24)
    assert r.implementation == cls.implementation
    r.close()


@pytest.mark.parametrize("cls", IMPLS)
def test_zero_length_record_is_not_empty(cls) -> None:
    r, _ = make(cls, 64)
    assert r.push(b"")
    assert (r.used, r.peek_len()) == (8, 0)
    assert r.pop() == b""
    assert r.pop() is None
    r.close()


@pytest.mark.parametrize("cls", IMPLS)
def test_wrap_around_writes_a_skip_marker(cls) -> None:
    r, buf = make(cls, 64)
    assert r.push(payload(20, 1))  # 32 bytes at 0
    assert r.push(payload(10, 2))  # 24 bytes at 32; 8 left at 56
    assert r.pop() == payload(20, 1)  # frees 0..32
    assert r.push(payload(17, 3))  # needs 32: skip marker at 56, record at 0
    assert record_at(buf, 56) == SKIP and record_at(buf, 0) == 17
    assert positions(buf) == (64 + 32, 32) and r.used == 64
    assert r.pop() == payload(10, 2)
    assert r.peek_len() == 17
    assert r.pop() == payload(17, 3)
    assert r.pop() is None and r.used == 0
    r.close()


@pytest.mark.parametrize("cls", IMPLS)
def test_exact_fit_at_the_end_needs_no_skip(cls) -> None:
    r, buf = make(cls, 64)
    assert r.push(payload(16, 1)) and r.push(payload(16, 2))  # 24 + 24 bytes
    assert r.pop() == payload(16, 1)
    assert r.push(payload(5, 3))  # 8 + 8: exactly the 16 bytes left before the end
    assert record_at(buf, 48) == 5 and positions(buf) == (64, 24)
    assert r.push(payload(8, 4))  # 16 bytes at offset 0, no marker
    assert record_at(buf, 0) == 8 and positions(buf) == (80, 24)
    assert [r.pop(), r.pop(), r.pop()] == [payload(16, 2), payload(5, 3), payload(8, 4)]
    r.close()


@pytest.mark.parametrize("cls", IMPLS)
def test_full_exactly_then_drain(cls) -> None:
    r, _ = make(cls, 64)
    assert r.push(payload(24)) and r.push(payload(20))  # 32 + 32: exactly full
    assert (r.used, r.free) == (64, 0)
    assert not r.push(b"")  # not even an empty record
    assert r.pop() == payload(24)
    assert r.push(payload(24))  # into the 32 bytes just freed at offset 0: full again
    assert (r.used, r.free) == (64, 0) and not r.push(b"")
    assert [r.pop(), r.pop(), r.pop()] == [payload(20), payload(24), None]
    r.close()


@pytest.mark.parametrize("cls", IMPLS)
def test_full_returns_false_and_keeps_everything(cls) -> None:
    r, _ = make(cls, 256)
    pushed = []
    while r.push(payload(13, len(pushed))):
        pushed.append(payload(13, len(pushed)))
    assert len(pushed) == 256 // 24 and r.free == 256 - 24 * len(pushed)
    assert [r.pop() for _ in pushed] == pushed
    assert r.pop() is None
    r.close()


@pytest.mark.parametrize("cls", IMPLS)
def test_max_record_always_fits_an_empty_ring(cls) -> None:
    """Wherever the positions stand, an empty ring takes a record of max_record bytes (so a
    producer waiting on a full ring is never stuck), and max_record + 1 is always refused."""
    for capacity in (16, 64, 72, 200):
        r, _ = make(cls, capacity)
        big = payload(r.max_record, 7)
        for _ in range(capacity // 8 + 1):
            assert r.push(big) and r.pop() == big
            assert r.push(b"") and r.pop() == b""  # move the positions on by 8
        with pytest.raises(RecordTooLarge) as info:
            r.push(bytes(r.max_record + 1))
        assert (info.value.size, info.value.limit) == (r.max_record + 1, r.max_record)
        assert isinstance(info.value, RingError) and isinstance(info.value, ZipError)
        r.close()
    assert max_record_for(16) == 0 and max_record_for(64) == 24 and max_record_for(72) == 32
    assert max_record_for(80) == 32


@pytest.mark.parametrize("cls", IMPLS)
def test_pop_into(cls) -> None:
    r, _ = make(cls, 128)
    r.push(b"hello world")
    with pytest.raises(BufferTooSmall) as info:
        r.pop_into(bytearray(10))
    assert (info.value.needed, info.value.size) == (11, 10)
    assert r.peek_len() == 11  # still there
    out = np.zeros(4, dtype=np.uint32)  # 16 bytes
    assert r.pop_into(out) == 11
    assert out.tobytes()[:11] == b"hello world"
    assert r.pop_into(bytearray(100)) is None
    with pytest.raises(TypeError):
        r.pop_into(b"read-only")
    r.close()


@pytest.mark.parametrize("cls", IMPLS)
def test_push_takes_contiguous_bytes_likes(cls) -> None:
    r, _ = make(cls, 256)
    arr = np.arange(6, dtype=np.int32)
    for data in (bytearray(b"ab"), memoryview(b"cd"), arr, memoryview(arr)):
        assert r.push(data)
    assert [r.pop() for _ in range(4)] == [b"ab", b"cd", arr.tobytes(), arr.tobytes()]
    for bad in ("text", 42, np.arange(10)[::2]):
        with pytest.raises(TypeError):
            r.push(bad)
    assert r.used == 0
    r.close()


@pytest.mark.parametrize("cls", IMPLS)
def test_wait_variants_time_out_with_typed_errors(cls) -> None:
    r, _ = make(cls, 64)
    with pytest.raises(RingEmpty) as empty:
        r.pop_wait(timeout=0.02)
    assert isinstance(empty.value, ZipTimeout)
    r.push_wait(payload(24), timeout=0)
    r.push_wait(payload(24), timeout=1)
    t0 = time.monotonic()
    with pytest.raises(RingFull) as full:
        r.push_wait(b"", timeout=0.05)
    assert isinstance(full.value, ZipTimeout) and time.monotonic() - t0 >= 0.05
    with pytest.raises(RecordTooLarge):
        r.push_wait(bytes(25), timeout=10)  # at once, not after the timeout
    assert r.pop_wait(timeout=0) == payload(24)
    r.close()


@pytest.mark.parametrize("cls", IMPLS)
def test_close(cls) -> None:
    shm = shared_memory.SharedMemory(create=True, size=memory_size(128))
    try:
        r = cls.create(shm.buf)
        r.push(b"x")
        with r:
            assert not r.closed
        assert r.closed and repr(r).endswith("closed>")
        r.close()  # idempotent
        for op in (lambda: r.push(b"y"), r.pop, r.peek_len, lambda: r.pop_into(bytearray(8)),
                   lambda: r.used, lambda: r.free):
            with pytest.raises(RingClosed):
                op()
        r2 = cls.attach(shm.buf)  # the record survived
        assert r2.pop() == b"x"
        r2.close()
    finally:
        shm.close()  # fails with BufferError if a ring still held the memory
        shm.unlink()


@pytest.mark.parametrize("cls", IMPLS)
def test_layout(cls) -> None:
    r, buf = make(cls, 100)  # memory_size rounds the capacity up to 104
    assert len(buf) == HEADER_SIZE + 104 and r.capacity == 104
    r.close()
    buf = bytearray(HEADER_SIZE + 100)
    r = cls.create(buf)  # create rounds the capacity down to 96
    magic, version, header_size, capacity = struct.unpack_from("=QIIQ", buf, 0)
    assert (magic, version, header_size, capacity) == (ringmod.MAGIC, 1, HEADER_SIZE, 96)
    assert r.push(b"abc")
    assert struct.unpack_from("=II3s", buf, HEADER_SIZE) == (3, 0, b"abc")
    assert positions(buf) == (16, 0)
    r.pop()
    assert positions(buf) == (16, 16)
    r.close()


# --- cross-attach: either implementation reads what the other wrote -------------------------

@pytest.mark.parametrize("producer_cls,consumer_cls", PAIRS)
def test_cross_attach_same_memory(producer_cls, consumer_cls) -> None:
    buf = bytearray(memory_size(200))
    producer = producer_cls.create(buf)
    consumer = consumer_cls.attach(buf)
    expected: deque[bytes] = deque()
    for i in range(400):
        data = payload((i * 37) % (producer.max_record + 1), i)
        if producer.push(data):
            expected.append(data)
        if i % 3:
            assert consumer.pop() == (expected.popleft() if expected else None)
        assert producer.used == consumer.used
    while expected:
        assert consumer.pop() == expected.popleft()
    assert consumer.pop() is None and producer.used == 0
    producer.close()
    consumer.close()


PRODUCER = r"""
import sys
from multiprocessing import resource_tracker, shared_memory
from zipcomm.ring import CRing, PyRing
exec(sys.argv[5])  # defines record(seq)
name, impl, count, timeout = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
shm = shared_memory.SharedMemory(name=name)
resource_tracker.unregister(shm._name, "shared_memory")  # the test process owns the segment
ring = {"c": CRing, "python": PyRing}[impl].attach(shm.buf)
try:
    for seq in range(count):
        ring.push_wait(record(seq), timeout=timeout)
finally:
    ring.close()
    shm.close()
"""

RECORD = r"""
import random, struct, zlib
BLOCK = random.Random(2024).randbytes(1 << 16)
def record(seq):
    start = (seq * 104729) % (len(BLOCK) - 300)
    body = BLOCK[start:start + (seq * 7919) % 301]
    return struct.pack("<QI", seq, zlib.crc32(body)) + body
"""
_ns: dict = {}
exec(RECORD, _ns)
record = _ns["record"]


@pytest.mark.slow
@pytest.mark.parametrize("producer_cls,consumer_cls", PAIRS)
def test_two_processes(producer_cls, consumer_cls) -> None:
    """A producer process pushes 20,000 records (sequence number, CRC, 0..300 random bytes)
    through a 4 KiB ring in shared memory; this process pops and checks every one, in order."""
    count, deadline_s = 20_000, 30.0
    shm = shared_memory.SharedMemory(create=True, size=memory_size(4096))
    ring = consumer_cls.create(shm.buf)
    proc = subprocess.Popen(
        [sys.executable, "-c", PRODUCER, shm.name, producer_cls.implementation, str(count),
         str(deadline_s), RECORD],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + deadline_s
        seq = 0
        while seq < count:
            try:
                got = ring.pop_wait(timeout=0.2)
            except RingEmpty:
                if proc.poll() is not None and ring.peek_len() is None:
                    out, err = proc.communicate()
                    pytest.fail(f"producer exited ({proc.returncode}) after {seq} records:\n"
                                f"{err.decode()}")
                assert time.monotonic() < deadline, f"only {seq} of {count} records in time"
                continue
            nr, crc = struct.unpack_from("<QI", got)
            assert nr == seq, f"record {nr} arrived where {seq} was expected"
            assert crc == zlib.crc32(got[12:]) and got == record(seq)
            seq += 1
        assert proc.wait(timeout=max(deadline - time.monotonic(), 1)) == 0, proc.stderr.read()
        assert ring.pop() is None and ring.used == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        proc.stdout.close()
        proc.stderr.close()
        ring.close()
        shm.close()
        shm.unlink()


# --- attach validation ------------------------------------------------------------------------

@pytest.mark.parametrize("cls", IMPLS)
def test_attach_garbage_is_corrupt(cls) -> None:
    for garbage in (bytearray(1024), bytearray(np.random.default_rng(1).bytes(1024))):
        with pytest.raises(RingCorrupt, match="magic"):
            cls.attach(garbage)


@pytest.mark.parametrize("cls", IMPLS)
def test_too_small_or_unusable_memory(cls) -> None:
    small = bytearray(HEADER_SIZE + MIN_CAPACITY - 1)
    for op in (cls.create, cls.attach):
        with pytest.raises(InvalidRingMemory, match="too small"):
            op(small)
        with pytest.raises(InvalidRingMemory, match="writable"):
            op(bytes(1024))
        with pytest.raises(InvalidRingMemory, match="aligned"):
            op(memoryview(bytearray(1024))[1:])
        with pytest.raises(InvalidRingMemory):
            op(42)
    big = bytearray(1024)
    cls.create(big).close()
    with pytest.raises(InvalidRingMemory, match="does not fit"):
        cls.attach(memoryview(big)[:512])  # the ring it holds is larger than this view
    assert issubclass(InvalidRingMemory, ValueError)


@pytest.mark.parametrize("cls", IMPLS)
def test_corrupt_header_positions_and_records(cls) -> None:
    def fresh():
        buf = bytearray(memory_size(128))
        cls.create(buf).close()
        return buf

    buf = fresh()
    struct.pack_into("=I", buf, 8, 99)
    with pytest.raises(RingCorrupt, match="version 99"):
        cls.attach(buf)
    buf = fresh()
    struct.pack_into("=Q", buf, 16, 100)  # capacity not a multiple of 8
    with pytest.raises(RingCorrupt):
        cls.attach(buf)
    buf = fresh()
    struct.pack_into("=Q", buf, HEAD_OFFSET, 136)  # head - tail > capacity
    with pytest.raises(RingCorrupt):
        cls.attach(buf)

    buf = fresh()
    r = cls.attach(buf)
    r.push(b"12345")
    struct.pack_into("=I", buf, HEADER_SIZE, 200)  # a length beyond the record's space
    with pytest.raises(RingCorrupt):
        r.pop()
    with pytest.raises(RingCorrupt):
        r.peek_len()
    struct.pack_into("=Q", buf, HEAD_OFFSET, 12)  # unaligned head (after attach)
    with pytest.raises(RingCorrupt):
        r.push(b"x")
    struct.pack_into("=Q", buf, TAIL_OFFSET, 1000)  # tail beyond head
    with pytest.raises(RingCorrupt):
        r.used
    r.close()


# --- selection by ZIPCOMM_RING ----------------------------------------------------------------

SELECT = r"""
import importlib, json, os, sys
import zipcomm, zipcomm.ring
results = {}
for value, hide_c in [(None, False), ("c", False), ("python", False), ("bogus", False),
                      (None, True), ("c", True)]:
    os.environ.pop("ZIPCOMM_RING", None)
    if value is not None:
        os.environ["ZIPCOMM_RING"] = value
    if hide_c:  # as if the extension were not built: `from . import _ring_c` fails
        sys.modules["zipcomm._ring_c"] = None
        zipcomm.__dict__.pop("_ring_c", None)
    try:
        results[f"{value}/{hide_c}"] = importlib.reload(zipcomm.ring).implementation()
    except ImportError as exc:
        results[f"{value}/{hide_c}"] = "ImportError: " + str(exc)
print(json.dumps(results))
"""


def test_selection_by_environment() -> None:
    env = {k: v for k, v in os.environ.items() if k != "ZIPCOMM_RING"}
    proc = subprocess.run([sys.executable, "-c", SELECT], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout)
    assert got["None/False"] == "c" and got["c/False"] == "c"
    assert got["python/False"] == "python"
    assert got["bogus/False"].startswith("ImportError: ZIPCOMM_RING='bogus'")
    assert got["None/True"] == "python"  # default: fall back quietly
    assert got["c/True"].startswith("ImportError: ZIPCOMM_RING=c but the C ring extension")
    assert "pip install -e ." in got["c/True"]


def test_selected_implementation_matches_environment() -> None:
    expected = os.environ.get("ZIPCOMM_RING") or "c"
    assert ringmod.implementation() == expected
    assert ringmod.Ring is {"c": CRing, "python": PyRing}[expected]
