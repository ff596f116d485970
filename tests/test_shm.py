"""The daemon's shared-memory arena (zipcomm.shm), with real processes and real /dev/shm.

* the range allocator against a model (Hypothesis);
* 100 MB written by the owner, read zero-copy by a member in another process;
* a member that exits or is SIGKILLed never takes the segment with it (resource-tracker trap);
* a crashed daemon's segments are swept by the next one, and nothing else is;
* a full /dev/shm (1 MiB tmpfs in a private mount namespace) is ArenaUnavailable, not SIGBUS;
* a process of another uid cannot attach;
* read-only views and their release callback.

Children are synchronised by lines on their stdout read with deadlines, never by sleeping.
"""
from __future__ import annotations

import errno
import gc
import hashlib
import json
import os
import re
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from zipcomm import shm as shmmod
from zipcomm.errors import ArenaAttachError, ArenaError, ArenaFull, ArenaUnavailable, ZipError
from zipcomm.shm import ALIGN, Arena, Attachment, SegmentLedger, segment_exists, sweep

ROOT = Path(__file__).resolve().parent.parent
SHM = Path("/dev/shm")
PRELUDE = """\
import errno, hashlib, json, os, sys
import numpy as np
from zipcomm.errors import *
from zipcomm.shm import *
"""


class Child:
    """A Python child process running PRELUDE + *code*; lines of its stdout are read with a
    deadline.  Killed (SIGKILL) and reaped on exit if still running."""

    def __init__(self, code: str, *, argv: tuple[str, ...] = ()) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", PRELUDE + code, *argv], cwd=ROOT,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE)
        self._buf = b""

    def readline(self, timeout: float = 30.0) -> str:
        deadline = time.monotonic() + timeout
        fd = self.proc.stdout.fileno()
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            assert left > 0, f"no line from the child within {timeout} s"
            if select.select([fd], [], [], left)[0]:
                chunk = os.read(fd, 1 << 16)
                if not chunk:
                    self.proc.wait(10)
                    pytest.fail(f"the child exited ({self.proc.returncode}) before writing a line:\n"
                                f"{self.proc.stderr.read().decode()}")
                self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        return line.decode()

    def finish(self, timeout: float = 30.0) -> tuple[int, str, str]:
        """Close its stdin, wait for its exit *and* for every holder of its stdout/stderr
        (a resource tracker it started would hold stderr until its cleanup is done)."""
        out, err = self.proc.communicate(timeout=timeout)
        return self.proc.returncode, self._buf.decode() + out.decode(), err.decode()

    def kill(self, timeout: float = 30.0) -> tuple[int, str, str]:
        self.proc.send_signal(signal.SIGKILL)
        return self.finish(timeout)

    def __enter__(self) -> Child:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.communicate(timeout=30)


def run_child(code: str, *, timeout: float = 60.0, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-c", PRELUDE + code], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)
    if check:
        assert done.returncode == 0, done.stderr
    return done


def unlink_quietly(name: str) -> None:
    try:
        os.unlink(SHM / name)
    except FileNotFoundError:
        pass


def mapped_in_this_process(name: str) -> bool:
    return f"/dev/shm/{name}" in Path("/proc/self/maps").read_text()


# --- allocator -------------------------------------------------------------------------------


def round_up(n: int) -> int:
    return max(ALIGN, -(-n // ALIGN) * ALIGN)


def gaps(live: dict[int, int], capacity: int) -> list[tuple[int, int]]:
    """The free ranges (start, size) that the model implies."""
    out, pos = [], 0
    for start in sorted(live):
        if start > pos:
            out.append((pos, start - pos))
        pos = start + live[start]
    if capacity > pos:
        out.append((pos, capacity - pos))
    return out


OPS = st.lists(st.one_of(st.tuples(st.just("alloc"), st.integers(0, 2500)),
                         st.tuples(st.just("free"), st.integers(0, 1 << 16))),
               max_size=60)


@settings(max_examples=300, deadline=None)
@given(size=st.integers(ALIGN, 8192), ops=OPS)
def test_alloc_free_against_a_model(size: int, ops: list[tuple[str, int]]) -> None:
    with Arena.create(size, tag="hyp") as arena:
        capacity = size - size % ALIGN
        assert arena.capacity == capacity and arena.size == size
        live: dict[int, int] = {}  # offset -> rounded size
        for op, n in ops:
            if op == "alloc":
                need = round_up(n)
                fits = [g for g in gaps(live, capacity) if g[1] >= need]
                if not fits:
                    largest = max((g[1] for g in gaps(live, capacity)), default=0)
                    with pytest.raises(ArenaFull) as full:
                        arena.alloc(n)
                    assert (full.value.requested, full.value.largest_free) == (n, largest)
                    assert f"{n} bytes" in str(full.value) and f"{largest} bytes" in str(full.value)
                    continue
                off = arena.alloc(n)
                assert off % ALIGN == 0 and 0 <= off and off + need <= capacity
                assert any(s <= off and off + need <= s + g for s, g in fits), "overlaps a live range"
                assert arena.size_of(off) == need
                live[off] = need
            elif live:
                off = sorted(live)[n % len(live)]
                arena.free(off)
                del live[off]
                with pytest.raises(ArenaError, match="double free"):
                    arena.free(off)
            else:
                with pytest.raises(ArenaError):
                    arena.free(n % (capacity + ALIGN))
            assert arena.used == sum(live.values())
            assert arena.free_bytes == capacity - arena.used
            assert arena.largest_free == max((g[1] for g in gaps(live, capacity)), default=0)
        for off in list(live):
            arena.free(off)
        assert arena.used == 0 and arena.free_bytes == capacity == arena.largest_free
        assert arena.alloc(capacity) == 0  # every free range coalesced back into one
        with pytest.raises(ArenaFull):
            arena.alloc(0)
        arena.free(0)


def test_alloc_edge_cases() -> None:
    with Arena.create(1000, tag="edge") as arena:
        assert arena.capacity == 960
        a, b = arena.alloc(0), arena.alloc(0)
        assert a != b and arena.size_of(a) == arena.size_of(b) == ALIGN and arena.used == 2 * ALIGN
        c = arena.alloc(65)
        assert arena.size_of(c) == 2 * ALIGN and c % ALIGN == 0
        for bad in (1, c + ALIGN, 10**6, -ALIGN):
            with pytest.raises(ArenaError):
                arena.free(bad)
        with pytest.raises(ValueError):
            arena.alloc(-1)
        with pytest.raises(TypeError):
            arena.alloc(1.5)
        with pytest.raises(ArenaFull):
            arena.alloc(10**12)
        arena.free(b)
        assert arena.alloc(ALIGN) == b  # first fit reuses the hole
    assert arena.closed and repr(arena).endswith("closed>")
    arena.close()  # idempotent
    for op in (lambda: arena.alloc(1), lambda: arena.free(0), lambda: arena.buf,
               lambda: arena.ndarray(0, "u1", 1)):
        with pytest.raises(ArenaError, match="closed"):
            op()
    assert issubclass(ArenaError, ZipError)
    for cls in (ArenaUnavailable, ArenaFull, ArenaAttachError):
        assert issubclass(cls, ArenaError)


def test_create_names_mode_and_validation() -> None:
    with Arena.create(4096, tag="t0") as arena:
        assert re.fullmatch(r"zc_t0_[0-9a-f]{32}", arena.name)
        st_ = os.stat(SHM / arena.name)
        assert (st_.st_mode & 0o7777, st_.st_uid, st_.st_size) == (0o600, os.geteuid(), 4096)
        assert st_.st_blocks * 512 >= 4096, "the pages were not preallocated"
        assert segment_exists(arena.name)
    assert not segment_exists(arena.name) and not (SHM / arena.name).exists()
    with Arena.create(64) as untagged:
        assert re.fullmatch(r"zc__[0-9a-f]{32}", untagged.name)
    for tag in ("A", "a-b", "x" * 17, "../x", "é"):
        with pytest.raises(ValueError, match="tag"):
            Arena.create(4096, tag=tag)
    for size in (0, -1, ALIGN - 1):
        with pytest.raises(ValueError):
            Arena.create(size)
    with pytest.raises(TypeError):
        Arena(4096)
    with pytest.raises(TypeError):
        Attachment()


def test_the_resource_tracker_is_never_involved(monkeypatch: pytest.MonkeyPatch) -> None:
    from multiprocessing import resource_tracker

    def refuse(*args: object) -> None:
        raise AssertionError(f"resource tracker called with {args}")

    monkeypatch.setattr(resource_tracker, "register", refuse)
    monkeypatch.setattr(resource_tracker, "unregister", refuse)
    with Arena.create(4096, tag="rt") as arena:
        Attachment.open(arena.name, arena.size).close()
        Attachment.open(arena.name, arena.size, readonly=True).close()


# --- zero-copy across processes --------------------------------------------------------------

BIG = 100 * 2**20

READER = """
name, size, off, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
att = Attachment.open(name, size)
arr = att.view(off, np.uint8, (n,))
addr = arr.__array_interface__["data"][0]
print(json.dumps({
    "sha256": hashlib.sha256(arr).hexdigest(),
    "inside": att.address <= addr and addr + arr.nbytes <= att.address + att.size,
    "at_offset": addr == att.address + off,
    "writeable": bool(arr.flags.writeable),
}), flush=True)
"""


@pytest.mark.slow
def test_100mb_range_read_zero_copy_by_another_process() -> None:
    with Arena.create(BIG + 4096, tag="big") as arena:
        arena.alloc(100)  # so that the big range does not start at 0
        off = arena.alloc(BIG)
        assert off == 2 * ALIGN
        data = arena.ndarray(off, np.uint8, (BIG,))
        np.random.default_rng(2024).random(out=data.view(np.float64))  # filled in place
        digest = hashlib.sha256(data).hexdigest()

        with Child(READER, argv=(arena.name, str(arena.size), str(off), str(BIG))) as reader:
            seen = json.loads(reader.readline(timeout=60))
            assert reader.finish()[0] == 0
        assert seen == {"sha256": digest, "inside": True, "at_offset": True, "writeable": False}

        # in this process: the member's array lies inside the member's own mapping of the
        # segment, and it is that mapping (not a copy) -- a later write by the owner shows
        with Attachment.open(arena.name, arena.size) as att:
            view = att.view(off, np.uint8, (BIG,))
            addr = view.__array_interface__["data"][0]
            assert att.address <= addr and addr + BIG <= att.address + att.size
            assert addr == att.address + off and att.address != arena.address
            assert np.shares_memory(view, att.view(off + BIG // 2, np.uint8, (16,)))
            assert hashlib.sha256(view).hexdigest() == digest
            data[BIG - 1] ^= 0xFF
            data[12345] = view[12345] ^ 0x5A
            assert view[BIG - 1] == data[BIG - 1] and view[12345] == data[12345]
            del view
        del data


# --- members never unlink ------------------------------------------------------------------

ATTACHER = """
name, size, off = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
att = Attachment.open(name, size)
arr = att.view(off, np.int64, (1000,), on_release=lambda: None)
assert int(arr.sum()) == 999 * 1000 // 2
print("ready", flush=True)
sys.stdin.read()  # until the test closes our stdin (or kills us)
"""


@pytest.mark.slow
@pytest.mark.parametrize("end", ["exit", "sigkill"])
def test_segment_survives_its_attacher(end: str) -> None:
    with Arena.create(1 << 20, tag="surv") as arena:
        off = arena.alloc(8000)
        arena.ndarray(off, np.int64, (1000,))[:] = np.arange(1000)
        with Child(ATTACHER, argv=(arena.name, str(arena.size), str(off))) as child:
            assert child.readline() == "ready"
            code, _, err = child.finish() if end == "exit" else child.kill()
        assert code == (0 if end == "exit" else -signal.SIGKILL), err
        assert (SHM / arena.name).exists()
        with Attachment.open(arena.name, arena.size) as again:  # by name: the same bytes
            assert np.array_equal(again.view(off, np.int64, (1000,)), np.arange(1000))


@pytest.mark.slow
def test_the_trap_is_real_for_a_plain_shared_memory_attach() -> None:
    """Control: the check above does catch the 3.11 behaviour -- a plain
    ``SharedMemory(name)`` attach takes the segment with it when the attacher exits."""
    arena = Arena.create(4096, tag="trap")
    try:
        code = ("from multiprocessing import shared_memory\n"
                "shared_memory.SharedMemory(name=sys.argv[1]).close()\n")
        with Child(code, argv=(arena.name,)) as child:
            rc, _, err = child.finish()  # returns once the child's resource tracker is done too
        assert rc == 0, err
        assert not (SHM / arena.name).exists()
    finally:
        arena.close()  # the name is already gone: close() copes


# --- crash recovery -----------------------------------------------------------------------

DAEMON = """
ledger = SegmentLedger(sys.argv[1])
a = Arena.create(65536, tag="crash", ledger=ledger)
b = Arena.create(4096, tag="crash", ledger=ledger)
a.buf[:5] = b"hello"
print(json.dumps([a.name, b.name]), flush=True)
sys.stdin.read()
"""


@pytest.mark.slow
def test_sweep_removes_the_segments_of_a_crashed_daemon_and_nothing_else(tmp_path: Path) -> None:
    path = tmp_path / "daemon.ledger"
    names: list[str] = []
    stranger = Arena.create(4096, tag="crash")  # zc_ name, live, not in the ledger
    victim = SHM / f"zctest-victim-{os.getpid()}"    # not a zipcomm name
    victim.write_bytes(b"keep me")
    try:
        with Child(DAEMON, argv=(str(path),)) as daemon:
            names = json.loads(daemon.readline())
            assert all((SHM / n).exists() for n in names)
            state = json.loads(path.read_text())
            assert state["pid"] == daemon.proc.pid and state["segments"] == names
            # while the daemon lives: nothing is swept, and no second daemon takes the file
            assert json.loads(run_child(f"print(json.dumps(sweep({str(path)!r})))").stdout) == []
            assert all((SHM / n).exists() for n in names)
            with pytest.raises(ArenaError, match="running process"):
                SegmentLedger(path)
            assert daemon.kill()[0] == -signal.SIGKILL
        assert all((SHM / n).exists() for n in names), "something unlinked them at the crash"
        # a tampered ledger must not make sweep touch anything that is not a zipcomm segment
        state = json.loads(path.read_text())
        state["segments"] += [victim.name, "../" + stranger.name, stranger.name + "x"]
        path.write_text(json.dumps(state))

        swept = json.loads(run_child(f"print(json.dumps(sweep({str(path)!r})))").stdout)
        assert sorted(swept) == sorted(names)
        assert not any((SHM / n).exists() for n in names)
        assert segment_exists(stranger.name) and victim.read_bytes() == b"keep me"
        assert not path.exists()
        assert sweep(path) == []  # nothing left to do
    finally:
        stranger.close()
        victim.unlink(missing_ok=True)
        for name in names:
            unlink_quietly(name)


def test_ledger_records_and_forgets(tmp_path: Path) -> None:
    path = tmp_path / "state" / "ledger"
    path.parent.mkdir()
    ledger = SegmentLedger(path)
    assert ledger.owner_pid == os.getpid() and ledger.swept == []
    with Arena.create(4096, tag="led", ledger=ledger) as a:
        assert ledger.names == [a.name]
        assert json.loads(path.read_text())["segments"] == [a.name]
        with pytest.raises(ValueError):
            ledger.record("not-a-segment")
    assert ledger.names == [] and json.loads(path.read_text())["segments"] == []
    with pytest.raises(ArenaUnavailable):  # a failed creation leaves no record behind
        Arena.create(1 << 60, tag="led", ledger=ledger)
    assert ledger.names == [] and json.loads(path.read_text())["segments"] == []
    assert sorted(os.listdir(path.parent)) == ["ledger"]  # no temp files left
    assert oct(path.stat().st_mode & 0o777) == oct(0o600)
    # the same pid counts as a previous incarnation: a new ledger sweeps what is recorded
    leftover = Arena.create(4096, tag="led", ledger=ledger)
    again = SegmentLedger(path)
    assert again.swept == [leftover.name] and not segment_exists(leftover.name)
    leftover._ledger = None
    leftover.close()
    again.close()
    assert not path.exists()


def test_a_file_that_is_not_a_ledger_is_left_alone(tmp_path: Path) -> None:
    path = tmp_path / "ledger"
    for text in ("garbage", '{"pid": "1", "segments": []}', '{"segments": []}', "[]"):
        path.write_text(text)
        with pytest.raises(ArenaError, match="not a valid ledger"):
            sweep(path)
        with pytest.raises(ArenaError, match="not a valid ledger"):
            SegmentLedger(path)
        assert path.read_text() == text


# --- a full /dev/shm ---------------------------------------------------------------------------

FULL = """
try:
    Arena.create(4 << 20, tag="full")
except ArenaUnavailable as exc:
    assert exc.__cause__.errno == errno.ENOSPC, exc
else:
    sys.exit(3)
assert os.listdir("/dev/shm") == [], os.listdir("/dev/shm")  # nothing left behind
with Arena.create(256 << 10, tag="fits") as arena:
    off = arena.alloc(200 << 10)
    arena.ndarray(off, np.uint8, (200 << 10,))[:] = 7
    assert int(arena.ndarray(off, np.uint8, (200 << 10,)).sum()) == 7 * (200 << 10)
assert os.listdir("/dev/shm") == []
sys.exit(42)
"""

UNPREALLOCATED = """
import mmap, _posixshmem
fd = _posixshmem.shm_open("/zc_sigbus", os.O_CREAT | os.O_RDWR, mode=0o600)
os.ftruncate(fd, 4 << 20)          # what SharedMemory(create=True) does: no pages reserved
mm = mmap.mmap(fd, 4 << 20)
mm[:] = bytes(4 << 20)              # SIGBUS once the 1 MiB tmpfs runs out
sys.exit(0)
"""


def in_small_dev_shm(code: str) -> subprocess.CompletedProcess:
    """Run PRELUDE + code in a private mount namespace whose /dev/shm is a 1 MiB tmpfs."""
    return subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c",
         'mount -t tmpfs -o size=1m,mode=1777 zctest /dev/shm && exec "$0" -c "$1"',
         sys.executable, PRELUDE + code],
        cwd=ROOT, capture_output=True, text=True, timeout=60)


@pytest.mark.slow
def test_full_dev_shm_is_arena_unavailable_not_sigbus() -> None:
    done = in_small_dev_shm(FULL)
    assert done.returncode == 42, done.stderr
    control = in_small_dev_shm(UNPREALLOCATED)  # why Arena.create preallocates
    assert control.returncode == -signal.SIGBUS, control.stderr


# --- another uid ---------------------------------------------------------------------------

NOBODY = """
name, size = sys.argv[1], int(sys.argv[2])
os.setgroups([])
os.setgid(65534)
os.setuid(65534)
assert (os.getuid(), os.geteuid(), os.getgid(), os.getegid()) == (65534,) * 4
result = {}
for readonly in (False, True):
    try:
        Attachment.open(name, size, readonly=readonly)
    except ArenaAttachError as exc:
        result[f"readonly={readonly}"] = type(exc.__cause__).__name__
try:
    os.unlink("/dev/shm/" + name)
except OSError as exc:
    result["unlink"] = type(exc).__name__
print(json.dumps(result), flush=True)
"""


@pytest.mark.slow
def test_another_uid_cannot_attach() -> None:
    assert os.geteuid() == 0, "this test drops from root to nobody"
    with Arena.create(4096, tag="uid") as arena:
        arena.buf[:6] = b"secret"
        done = run_child(NOBODY.replace("sys.argv[1], int(sys.argv[2])",
                                        f"{arena.name!r}, {arena.size}"))
        assert json.loads(done.stdout) == {"readonly=False": "PermissionError",
                                           "readonly=True": "PermissionError",
                                           "unlink": "PermissionError"}
        assert segment_exists(arena.name) and bytes(arena.buf[:6]) == b"secret"


# --- attach checks, views, release ------------------------------------------------------------


def test_attach_refusals() -> None:
    with Arena.create(8192, tag="att") as arena:
        with pytest.raises(ArenaAttachError, match="8192"):
            Attachment.open(arena.name, 4096)
        for bad in ("zc_att_" + "0" * 32, "../" + arena.name, "vader_segment", arena.name.upper()):
            with pytest.raises(ArenaAttachError) as info:
                Attachment.open(bad, 8192)
            assert bad != "zc_att_" + "0" * 32 or isinstance(info.value.__cause__, FileNotFoundError)
        os.chmod(SHM / arena.name, 0o640)
        with pytest.raises(ArenaAttachError, match="other users"):
            Attachment.open(arena.name, 8192)
        os.chmod(SHM / arena.name, 0o600)
        with Attachment.open(arena.name, 8192, readonly=True) as ro:
            assert ro.view(0, "u1", 4).tolist() == [0, 0, 0, 0]
            with pytest.raises(ArenaError, match="read-only"):
                ro.writable(0, "u1", 4)
    with pytest.raises(ArenaAttachError, match="does not exist"):
        Attachment.open(arena.name, 8192)


def test_views_are_read_only_and_the_member_fills_its_range() -> None:
    with Arena.create(1 << 16, tag="ro") as arena, Attachment.open(arena.name, arena.size) as att:
        off = arena.alloc(800)
        att.writable(off, np.float64, (10, 10))[:] = np.eye(10)  # the member fills its range
        assert np.array_equal(arena.ndarray(off, np.float64, (10, 10)), np.eye(10))
        view = att.view(off, np.float64, (10, 10))
        assert not view.flags.writeable
        derived = [view, view[2:5], view.T, view.reshape(100), view.view(np.int64), view[::2, 1]]
        for arr in derived:
            with pytest.raises(ValueError):
                arr[0] = 1
            with pytest.raises(ValueError):
                arr.flags.writeable = True
            with pytest.raises(ValueError):
                np.add(arr, 1, out=arr)
        with pytest.raises(TypeError):
            memoryview(view).cast("B")[0] = 1
        assert np.array_equal(view, np.eye(10))
        for bad in ((-1, "u1", 1), (arena.size - 7, np.float64, 1), (0, "u1", (2, -1))):
            with pytest.raises(ValueError):
                att.view(*bad)
        with pytest.raises(TypeError):
            att.view(off, object, 3)
        ro = arena.ndarray(off, np.float64, 3, readonly=True)
        with pytest.raises(ValueError):
            ro.flags.writeable = True
        assert att.view(arena.size, "u1", 0).shape == (0,)


def test_on_release_fires_once_when_every_derived_array_is_gone() -> None:
    calls: list[str] = []
    with Arena.create(1 << 16, tag="rel") as arena, Attachment.open(arena.name, arena.size) as att:
        off = arena.alloc(4000)
        arena.ndarray(off, np.int32, (1000,))[:] = np.arange(1000)
        arr = att.view(off, np.int32, (10, 100), on_release=lambda: calls.append("a"))
        part = arr[3, 10:20]
        kept = [part.view(np.uint8), arr.T[::7], np.asarray(arr).reshape(1000)[5:], memoryview(arr[9])]
        del arr
        gc.collect()
        assert calls == []  # the slices keep it alive
        assert part.tolist() == list(range(310, 320))
        del part
        gc.collect()
        assert calls == []
        while kept:
            assert calls == []
            kept.pop()
            gc.collect()
        assert calls == ["a"]
        gc.collect()
        assert calls == ["a"]

        # independent views release independently; a view without a callback has none
        a = att.view(off, np.int32, 10, on_release=lambda: calls.append("b"))
        b = att.view(off, np.int32, 10, on_release=lambda: calls.append("c"))
        att.view(off, np.int32, 10)
        del b
        gc.collect()
        assert calls == ["a", "c"]
        att.close()  # with `a` alive: a's memory stays mapped, the callback still comes once
        assert a.sum() == 45
        del a
        gc.collect()
        assert calls == ["a", "c", "b"]


def test_close_with_live_views_defers_the_unmap() -> None:
    arena = Arena.create(1 << 16, tag="defer")
    name = arena.name
    owner_view = arena.ndarray(0, np.uint8, 16)
    owner_view[:] = 9
    att = Attachment.open(name, arena.size)
    member_view = att.view(0, np.uint8, 16)[4:]
    arena.close()  # unlinks at once; cannot unmap while owner_view lives
    assert not segment_exists(name)
    with pytest.raises(ArenaAttachError):
        Attachment.open(name, 1 << 16)
    att.close()
    assert owner_view.sum() == 9 * 16 and member_view.sum() == 9 * 12  # still mapped, no crash
    owner_view[0] = 1
    with pytest.raises(ArenaError, match="closed"):
        att.view(0, "u1", 1)
    assert mapped_in_this_process(name)
    del owner_view, member_view
    gc.collect()
    assert not mapped_in_this_process(name)  # unmapped with the last view


def test_a_forgotten_arena_is_unlinked_when_collected(tmp_path: Path) -> None:
    ledger = SegmentLedger(tmp_path / "ledger")
    arena = Arena.create(4096, tag="gc", ledger=ledger)
    name = arena.name
    del arena
    gc.collect()
    assert not segment_exists(name) and ledger.names == []
    ledger.close()
