"""Servers the benchmarks start and stop: a private redis-server, a moto S3 server, zipcomm
controllers and host daemons."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any, BinaryIO, Callable

ROOT = Path(__file__).resolve().parent.parent


class ServiceError(RuntimeError):
    """A server could not be started."""


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for child processes: the repository first on PYTHONPATH, plus ``extra``."""
    env = dict(os.environ, **(extra or {}))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    return env


def free_port() -> int:
    """A loopback TCP port that was free a moment ago (redis-server has no ``--port 0``)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def tail(path: Path, lines: int = 8) -> str:
    try:
        text = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return " | ".join(text[-lines:])


def _stop(proc: subprocess.Popen | None) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _exited_within(proc: subprocess.Popen, seconds: float) -> bool:
    """Wait up to ``seconds`` for ``proc`` to exit (the pause between readiness polls)."""
    try:
        proc.wait(timeout=seconds)
        return True
    except subprocess.TimeoutExpired:
        return False


def _start_on_free_port(server: Any, name: str, log_stem: str,
                        popen: Callable[[int, BinaryIO], subprocess.Popen],
                        answers: Callable[[], bool], *, poll: float, deadline: float,
                        answer: str = "") -> None:
    """Start ``server`` (its ``workdir``, ``port``, ``proc`` and ``stop()``) on a free loopback
    port: ``popen(port, log)`` starts the process with its output to ``log`` (a file
    ``<log_stem>-<port>.log`` in the workdir), then ``answers()`` is polled every ``poll``
    seconds until it is true.  Up to 3 ports are tried (one may be taken again before the server
    binds it); ServiceError, naming the server as ``name``, if it does not answer (``answer``:
    what it did not answer to) within ``deadline`` seconds or exits for another reason."""
    for _attempt in range(3):
        server.port = free_port()
        log = server.workdir / f"{log_stem}-{server.port}.log"
        with open(log, "wb") as out:
            server.proc = popen(server.port, out)
        end = time.monotonic() + deadline
        while not _exited_within(server.proc, poll):
            if answers():
                return
            if time.monotonic() > end:
                server.stop()
                raise ServiceError(f"{name} did not answer{' ' + answer if answer else ''} "
                                   f"within {deadline:.0f}s; log: {tail(log)}")
        if "already in use" not in tail(log, 50):
            raise ServiceError(f"{name} exited with code {server.proc.returncode}: {tail(log)}")
    raise ServiceError(f"{name} could not bind a free port in 3 attempts")


class RedisServer:
    """A private ``redis-server`` on a free loopback port, no persistence."""

    def __init__(self, workdir: Path, exe: str = "redis-server") -> None:
        self.workdir, self.exe = workdir, exe
        self.proc: subprocess.Popen | None = None
        self.port = 0
        self.client = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def version(self) -> str:
        out = subprocess.run([self.exe, "--version"], capture_output=True, text=True, timeout=30)
        return out.stdout.strip()

    def start(self, deadline: float = 20.0) -> None:
        import redis
        path = shutil.which(self.exe)
        if path is None:
            raise ServiceError(f"{self.exe} not found on PATH: install it (Debian/Ubuntu: "
                               f"apt-get install redis-server)")
        self.exe = path

        def popen(port: int, out: BinaryIO) -> subprocess.Popen:
            proc = subprocess.Popen(
                [path, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                 "--appendonly", "no", "--dir", str(self.workdir), "--daemonize", "no"],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
            self.client = redis.Redis(host="127.0.0.1", port=port, socket_timeout=30,
                                      socket_connect_timeout=2)
            return proc

        def answers() -> bool:  # PING works
            try:
                return bool(self.client.ping())
            except redis.ConnectionError:
                return False

        _start_on_free_port(self, "redis-server", "redis", popen, answers, poll=0.02,
                            deadline=deadline, answer="PING")

    def keys_left(self) -> int:
        """Number of keys in the database (a leak check after a cell); flushes them."""
        count = int(self.client.dbsize())
        if count:
            self.client.flushall()
        return count

    def memory_info(self) -> dict:
        info = self.client.info("memory")
        return {k: info.get(k) for k in ("used_memory", "used_memory_peak", "maxmemory")}

    def stop(self) -> None:
        if self.client is not None:
            self.client.close()
            self.client = None
        _stop(self.proc)


class S3Server:
    """A private S3-compatible server: moto's ``python -m moto.server`` on a free loopback port.

    Objects live in the server's memory (bodies above a few MB in unlinked temporary files),
    nothing outlives it.  :meth:`client_settings` are what an aiobotocore client
    (``cirrus.storage.S3Store``) needs to reach it; :meth:`env` the same as the standard AWS
    environment variables, for programs that take their settings from there
    (``cirrus.storage.open_store("s3://...")``).  The bucket helpers run their own event loop:
    call them outside ``asyncio.run``.
    """

    ACCESS_KEY = SECRET_KEY = "testing"  # moto accepts any credentials; botocore wants some
    REGION = "us-east-1"

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.proc: subprocess.Popen | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def version(self) -> str:
        import importlib.metadata
        return importlib.metadata.version("moto")

    def client_settings(self) -> dict:
        return {"endpoint_url": self.url, "region_name": self.REGION,
                "aws_access_key_id": self.ACCESS_KEY, "aws_secret_access_key": self.SECRET_KEY}

    def env(self) -> dict[str, str]:
        return {"AWS_ENDPOINT_URL": self.url, "AWS_ENDPOINT_URL_S3": self.url,
                "AWS_ACCESS_KEY_ID": self.ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": self.SECRET_KEY,
                "AWS_DEFAULT_REGION": self.REGION, "AWS_CONFIG_FILE": os.devnull,
                "AWS_SHARED_CREDENTIALS_FILE": os.devnull}

    def _answers(self) -> bool:
        import http.client
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
        try:
            conn.request("GET", "/")  # ListBuckets
            return conn.getresponse().status == 200
        except OSError:
            return False
        finally:
            conn.close()

    def start(self, deadline: float = 30.0) -> None:
        import importlib.util
        if importlib.util.find_spec("moto") is None or importlib.util.find_spec("aiobotocore") is None:
            raise ServiceError("the Python packages moto[server] and aiobotocore are needed: "
                               "pip install 'moto[server]' aiobotocore")

        def popen(port: int, out: BinaryIO) -> subprocess.Popen:
            return subprocess.Popen(
                [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                cwd=self.workdir, env=child_env(), stdin=subprocess.DEVNULL, stdout=out,
                stderr=subprocess.STDOUT)

        # poll ListBuckets until it answers
        _start_on_free_port(self, "moto server", "moto", popen, self._answers, poll=0.05,
                            deadline=deadline)

    def _run(self, coro_fn, *args):
        import asyncio
        return asyncio.run(coro_fn(*args))

    async def _create_bucket(self, bucket: str) -> None:
        from cirrus.storage import s3_session
        async with s3_session().create_client("s3", **self.client_settings()) as client:
            await client.create_bucket(Bucket=bucket)

    def create_bucket(self, bucket: str) -> None:
        self._run(self._create_bucket, bucket)

    async def _keys_left(self, bucket: str, prefix: str) -> int:
        from cirrus.storage import S3Store
        settings = self.client_settings()
        store = S3Store(bucket, endpoint_url=settings.pop("endpoint_url"),
                        region_name=settings.pop("region_name"), client_kwargs=settings)
        async with store:
            keys = await store.list(prefix)
            for key in keys:
                await store.delete(key)
        return len(keys)

    def keys_left(self, bucket: str, prefix: str = "") -> int:
        """Number of objects under ``prefix`` in ``bucket`` (a leak check); deletes them."""
        return self._run(self._keys_left, bucket, prefix)

    def stop(self) -> None:
        _stop(self.proc)


class _ZipcommService:
    """A zipcomm process that writes one line to its ready file once serving."""

    what = ""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.proc: subprocess.Popen | None = None
        self.address = ""

    def argv(self, ready: Path) -> list[str]:
        raise NotImplementedError

    def start(self, deadline: float = 20.0) -> None:
        tag = uuid.uuid4().hex[:8]
        ready = self.workdir / f"{self.what.replace(' ', '-')}-{tag}.ready"
        log = self.workdir / f"{self.what.replace(' ', '-')}-{tag}.log"
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(self.argv(ready), cwd=ROOT, env=child_env(),
                                         stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
        end = time.monotonic() + deadline
        while not _exited_within(self.proc, 0.02):  # poll for the ready file
            text = ready.read_text() if ready.exists() else ""
            if text.endswith("\n") and text.strip():
                self.address = text.strip()
                return
            if time.monotonic() > end:
                self.stop()
                raise ServiceError(f"{self.what} wrote no ready file within "
                                   f"{deadline:.0f}s; log: {tail(log)}")
        raise ServiceError(f"{self.what} exited with code {self.proc.returncode}: "
                           f"{tail(log, 3)}")

    def stop(self) -> None:
        _stop(self.proc)


#: The benchmarks' controllers expect a heartbeat every second but declare a member dead only
#: after this many seconds without one (the default is 5 s): a benchmark measures collectives, not
#: failure detection, and on a loaded 2-core machine a rank that verifies 8 x 1M items between
#: rounds can go that long without running its event loop.  (MPI and gloo detect no failure at all.)
BENCH_HEARTBEAT_TIMEOUT = 60.0


class Controller(_ZipcommService):
    """``python -m zipcomm.controller --listen 127.0.0.1:0 --ready-file PATH
    --heartbeat-timeout BENCH_HEARTBEAT_TIMEOUT``."""

    what = "zipcomm controller"

    def argv(self, ready: Path) -> list[str]:
        return [sys.executable, "-m", "zipcomm.controller", "--listen", "127.0.0.1:0",
                "--ready-file", str(ready), "--heartbeat-timeout", str(BENCH_HEARTBEAT_TIMEOUT)]


class Daemon(_ZipcommService):
    """``python -m zipcomm.daemon --controller ADDR --socket PATH --shm-size SIZE``; its
    ``address`` is the socket path (what members get as ZIPCOMM_DAEMON)."""

    what = "zipcomm daemon"

    def __init__(self, workdir: Path, controller: str, shm_size: str) -> None:
        super().__init__(workdir)
        self.controller, self.shm_size = controller, shm_size

    def argv(self, ready: Path) -> list[str]:
        return [sys.executable, "-m", "zipcomm.daemon", "--controller", self.controller,
                "--socket", str(ready.with_suffix(".sock")), "--shm-size", self.shm_size,
                "--ready-file", str(ready)]


def zipcomm_import_error() -> str | None:
    """None if zipcomm's public async API imports, else the error (checked in a subprocess)."""
    code = "import zipcomm; zipcomm.connect, zipcomm.SUM, zipcomm.BOTH"
    try:
        out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=child_env(),
                             capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        return "ImportError: 'import zipcomm' did not finish within 120s"
    if out.returncode == 0:
        return None
    lines = out.stderr.strip().splitlines()
    return lines[-1] if lines else f"import zipcomm exited with code {out.returncode}"

