"""The connection handshake, sans-IO: version check, then an optional mutual proof.

Both sides send HELLO as soon as the connection is up::

    b"ZIPH" | version u8 | flags u8 | nonce (32 random bytes)      38 bytes

Bit 0 of flags says "I have a secret and require authentication"; both sides
must agree.  With a secret, each side then sends::

    PROOF = HMAC-SHA256(secret, b"zipcomm-v1" + role + own_nonce + peer_nonce)

with role b"C" for the client and b"S" for the server.  Fresh nonces from both
sides make a recorded proof useless on another connection, and the role byte
makes a proof useless when reflected back at the side that made it.

Only these fixed-size messages are parsed before the peer is authenticated;
nothing is msgpack-decoded.  Deadlines belong to the I/O shell.
"""

from __future__ import annotations

import hmac
import os
import stat
import struct
from collections.abc import Mapping

from ..errors import AuthenticationError, HandshakeError, LocalProtocolError
from .limits import VERSION

__all__ = [
    "HELLO_MAGIC",
    "HELLO_SIZE",
    "PROOF_SIZE",
    "MAX_HANDSHAKE_BYTES",
    "SECRET_ENV",
    "Handshake",
    "load_secret",
]

HELLO_MAGIC = b"ZIPH"
_HELLO = struct.Struct("<4sBB32s")
HELLO_SIZE = _HELLO.size  # 38
NONCE_SIZE = 32
PROOF_SIZE = 32  # SHA-256 digest
_FLAG_AUTH = 0x01
_PROOF_CONTEXT = b"zipcomm-v1"

# An unauthenticated peer may make us buffer at most this much.  The version 1
# messages are fixed-size and far smaller, so this guards later versions that
# add variable-length fields.
MAX_HANDSHAKE_BYTES = 4096

SECRET_ENV = "ZIPCOMM_SECRET"
_MAX_SECRET_FILE = 64 * 1024


class Handshake:
    """One side of the handshake.

    Send ``initial_bytes()`` at once, pass every received chunk to
    ``receive()`` and send whatever it returns.  Once ``done``, ``leftover``
    holds the bytes that arrived after the handshake; they belong to the frame
    stream.  Errors are HandshakeError (AuthenticationError for secret
    problems); after one, every later ``receive()`` raises it again.
    """

    def __init__(self, is_client: bool, secret: bytes | None) -> None:
        if secret is not None and (not isinstance(secret, (bytes, bytearray)) or not secret):
            raise ValueError("the secret must be non-empty bytes (or None for no authentication)")
        self._secret = None if secret is None else bytes(secret)
        self._role, self._peer_role = (b"C", b"S") if is_client else (b"S", b"C")
        self._nonce = os.urandom(NONCE_SIZE)
        self._peer_nonce: bytes | None = None
        self._pending = bytearray()  # received, not yet consumed
        self._done = False
        self._leftover = b""
        self._error: BaseException | None = None

    @property
    def done(self) -> bool:
        return self._done

    @property
    def leftover(self) -> bytes:
        return self._leftover

    @property
    def authenticated(self) -> bool:
        """True once the peer has proven it knows the shared secret."""
        return self._done and self._secret is not None

    def initial_bytes(self) -> bytes:
        flags = _FLAG_AUTH if self._secret is not None else 0
        return _HELLO.pack(HELLO_MAGIC, VERSION, flags, self._nonce)

    def receive(self, data: bytes | bytearray | memoryview) -> bytes:
        """Consume received bytes; return the bytes to send now (possibly empty)."""
        if self._error is not None:
            raise self._error.with_traceback(None)
        if self._done:
            raise LocalProtocolError("the handshake is complete; later bytes belong to the frame decoder")
        try:
            return self._receive(data)
        except BaseException as exc:
            self._error = exc
            raise

    def _receive(self, data: bytes | bytearray | memoryview) -> bytes:
        self._pending += data
        reply = b""
        if self._peer_nonce is None:
            # Fail on the first wrong byte rather than after a whole HELLO.
            head = bytes(self._pending[: len(HELLO_MAGIC)])
            if not HELLO_MAGIC.startswith(head):
                raise HandshakeError(f"peer did not start with {HELLO_MAGIC!r} (got {head!r}): not a zipcomm peer")
            if len(self._pending) < HELLO_SIZE:
                return self._waiting(reply)
            reply = self._on_hello()
        if not self._done:
            if len(self._pending) < PROOF_SIZE:
                return self._waiting(reply)
            self._on_proof()
        return reply

    def _waiting(self, reply: bytes) -> bytes:
        if len(self._pending) > MAX_HANDSHAKE_BYTES:
            raise HandshakeError(f"peer sent more than {MAX_HANDSHAKE_BYTES} bytes without completing the handshake")
        return reply

    def _on_hello(self) -> bytes:
        _, version, flags, nonce = _HELLO.unpack_from(self._pending)
        del self._pending[:HELLO_SIZE]
        if version != VERSION:
            raise HandshakeError(
                f"protocol version mismatch: this side speaks version {VERSION}, the peer speaks version {version}"
            )
        if flags & ~_FLAG_AUTH:
            raise HandshakeError(f"peer set unknown handshake flags {flags:#04x}")
        peer_wants_auth = bool(flags & _FLAG_AUTH)
        if peer_wants_auth and self._secret is None:
            raise AuthenticationError(
                f"the peer requires authentication but no secret is configured here (set {SECRET_ENV} or a secret file)"
            )
        if self._secret is not None and not peer_wants_auth:
            raise AuthenticationError("a secret is configured here but the peer has none, so it cannot authenticate")
        if nonce == self._nonce:
            # Our own HELLO came back: a reflector, or a connection to ourselves.
            raise HandshakeError("peer sent our own nonce back")
        self._peer_nonce = nonce
        if self._secret is None:
            self._finish()
            return b""
        return self._proof(self._role, self._nonce, nonce)

    def _on_proof(self) -> None:
        proof = bytes(self._pending[:PROOF_SIZE])
        del self._pending[:PROOF_SIZE]
        expected = self._proof(self._peer_role, self._peer_nonce, self._nonce)
        if not hmac.compare_digest(proof, expected):
            raise AuthenticationError("the peer's proof is wrong: it does not know the shared secret")
        self._finish()

    def _proof(self, role: bytes, first_nonce: bytes, second_nonce: bytes) -> bytes:
        return hmac.digest(self._secret, _PROOF_CONTEXT + role + first_nonce + second_nonce, "sha256")

    def _finish(self) -> None:
        self._done = True
        self._leftover = bytes(self._pending)
        self._pending = bytearray()


def load_secret(env: Mapping[str, str] = os.environ, path: str | os.PathLike | None = None) -> bytes | None:
    """The shared secret: the file at ``path`` if given, else ``$ZIPCOMM_SECRET``, else None.

    The file must not be accessible to group or others (mode 0600 or 0400);
    one trailing newline is ignored so that ``echo secret > file`` works.
    """
    if path is not None:
        return _read_secret_file(path)
    value = env.get(SECRET_ENV)
    if value is None:
        return None
    if not value:
        raise ValueError(f"{SECRET_ENV} is set but empty; unset it or give it a value")
    return value.encode()


def _read_secret_file(path: str | os.PathLike) -> bytes:
    with open(path, "rb") as file:
        # fstat the open file, so that the checked file is the one read.
        info = os.fstat(file.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise ValueError(f"secret file {os.fspath(path)!r} is not a regular file")
        # Windows has no group/other permission bits to check.
        if os.name == "posix" and info.st_mode & 0o077:
            raise PermissionError(
                f"secret file {os.fspath(path)!r} has mode {stat.S_IMODE(info.st_mode):04o} and is readable "
                f"by others; it must be 0600 (chmod 600 {os.fspath(path)})"
            )
        data = file.read(_MAX_SECRET_FILE + 1)
    if len(data) > _MAX_SECRET_FILE:
        raise ValueError(f"secret file {os.fspath(path)!r} is larger than {_MAX_SECRET_FILE} bytes")
    if data.endswith(b"\r\n"):
        data = data[:-2]
    elif data.endswith(b"\n"):
        data = data[:-1]
    if not data:
        raise ValueError(f"secret file {os.fspath(path)!r} is empty")
    return data
