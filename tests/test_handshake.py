"""The connection handshake: version check, mutual HMAC proof, and its refusals."""

from __future__ import annotations

import os
import random

import pytest

from zipcomm.errors import AuthenticationError, HandshakeError, LocalProtocolError
from zipcomm.protocol.handshake import (
    HELLO_MAGIC,
    HELLO_SIZE,
    MAX_HANDSHAKE_BYTES,
    PROOF_SIZE,
    SECRET_ENV,
    Handshake,
    load_secret,
)
from zipcomm.protocol.limits import VERSION


def run_handshake(client: Handshake, server: Handshake) -> None:
    """Deliver each side's output to the other until neither has anything to say."""
    to_server, to_client = client.initial_bytes(), server.initial_bytes()
    while to_server or to_client:
        from_server = server.receive(to_server) if to_server else b""
        from_client = client.receive(to_client) if to_client else b""
        to_server, to_client = from_client, from_server


def exchange_hellos(client: Handshake, server: Handshake) -> tuple[bytes, bytes]:
    """Each side receives the other's HELLO; returns (client proof, server proof)."""
    client_hello, server_hello = client.initial_bytes(), server.initial_bytes()
    return client.receive(server_hello), server.receive(client_hello)


# --- success ------------------------------------------------------------------


def test_no_secret_on_either_side():
    client, server = Handshake(True, None), Handshake(False, None)
    run_handshake(client, server)
    assert client.done and server.done
    assert not client.authenticated and not server.authenticated
    assert len(client.initial_bytes()) == HELLO_SIZE


def test_same_secret_on_both_sides():
    client, server = Handshake(True, b"s3cret"), Handshake(False, b"s3cret")
    run_handshake(client, server)
    assert client.authenticated and server.authenticated
    assert client.leftover == server.leftover == b""


def test_leftover_bytes_after_the_handshake_are_preserved():
    client, server = Handshake(True, b"k"), Handshake(False, b"k")
    client_proof, server_proof = exchange_hellos(client, server)
    assert client.receive(server_proof) == b""
    assert server.receive(client_proof + b"ZIPC first frame") == b""
    assert server.done and server.leftover == b"ZIPC first frame"

    client, server = Handshake(True, None), Handshake(False, None)
    data = server.initial_bytes() + b"frames follow"
    for i in range(len(data)):
        if client.done:
            break
        client.receive(data[i : i + 1])
    assert client.done and client.leftover == b""
    # Bytes after HELLO in the same chunk are leftover too.
    client = Handshake(True, None)
    client.receive(data)
    assert client.leftover == b"frames follow"


def test_hello_and_proof_in_one_chunk():
    client, server = Handshake(True, b"k"), Handshake(False, b"k")
    server_hello = server.initial_bytes()
    client_proof = client.receive(server_hello)
    server_proof = server.receive(client.initial_bytes() + client_proof)
    assert server.done
    client.receive(server_proof)
    assert client.done


# --- refusals -----------------------------------------------------------------


def test_wrong_secret_fails_on_both_sides():
    client, server = Handshake(True, b"right"), Handshake(False, b"wrong")
    client_proof, server_proof = exchange_hellos(client, server)
    with pytest.raises(AuthenticationError):
        client.receive(server_proof)
    with pytest.raises(AuthenticationError):
        server.receive(client_proof)


@pytest.mark.parametrize("client_secret, server_secret", [(b"k", None), (None, b"k")])
def test_secret_on_one_side_only_fails_on_both_sides(client_secret, server_secret):
    client, server = Handshake(True, client_secret), Handshake(False, server_secret)
    client_hello, server_hello = client.initial_bytes(), server.initial_bytes()
    with pytest.raises(AuthenticationError):
        client.receive(server_hello)
    with pytest.raises(AuthenticationError):
        server.receive(client_hello)


def test_replayed_server_proof_is_refused():
    recorded_client, recorded_server = Handshake(True, b"k"), Handshake(False, b"k")
    recorded_hello = recorded_server.initial_bytes()
    recorded_client.receive(recorded_hello)
    recorded_proof = recorded_server.receive(recorded_client.initial_bytes())

    fresh_client = Handshake(True, b"k")
    fresh_client.receive(recorded_hello)
    with pytest.raises(AuthenticationError):
        fresh_client.receive(recorded_proof)


def test_reflected_client_proof_is_refused():
    client, server = Handshake(True, b"k"), Handshake(False, b"k")
    client_proof, _ = exchange_hellos(client, server)
    with pytest.raises(AuthenticationError):
        client.receive(client_proof)


def test_reflected_hello_is_refused():
    client = Handshake(True, b"k")
    with pytest.raises(HandshakeError, match="own nonce"):
        client.receive(client.initial_bytes())


def test_version_mismatch_names_both_versions():
    client = Handshake(True, None)
    hello = HELLO_MAGIC + bytes([VERSION + 1, 0]) + os.urandom(32)
    with pytest.raises(HandshakeError, match=rf"version {VERSION}\b.*version {VERSION + 1}\b"):
        client.receive(hello)


def test_unknown_flags_are_refused():
    client = Handshake(True, None)
    with pytest.raises(HandshakeError, match="flags"):
        client.receive(HELLO_MAGIC + bytes([VERSION, 0x80]) + os.urandom(32))


@pytest.mark.parametrize("seed", range(5))
def test_garbage_is_refused_within_the_first_bytes(seed):
    rng = random.Random(seed)
    garbage = b"GET / HTTP/1.1\r\n" + bytes(rng.randrange(256) for _ in range(MAX_HANDSHAKE_BYTES + 100))
    with pytest.raises(HandshakeError):
        Handshake(False, None).receive(garbage)
    server = Handshake(False, b"k")
    consumed = 0
    with pytest.raises(HandshakeError):
        for byte in garbage:
            consumed += 1
            server.receive(bytes([byte]))
    assert consumed <= len(HELLO_MAGIC), f"seed={seed}"


def test_garbage_after_a_valid_hello_fails_authentication():
    client, server = Handshake(True, b"k"), Handshake(False, b"k")
    rng = random.Random(11)
    garbage = bytes(rng.randrange(256) for _ in range(MAX_HANDSHAKE_BYTES + 100))
    with pytest.raises(AuthenticationError):
        server.receive(client.initial_bytes() + garbage)


def test_errors_poison_the_handshake():
    server = Handshake(False, None)
    with pytest.raises(HandshakeError):
        server.receive(b"nope")
    with pytest.raises(HandshakeError):
        server.receive(Handshake(True, None).initial_bytes())


def test_receive_after_done_is_a_local_error():
    client, server = Handshake(True, None), Handshake(False, None)
    run_handshake(client, server)
    with pytest.raises(LocalProtocolError):
        client.receive(b"more")


def test_proof_is_exactly_one_digest():
    client, server = Handshake(True, b"k"), Handshake(False, b"k")
    client_proof, server_proof = exchange_hellos(client, server)
    assert len(client_proof) == len(server_proof) == PROOF_SIZE
    assert client_proof != server_proof


@pytest.mark.parametrize("secret", [b"", "text"])
def test_secret_must_be_non_empty_bytes(secret):
    with pytest.raises(ValueError):
        Handshake(True, secret)


# --- load_secret --------------------------------------------------------------


def test_load_secret_from_environment():
    assert load_secret(env={}) is None
    assert load_secret(env={SECRET_ENV: "abc"}) == b"abc"
    with pytest.raises(ValueError, match="empty"):
        load_secret(env={SECRET_ENV: ""})


def _secret_file(tmp_path, content: bytes, mode: int):
    path = tmp_path / "secret"
    path.write_bytes(content)
    path.chmod(mode)
    return path


def test_load_secret_from_a_0600_file(tmp_path):
    path = _secret_file(tmp_path, b"from-file\n", 0o600)
    assert load_secret(env={SECRET_ENV: "from-env"}, path=path) == b"from-file"


def test_load_secret_refuses_a_0644_file(tmp_path):
    path = _secret_file(tmp_path, b"from-file\n", 0o644)
    with pytest.raises(PermissionError, match="0644.*chmod 600"):
        load_secret(env={}, path=path)


def test_load_secret_refuses_an_empty_file(tmp_path):
    path = _secret_file(tmp_path, b"\n", 0o600)
    with pytest.raises(ValueError, match="empty"):
        load_secret(env={}, path=path)
