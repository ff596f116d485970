"""The shared-memory arena of the per-host daemon (DESIGN.md §3.5).

The daemon owns POSIX shared-memory segments (``/dev/shm/zc_<tag>_<32 hex>``) and hands out
ranges of them; the local member processes attach to a segment by name and read the data of
other members through read-only numpy views, without a copy::

    # daemon (owner)                                # member
    sweep(STATE)                                    #
    ledger = SegmentLedger(STATE)                   #
    arena = Arena.create(1 << 30, tag="bcast",      #
                         ledger=ledger)             #
    off = arena.alloc(nbytes)        --- name, size, off, dtype, shape (after authentication) -->
                                                    att = Attachment.open(name, size)
                                                    dst = att.writable(off, dtype, shape)  # fill
                                                    arr = att.view(off, dtype, shape,
                                                                   on_release=tell_daemon)
    arena.free(off)                  <-- released ---------------- (when arr and its slices die)
    arena.close()                    # unlinks the name; forgets it in the ledger

**Ownership.**  Only the daemon (:class:`Arena`) creates and unlinks segments.  An
:class:`Attachment` never unlinks anything, neither on close nor at exit nor when it is killed.
On Python 3.11, ``multiprocessing.shared_memory.SharedMemory(name)`` registers an *attached*
segment with the resource tracker, which unlinks it when the attaching process exits -- even
when it is SIGKILLed, since the tracker is a separate process that sees its pipe close.  The
usual fix, ``resource_tracker.unregister(...)`` right after attaching, still leaves a window
(killed between the two calls: the daemon's segment is gone for everyone), starts a tracker
process in every member, and breaks when processes share a tracker (it keeps a *set* of
names: one process's unregister cancels another's register).  So this module does what
``SharedMemory`` does underneath -- ``_posixshmem.shm_open`` + :mod:`mmap` -- without ever
talking to the resource tracker, in the owner as well as in the attachers.  The owner's crash
safety comes from the :class:`SegmentLedger` instead: the daemon records each segment in a
state file *before* creating it, and the next daemon :func:`sweep`\\ s the segments of a dead
one at start-up.

**Preallocation.**  A tmpfs segment whose pages cannot be supplied kills the process that
touches them with SIGBUS.  :meth:`Arena.create` therefore reserves all pages at creation with
``posix_fallocate`` and raises :class:`~zipcomm.errors.ArenaUnavailable` if /dev/shm is too
small; a segment that exists is fully backed.  (The pages count as used memory from then on.)

**Access control.**  A segment is created with ``O_EXCL`` and mode 0600 (checked with
``fstat``), owned by the daemon's uid: a process of another uid cannot open it (``EACCES``,
reported as :class:`~zipcomm.errors.ArenaAttachError`) nor unlink it (/dev/shm is sticky).
Its name carries 128 random bits (``secrets.token_hex(16)``) and the daemon discloses it only
to members that authenticated on its Unix socket (HMAC handshake, :mod:`zipcomm.protocol`).
The name is not a capability against the *same* uid, though: any process of the daemon's uid
can list /dev/shm and open every segment.  That is why the daemon's uid must not be shared
with untrusted code, and why one arena serves one trust group.  :meth:`Attachment.open`
refuses names that are not zipcomm segment names and segments readable by group or others.

**Views and closing.**  Numpy views export the segment's buffer; an ``mmap`` with exports
cannot be unmapped (Python raises :class:`BufferError` instead of letting a view crash).  So
:meth:`Arena.close` unlinks the name at once and unmaps the memory only if no view is alive;
otherwise the mapping is left to the views and unmapped when the last one is garbage
collected.  :meth:`Attachment.close` does the same (minus the unlink).  Views stay valid.

Thread safety: :class:`Arena` allocation and :class:`SegmentLedger` updates take a lock; the
``on_release`` callbacks of :meth:`Attachment.view` run in whichever thread drops the last
reference (often inside garbage collection), so they must be quick and thread-safe (e.g.
``loop.call_soon_threadsafe``).  They are not called at interpreter shutdown: the daemon
reclaims the ranges of a member that went away.
"""
from __future__ import annotations

import bisect
import json
import math
import mmap
import operator
import os
import re
import secrets
import stat
import tempfile
import threading
import weakref
from typing import Any, Callable, Self

import _posixshmem  # the C half of multiprocessing.shared_memory (shm_open / shm_unlink)
import numpy as np

from .errors import ArenaAttachError, ArenaError, ArenaFull, ArenaUnavailable

__all__ = [
    "Arena", "Attachment", "SegmentLedger", "sweep", "is_segment_name", "segment_exists",
    "ALIGN", "NAME_PREFIX",
]

#: every range handed out by :meth:`Arena.alloc` starts on a multiple of this (a cache line)
ALIGN = 64
NAME_PREFIX = "zc_"
_TAG = re.compile(r"[a-z0-9]{0,16}")
_NAME = re.compile(r"zc_[a-z0-9]{0,16}_[0-9a-f]{32}")
_SHM_DIR = "/dev/shm"


def is_segment_name(name: object) -> bool:
    """Whether *name* has the form of a zipcomm segment name (``zc_<tag>_<32 hex>``)."""
    return isinstance(name, str) and _NAME.fullmatch(name) is not None


def segment_exists(name: str) -> bool:
    """Whether the segment *name* exists (Linux: ``/dev/shm/<name>`` is present)."""
    if not is_segment_name(name):
        raise ValueError(f"not a zipcomm segment name: {name!r}")
    return os.path.lexists(os.path.join(_SHM_DIR, name))


def _unlink(name: str) -> None:
    _posixshmem.shm_unlink("/" + name)


# --- array views ---------------------------------------------------------------------------


def _nbytes(dtype: Any, shape: Any) -> tuple[np.dtype, tuple[int, ...], int]:
    dt = np.dtype(dtype)
    if dt.hasobject:
        raise TypeError(f"dtype {dt} holds Python objects; it cannot live in shared memory")
    if isinstance(shape, (tuple, list)):
        dims = tuple(operator.index(d) for d in shape)
    else:
        dims = (operator.index(shape),)
    if any(d < 0 for d in dims):
        raise ValueError(f"negative dimension in shape {dims}")
    return dt, dims, dt.itemsize * math.prod(dims)


def _array(mv: memoryview, size: int, offset: Any, dtype: Any, shape: Any) -> np.ndarray:
    offset = operator.index(offset)
    dt, dims, nbytes = _nbytes(dtype, shape)
    if offset < 0 or offset + nbytes > size:
        raise ValueError(f"range [{offset}, {offset + nbytes}) lies outside the segment of {size} bytes")
    # frombuffer, not np.ndarray(buffer=...): numpy lets the writeable flag of the latter be
    # set again although the memoryview is read-only
    count = nbytes // dt.itemsize if dt.itemsize else 0
    return np.frombuffer(mv, dtype=dt, count=count, offset=offset).reshape(dims)


def _address(mv: memoryview) -> int:
    return int(np.frombuffer(mv, dtype=np.uint8, count=1).__array_interface__["data"][0])


def _release(mm: mmap.mmap | None, *views: memoryview | None) -> bool:
    """Release the memoryviews and unmap *mm*; False if views of it are still alive (the
    mapping then goes away with the last of them)."""
    ok = True
    for mv in views:
        if mv is not None:
            try:
                mv.release()
            except BufferError:
                ok = False
    if ok and mm is not None:
        try:
            mm.close()
        except BufferError:
            ok = False
    return ok


# --- the owner -----------------------------------------------------------------------------


class _Ranges:
    """Address-ordered first-fit allocator over ``[0, capacity)`` with coalescing free list.

    ``alloc`` and ``free`` cost O(number of free ranges) at worst (a scan / a list insert).
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.starts: list[int] = [0] if capacity else []   # free ranges, sorted by offset
        self.sizes: dict[int, int] = {0: capacity} if capacity else {}
        self.taken: dict[int, int] = {}                     # allocated offset -> size
        self.used = 0

    def largest_free(self) -> int:
        return max(self.sizes.values(), default=0)

    def alloc(self, nbytes: int) -> int:
        need = max(ALIGN, -(-nbytes // ALIGN) * ALIGN)
        for i, start in enumerate(self.starts):
            have = self.sizes[start]
            if have >= need:
                del self.sizes[start]
                if have == need:
                    del self.starts[i]
                else:
                    self.starts[i] = start + need
                    self.sizes[start + need] = have - need
                self.taken[start] = need
                self.used += need
                return start
        raise ArenaFull(nbytes, self.largest_free(), self.capacity - self.used)

    def free(self, offset: int) -> None:
        size = self.taken.pop(offset, None)
        if size is None:
            what = "inside a free range" if self._in_free(offset) else "not the start of an allocated range"
            raise ArenaError(f"free({offset}): {what} (double free or unknown offset)")
        self.used -= size
        i = bisect.bisect_left(self.starts, offset)
        end = offset + size
        if i < len(self.starts) and self.starts[i] == end:       # merge with the next range
            size += self.sizes.pop(end)
            del self.starts[i]
        if i > 0:
            prev = self.starts[i - 1]
            if prev + self.sizes[prev] == offset:                 # merge into the previous range
                self.sizes[prev] += size
                return
        self.starts.insert(i, offset)
        self.sizes[offset] = size

    def _in_free(self, offset: int) -> bool:
        i = bisect.bisect_right(self.starts, offset) - 1
        return i >= 0 and offset < self.starts[i] + self.sizes[self.starts[i]]


def _cleanup(name: str, ledger: SegmentLedger | None, pid: int) -> None:
    """Unlink a segment whose Arena was garbage collected or left open at exit (not in a
    forked child, which does not own it)."""
    if os.getpid() != pid:
        return
    try:
        _unlink(name)
    except OSError:
        pass
    if ledger is not None:
        try:
            ledger.forget(name)
        except Exception:
            pass


class Arena:
    """A shared-memory segment owned by the daemon, and the allocator of its ranges.

    Create one with :meth:`create`.  Ranges start on multiples of :data:`ALIGN` and their
    sizes are rounded up to it; ``alloc(0)`` gets a range of ALIGN bytes.  The usable
    capacity is ``size`` rounded down to ALIGN.  An arena that is garbage collected, or still
    open at interpreter exit, is unlinked as if closed.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise TypeError("use Arena.create(size, tag=..., ledger=...)")

    @classmethod
    def create(cls, size: int, *, tag: str = "", ledger: SegmentLedger | None = None) -> Self:
        """Create, preallocate and map a new segment of *size* bytes (mode 0600).

        *tag* (at most 16 of ``[a-z0-9]``) goes into the name for the operator's benefit.
        With a *ledger*, the name is recorded before the segment exists and forgotten when it
        is unlinked, so that a crash never leaves an unrecorded segment behind.

        Raises :class:`~zipcomm.errors.ArenaUnavailable` (with the :class:`OSError` as
        ``__cause__``) if the segment cannot be created, sized or mapped: /dev/shm full or
        missing, permission denied, out of memory.  Nothing is left behind then.
        """
        size = operator.index(size)
        if size < ALIGN:
            raise ValueError(f"an arena needs at least {ALIGN} bytes, not {size}")
        if not isinstance(tag, str) or not _TAG.fullmatch(tag):
            raise ValueError(f"tag must be at most 16 characters of [a-z0-9], not {tag!r}")
        for _ in range(3):
            name = f"{NAME_PREFIX}{tag}_{secrets.token_hex(16)}"
            if ledger is not None:
                ledger.record(name)
            try:
                fd = _posixshmem.shm_open("/" + name, os.O_CREAT | os.O_EXCL | os.O_RDWR, mode=0o600)
            except FileExistsError:
                if ledger is not None:
                    ledger.forget(name)
                continue  # 2**-128; not ours, so never unlink it
            except OSError as exc:
                if ledger is not None:
                    ledger.forget(name)
                raise ArenaUnavailable(f"cannot create shared-memory segment {name}: {exc}") from exc
            break
        else:
            raise ArenaUnavailable("cannot find a free shared-memory segment name")
        mm = None
        try:
            try:
                st = os.fstat(fd)
                if stat.S_IMODE(st.st_mode) != 0o600:
                    os.fchmod(fd, 0o600)
                    st = os.fstat(fd)
                if stat.S_IMODE(st.st_mode) != 0o600 or st.st_uid != os.geteuid():
                    raise ArenaUnavailable(
                        f"segment {name} has mode {stat.S_IMODE(st.st_mode):o} and uid {st.st_uid}, "
                        f"not 600 and {os.geteuid()}")
                while True:
                    try:
                        os.posix_fallocate(fd, 0, size)  # reserve every page now, not SIGBUS later
                        break
                    except InterruptedError:
                        continue
                if os.fstat(fd).st_size != size:
                    raise ArenaUnavailable(f"segment {name} did not take the size {size}")
                mm = mmap.mmap(fd, size)
            except OSError as exc:
                raise ArenaUnavailable(
                    f"cannot allocate a shared-memory segment of {size} bytes in {_SHM_DIR}: {exc}"
                ) from exc
        except BaseException:
            if mm is not None:
                mm.close()
            try:
                _unlink(name)
            except OSError:
                pass
            if ledger is not None:
                ledger.forget(name)
            raise
        finally:
            os.close(fd)  # the mmap keeps its own descriptor
        self = object.__new__(cls)
        self._name = name
        self._size = size
        self._mmap = mm
        self._mv = memoryview(mm)
        self._ro = self._mv.toreadonly()
        self._address = _address(self._mv)
        self._ranges = _Ranges(size - size % ALIGN)
        self._lock = threading.Lock()
        self._ledger = ledger
        self._closed = False
        self._finalizer = weakref.finalize(self, _cleanup, name, ledger, os.getpid())
        return self

    # -- properties --------------------------------------------------------------------

    @property
    def name(self) -> str:
        """The segment's name, without the leading slash (what :meth:`Attachment.open` takes)."""
        return self._name

    @property
    def size(self) -> int:
        """The segment's size in bytes."""
        return self._size

    @property
    def capacity(self) -> int:
        """The bytes available to :meth:`alloc` (``size`` rounded down to ALIGN)."""
        return self._ranges.capacity

    @property
    def buf(self) -> memoryview:
        """The whole segment, writable."""
        self._check()
        return self._mv

    @property
    def address(self) -> int:
        """The address of the segment's mapping in this process."""
        return self._address

    @property
    def used(self) -> int:
        """Bytes in allocated ranges (sizes rounded up to ALIGN)."""
        return self._ranges.used

    @property
    def free_bytes(self) -> int:
        """``capacity - used`` (possibly fragmented: see :attr:`largest_free`)."""
        return self._ranges.capacity - self._ranges.used

    @property
    def largest_free(self) -> int:
        """The size of the largest free range: the largest ``alloc()`` that succeeds now."""
        with self._lock:
            return self._ranges.largest_free()

    @property
    def closed(self) -> bool:
        return self._closed

    # -- allocation ------------------------------------------------------------------

    def alloc(self, nbytes: int) -> int:
        """Reserve *nbytes* and return the range's offset (a multiple of ALIGN).

        Raises :class:`~zipcomm.errors.ArenaFull` if no free range is large enough now.
        """
        nbytes = operator.index(nbytes)
        if nbytes < 0:
            raise ValueError(f"cannot allocate {nbytes} bytes")
        self._check()
        with self._lock:
            return self._ranges.alloc(nbytes)

    def free(self, offset: int) -> None:
        """Return the range that :meth:`alloc` returned at *offset*.

        Raises :class:`~zipcomm.errors.ArenaError` for an offset that is not the start of an
        allocated range (double free, or never allocated).
        """
        offset = operator.index(offset)
        self._check()
        with self._lock:
            self._ranges.free(offset)

    def size_of(self, offset: int) -> int:
        """The size of the allocated range starting at *offset* (ArenaError if there is none).
        The daemon checks a member's descriptor against it before mapping the member's data."""
        with self._lock:
            size = self._ranges.taken.get(operator.index(offset))
        if size is None:
            raise ArenaError(f"no allocated range starts at {offset}")
        return size

    def ndarray(self, offset: int, dtype: Any, shape: Any, readonly: bool = False) -> np.ndarray:
        """A numpy array over ``[offset, offset + nbytes)`` of the segment (no copy).

        The range must lie inside the segment (ValueError otherwise); dtypes holding Python
        objects are refused (TypeError).  With *readonly* the array cannot be made writable.
        """
        self._check()
        return _array(self._ro if readonly else self._mv, self._size, offset, dtype, shape)

    # -- life cycle ------------------------------------------------------------------

    def close(self) -> None:
        """Unlink the segment (no new attachment can open it), forget it in the ledger, and
        unmap it unless views are still alive (then it is unmapped after the last one dies).
        Existing attachments keep their mappings.  Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._finalizer.detach()
        try:
            _unlink(self._name)
        except FileNotFoundError:
            pass
        if self._ledger is not None:
            self._ledger.forget(self._name)
        mm, mv, ro = self._mmap, self._mv, self._ro
        self._mmap = self._mv = self._ro = None
        _release(mm, ro, mv)

    def _check(self) -> None:
        if self._closed:
            raise ArenaError(f"arena {self._name} is closed")

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"used={self.used}"
        return f"<Arena {self._name} size={self._size} {state}>"


# --- the members ---------------------------------------------------------------------------


class Attachment:
    """A member's mapping of a daemon's segment.  Never unlinks it (see the module docs)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise TypeError("use Attachment.open(name, size)")

    @classmethod
    def open(cls, name: str, size: int, *, readonly: bool = False) -> Self:
        """Map the existing segment *name* (as :attr:`Arena.name`), which must have *size* bytes.

        With *readonly* the mapping itself is read-only and :meth:`writable` is refused.
        Raises :class:`~zipcomm.errors.ArenaAttachError` if the segment is missing, has another
        size, is accessible to group or others, or cannot be opened (``PermissionError`` as
        ``__cause__`` for a process of another uid).  Does not involve the resource tracker.
        """
        size = operator.index(size)
        if not is_segment_name(name):
            raise ArenaAttachError(f"not a zipcomm segment name: {name!r}")
        try:
            fd = _posixshmem.shm_open("/" + name, os.O_RDONLY if readonly else os.O_RDWR, mode=0)
        except FileNotFoundError as exc:
            raise ArenaAttachError(f"segment {name} does not exist") from exc
        except OSError as exc:
            raise ArenaAttachError(f"cannot open segment {name}: {exc}") from exc
        try:
            st = os.fstat(fd)
            if stat.S_IMODE(st.st_mode) & 0o077:
                raise ArenaAttachError(
                    f"segment {name} has mode {stat.S_IMODE(st.st_mode):o}: it is open to other users")
            if st.st_size != size or size <= 0:
                raise ArenaAttachError(f"segment {name} has {st.st_size} bytes, expected {size}")
            mm = mmap.mmap(fd, size, access=mmap.ACCESS_READ if readonly else mmap.ACCESS_WRITE)
        except OSError as exc:
            raise ArenaAttachError(f"cannot map segment {name}: {exc}") from exc
        finally:
            os.close(fd)
        self = object.__new__(cls)
        self._name = name
        self._size = size
        self._readonly = readonly
        self._mmap = mm
        self._mv = memoryview(mm)
        self._ro = self._mv.toreadonly()  # views built on it can never be made writable
        self._address = _address(self._ro)
        self._closed = False
        return self

    @property
    def name(self) -> str:
        return self._name

    @property
    def size(self) -> int:
        return self._size

    @property
    def address(self) -> int:
        """The address of the segment's mapping in this process."""
        return self._address

    @property
    def closed(self) -> bool:
        return self._closed

    def view(self, offset: int, dtype: Any, shape: Any, *,
             on_release: Callable[[], None] | None = None) -> np.ndarray:
        """A read-only numpy array over a range of the segment (zero-copy).

        Writes raise ValueError, and so does setting ``flags.writeable``.  *on_release*, if
        given, is called once, when this array and every array derived from it (slices,
        reshapes, ``.view()``\\ s, memoryviews of them) are gone -- the moment to tell the
        daemon that the range may be reused.  See the module docs for the thread it runs in.
        """
        self._check()
        arr = _array(self._ro, self._size, offset, dtype, shape)
        if on_release is None:
            return arr
        # numpy points every view derived from `arr` at the first array up its base chain
        # whose own base is not an ndarray -- here the frombuffer() array under the reshape,
        # whose base is a memoryview.  That private root lives exactly as long as the user's
        # array and everything derived from it, so its death is the release.
        root = arr
        while isinstance(root.base, np.ndarray):
            root = root.base
        weakref.finalize(root, on_release).atexit = False
        return arr.view()

    def writable(self, offset: int, dtype: Any, shape: Any) -> np.ndarray:
        """A writable numpy array over a range, for the member to fill the range it was given."""
        self._check()
        if self._readonly:
            raise ArenaError(f"attachment to {self._name} is read-only")
        return _array(self._mv, self._size, offset, dtype, shape)

    def close(self) -> None:
        """Drop this process's mapping (after the last live view, if any).  Never unlinks.
        Idempotent."""
        if self._closed:
            return
        self._closed = True
        mm, mv, ro = self._mmap, self._mv, self._ro
        self._mmap = self._mv = self._ro = None
        _release(mm, ro, mv)

    def _check(self) -> None:
        if self._closed:
            raise ArenaError(f"attachment to {self._name} is closed")

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Attachment {self._name} size={self._size}{' closed' if self._closed else ''}>"


# --- crash recovery ------------------------------------------------------------------------


def _start_time(pid: int) -> tuple[int, str] | None:
    """(start time in clock ticks since boot, state letter) of *pid* from /proc, or None."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read().decode("ascii", "replace")
    except OSError:
        return None
    fields = data[data.rfind(")") + 2:].split()
    try:
        return int(fields[19]), fields[0]
    except (IndexError, ValueError):
        return None


def _alive(pid: int, start: int | None) -> bool:
    """Whether the process that wrote a ledger (pid, start time) still runs."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, belongs to someone else
    info = _start_time(pid)
    if info is None:
        return True
    ticks, state = info
    if state in ("Z", "X"):
        return False  # dead, not yet reaped
    return start is None or ticks == start  # another start time: the pid was reused


def _read(path: str) -> dict[str, Any] | None:
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        return None
    try:
        state = json.loads(raw)
        pid = state["pid"]
        segments = state["segments"]
        start = state.get("start")
        if (not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0
                or not isinstance(segments, list)
                or not (start is None or isinstance(start, int))):
            raise ValueError("bad field types")
    except (ValueError, KeyError, TypeError) as exc:
        raise ArenaError(f"segment ledger {path} is not a valid ledger ({exc}); "
                         f"check it and remove it by hand") from exc
    return state


def _write(path: str, state: dict[str, Any]) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=os.path.basename(path) + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def sweep(path: str | os.PathLike[str]) -> list[str]:
    """Unlink the segments recorded in the ledger file *path* if its writer is dead.

    The writer counts as dead if its pid does not exist, is a zombie, has another start time
    (pid reused), or is the calling process itself (a restarted daemon that got the same pid).
    Only recorded names of the form ``zc_<tag>_<32 hex>`` are ever unlinked -- nothing else in
    /dev/shm.  Afterwards the file is removed (or rewritten with the names that could not be
    unlinked).  Returns the names that were unlinked; ``[]`` if there is no file or its
    writer is alive.  Raises :class:`~zipcomm.errors.ArenaError` for a file that is not a
    ledger (left alone for the operator).
    """
    path = os.fspath(path)
    state = _read(path)
    if state is None:
        return []
    pid, start = state["pid"], state.get("start")
    if pid != os.getpid() and _alive(pid, start):
        return []
    swept: list[str] = []
    left: list[str] = []
    for name in state["segments"]:
        if not is_segment_name(name):
            continue  # never touch anything that is not ours
        try:
            _unlink(name)
        except FileNotFoundError:
            continue
        except OSError:
            left.append(name)
            continue
        swept.append(name)
    if left:
        _write(path, {**state, "segments": left})
    else:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
    return swept


class SegmentLedger:
    """The daemon's record of its live segments: a small JSON file, replaced atomically.

    Constructing one claims *path* for this process: if the file belongs to another process
    that is alive, :class:`~zipcomm.errors.ArenaError` is raised (two daemons, one state
    file); if it was left by a dead one, its segments are swept first (the names are in
    :attr:`swept`).  Then the file is written with this process's pid and no segments.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self._path = os.fspath(path)
        self._pid = os.getpid()
        info = _start_time(self._pid)
        self._start = info[0] if info else None
        self._names: list[str] = []
        self._lock = threading.Lock()
        state = _read(self._path)
        if state is not None and state["pid"] != self._pid and _alive(state["pid"], state.get("start")):
            raise ArenaError(f"segment ledger {self._path} belongs to the running process {state['pid']}")
        self.swept: list[str] = sweep(self._path)
        rest = _read(self._path)  # names that could not be unlinked: keep them on record
        if rest is not None:
            self._names = [n for n in rest["segments"] if is_segment_name(n)]
        self._save()

    @property
    def path(self) -> str:
        return self._path

    @property
    def owner_pid(self) -> int:
        """The pid recorded in the file: this process."""
        return self._pid

    @property
    def names(self) -> list[str]:
        """The recorded segment names."""
        with self._lock:
            return list(self._names)

    def record(self, name: str) -> None:
        """Add *name* (before the segment is created) and rewrite the file."""
        if not is_segment_name(name):
            raise ValueError(f"not a zipcomm segment name: {name!r}")
        with self._lock:
            if name not in self._names:
                self._names.append(name)
                self._save()

    def forget(self, name: str) -> None:
        """Remove *name* (after the segment is unlinked) and rewrite the file."""
        with self._lock:
            if name in self._names:
                self._names.remove(name)
                self._save()

    def close(self) -> None:
        """Remove the file if no segment is recorded any more (a clean daemon shutdown)."""
        with self._lock:
            if not self._names:
                try:
                    os.unlink(self._path)
                except FileNotFoundError:
                    pass

    def _save(self) -> None:
        _write(self._path, {"version": 1, "pid": self._pid, "start": self._start,
                            "segments": self._names})

    def __repr__(self) -> str:
        return f"<SegmentLedger {self._path} pid={self._pid} segments={len(self._names)}>"
