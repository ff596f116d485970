"""cirrus on the Lambda Invoke API: the local endpoint through aiobotocore, and a training run whose
workers are Event invocations of the real worker handler (real servers on loopback)."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import subprocess
import sys
import time

import pytest
from aiobotocore.session import get_session

from cirrus.dataset import write_arrays_sync
from cirrus.generators import criteo_like
from cirrus.lambda_handler import handler
from cirrus.lambda_launch import LambdaLauncher
from cirrus.lambda_local import Function, LambdaServer
from cirrus.models import make_model
from cirrus.ps.client import PSClient
from cirrus.ps.shard import Shard
from zipcomm.testing.wait import process_gone as _dead, until as _until

BITS = 10
MODEL = 2 ** 11


@pytest.fixture(autouse=True)
def aws_env(monkeypatch, tmp_path):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    for var in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_LAMBDA"):
        monkeypatch.delenv(var, raising=False)


FUNCTIONS = {
    "echo": "cirrus.lambda_local:echo",
    "fail": "cirrus.lambda_local:fail",
    "sleep": Function("cirrus.lambda_local:sleep", timeout=1.0),
    "allocate": Function("cirrus.lambda_local:allocate", memory_mb=256),
}


async def _invoke(client, name: str, event, kind: str = "RequestResponse", raw: bytes | None = None):
    resp = await client.invoke(FunctionName=name, InvocationType=kind,
                               Payload=raw if raw is not None else json.dumps(event).encode())
    async with resp["Payload"] as stream:
        body = await stream.read()
    return resp, (json.loads(body) if body else None)


def _with_lambda(body, functions=FUNCTIONS, timeout: float = 20.0):
    """Run ``await body(server, client)`` against a fresh local endpoint."""
    async def go():
        async with LambdaServer(functions, timeout=timeout) as server:
            assert server.address.startswith("127.0.0.1:")
            async with get_session().create_client("lambda", endpoint_url=server.endpoint_url) as client:
                return await body(server, client)
    return asyncio.run(go())


def test_request_response_returns_the_handler_result() -> None:
    async def body(server, client):
        resp, out = await _invoke(client, "echo", {"x": [1, 2, "three"]})
        assert resp["StatusCode"] == 200 and "FunctionError" not in resp
        assert out["event"] == {"x": [1, 2, "three"]} and out["function_name"] == "echo"
        assert out["memory_limit_in_mb"] == 1024 and 0 < out["remaining_ms"] <= 20_000
        assert out["pid"] != os.getpid()  # ran in a subprocess
        resp, out = await _invoke(client, "arn:aws:lambda:us-east-1:000000000000:function:echo", 7)
        assert out["event"] == 7
        resp = await client.invoke(FunctionName="echo", Payload=b"[1]", LogType="Tail")
        async with resp["Payload"] as stream:
            assert json.loads(await stream.read())["event"] == [1]
        assert b"echo [1]" in base64.b64decode(resp["LogResult"])
        resp = await client.invoke(FunctionName="echo", InvocationType="DryRun", Payload=b"{}")
        assert resp["StatusCode"] == 204
        assert server.invocations == 3 and server.running_pids() == []
    _with_lambda(body)


def test_event_returns_202_and_the_handler_runs() -> None:
    async def body(server, client):
        resp, out = await _invoke(client, "echo", {"n": 1}, kind="Event")
        assert resp["StatusCode"] == 202 and out is None
        await _until(lambda: any(i.kind == "Event" for i in server.completed), "the event invocation to finish")
        inv = server.completed[-1]
        assert inv.error is None and inv.result["event"] == {"n": 1}
        assert server.invocations == 1
    _with_lambda(body)


def test_unknown_function_and_bad_requests_are_client_errors() -> None:
    async def body(server, client):
        with pytest.raises(client.exceptions.ResourceNotFoundException):
            await client.invoke(FunctionName="nope", Payload=b"{}")
        with pytest.raises(client.exceptions.InvalidRequestContentException):
            await client.invoke(FunctionName="echo", Payload=b"{not json")
        assert server.invocations == 0
    _with_lambda(body)


def test_a_raising_handler_is_an_unhandled_function_error() -> None:
    async def body(server, client):
        resp, out = await _invoke(client, "fail", {"message": "bad minibatch"})
        assert resp["StatusCode"] == 200 and resp["FunctionError"] == "Unhandled"
        assert out["errorType"] == "ValueError" and out["errorMessage"] == "bad minibatch"
        assert out["stackTrace"]
    _with_lambda(body)


def test_memory_size_caps_the_invocation() -> None:
    async def body(server, client):
        resp, out = await _invoke(client, "allocate", {"mb": 16})
        assert "FunctionError" not in resp and out == {"allocated_mb": 16}
        resp, out = await _invoke(client, "allocate", {"mb": 512})
        assert resp["FunctionError"] == "Unhandled" and out["errorType"] == "MemoryError"
    _with_lambda(body)


def test_timeout_kills_the_invocation() -> None:
    async def body(server, client):
        t0 = time.monotonic()
        call = asyncio.create_task(_invoke(client, "sleep", {"seconds": 60}))
        await _until(lambda: server.running_pids() or call.done(), "the invocation to start")
        pid = server.running_pids()[0]
        resp, out = await call
        assert resp["FunctionError"] == "Unhandled" and "Task timed out after 1.00 seconds" in out["errorMessage"]
        assert time.monotonic() - t0 < 15
        assert _dead(pid) and server.running_pids() == []
    _with_lambda(body)


def test_close_kills_running_invocations() -> None:
    async def go():
        server = LambdaServer({"sleep": "cirrus.lambda_local:sleep"}, timeout=60)
        await server.start()
        try:
            async with get_session().create_client("lambda", endpoint_url=server.endpoint_url) as client:
                resp, _ = await _invoke(client, "sleep", {"seconds": 60}, kind="Event")
                assert resp["StatusCode"] == 202
            await _until(lambda: server.running_pids(), "the invocation to start")
            pids = server.running_pids()
        finally:
            await server.aclose()
        await _until(lambda: all(_dead(p) for p in pids), "the invocation to be killed", limit=2.0)
        assert server.running_pids() == []
    asyncio.run(go())


def test_cli_help_and_serving(tmp_path) -> None:
    out = subprocess.run([sys.executable, "-m", "cirrus.lambda_local", "--help"], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0
    for opt in ("--listen", "--function", "--timeout", "--memory", "--ready-file"):
        assert opt in out.stdout
    bad = subprocess.run([sys.executable, "-m", "cirrus.lambda_local", "--function", "x"], capture_output=True,
                         text=True, timeout=60)
    assert bad.returncode == 2 and "NAME=MODULE:FUNCTION" in bad.stderr

    ready = tmp_path / "ready.json"

    async def go():
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "cirrus.lambda_local", "--listen", "127.0.0.1:0",
            "--function", "echo=cirrus.lambda_local:echo", "--timeout", "30", "--memory", "512",
            "--ready-file", str(ready))
        try:
            await _until(lambda: ready.exists() or proc.returncode is not None, "the ready file")
            info = json.loads(ready.read_text())
            assert info["address"].startswith("127.0.0.1:")
            async with get_session().create_client("lambda", endpoint_url=info["endpoint_url"]) as client:
                resp, out = await _invoke(client, "echo", {"hi": True})
            assert out["event"] == {"hi": True} and out["memory_limit_in_mb"] == 512
        finally:
            if proc.returncode is None:
                proc.terminate()
            code = await asyncio.wait_for(proc.wait(), 30)
        assert code == 0
    asyncio.run(go())


# -- training with Lambda workers --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    data, _ = criteo_like(8_000, hash_bits=BITS, seed=5)
    uri = str(tmp_path_factory.mktemp("lambda-train") / "ds")
    write_arrays_sync(uri, data.labels, csr=(data.indptr, data.indices, data.values, data.n_features),
                      partition_bytes=60_000)
    return uri


async def _create_tables(ps: PSClient) -> None:
    for table in make_model("logistic_regression", model_size=MODEL).tables():
        name, rows, cols = table[:3]
        await ps.create(name, rows, cols, optimizer="adagrad", hyper={"lr": 0.1})


def _spec(uri: str, ps_addr: str, **extra) -> dict:
    return {"model": "logistic_regression", "model_args": {"model_size": MODEL}, "dataset": uri,
            "ps": [ps_addr], "seed": 0, "minibatch_size": 20, "compress": False, "max_updates": None,
            "prefetch_bytes": 1 << 20, "prefetch_concurrency": 2, **extra}


def test_handler_runs_in_process_without_a_context(dataset) -> None:
    async def ps_up():
        shard = Shard(0, 1)
        addr = await shard.start("127.0.0.1:0")
        async with PSClient([addr]) as ps:
            await _create_tables(ps)
        return shard, addr

    loop = asyncio.new_event_loop()
    try:
        shard, addr = loop.run_until_complete(ps_up())
        import threading
        t = threading.Thread(target=loop.run_forever, daemon=True)
        t.start()
        try:
            out = handler(_spec(dataset, addr, worker="w0", inc=0, max_updates=5), None)
        finally:
            asyncio.run_coroutine_threadsafe(shard.aclose(), loop).result(10)
            loop.call_soon_threadsafe(loop.stop)
            t.join(10)
    finally:
        loop.close()
    assert out == {"updates": 5, "reason": "done"}
    with pytest.raises(ValueError, match="'ps'"):
        handler({"worker": "w0", "inc": 0}, None)


def test_lambda_launcher_trains_and_stops_by_retirement(dataset) -> None:
    async def go():
        shard = Shard(0, 1)
        addr = await shard.start("127.0.0.1:0")
        server = LambdaServer({"cirrus-worker": "cirrus.lambda_handler:handler"}, timeout=120, memory_mb=1024)
        await server.start()
        launcher = None
        try:
            async with PSClient([addr]) as ps:
                await _create_tables(ps)
                launcher = LambdaLauncher(_spec(dataset, addr), 2, worker_size_mb=1024, lifetime=None,
                                          retire=ps.retire, endpoint_url=server.endpoint_url,
                                          function_timeout=120)
                await launcher.start()
                assert launcher.started_total == 2 and launcher.pids() == []
                await _until(lambda: len(server.running_pids()) == 2 or len(server.completed) > 0,
                             "both invocations to run")
                pids = server.running_pids()
                assert len(pids) == 2 and server.completed == []

                async def applied() -> int:
                    return sum(s["applied"] for s in await ps.stats())

                loop = asyncio.get_running_loop()
                give_up = loop.time() + 60
                began = loop.time()
                while await applied() < 200 or loop.time() - began < 2.0:  # train for a few seconds
                    assert loop.time() < give_up, "no training progress"
                    assert not server.completed, server.completed[0].error
                    await launcher.maintain()
                    await asyncio.sleep(0.1)
                assert launcher.running_worker_seconds() > 0 and launcher.retirements == 0
                await launcher.stop()
                await _until(lambda: not server.running_pids(), "the lambda workers to exit after retirement")
                assert all(_dead(p) for p in pids)
                stats = await ps.stats()
                assert launcher.worker_seconds > 0
            results = {inv.event["worker"]: inv for inv in server.completed}
            assert sorted(results) == ["w0", "w1"]
            for inv in results.values():  # both workers pushed updates and stopped because they were retired
                assert inv.error is None, inv.error
                assert inv.result["reason"] == "retired" and inv.result["updates"] > 0
            assert stats[0]["applied"] >= 200
        finally:
            if launcher is not None:
                await launcher.stop(grace=1)
            await server.aclose()
            await shard.aclose()
    asyncio.run(go())


def test_lambda_launcher_lifetime_makes_new_incarnations(dataset) -> None:
    async def go():
        shard = Shard(0, 1)
        addr = await shard.start("127.0.0.1:0")
        server = LambdaServer({"cirrus-worker": "cirrus.lambda_handler:handler"}, timeout=120)
        await server.start()
        try:
            async with PSClient([addr]) as ps:
                await _create_tables(ps)
                launcher = LambdaLauncher(_spec(dataset, addr), 1, lifetime=1.0, retire=ps.retire,
                                          endpoint_url=server.endpoint_url, region_name="us-east-1")
                await launcher.start()
                loop = asyncio.get_running_loop()
                give_up = loop.time() + 60
                while launcher.started_total < 3:
                    assert loop.time() < give_up, "no new incarnations"
                    await launcher.maintain()
                    await asyncio.sleep(0.1)
                assert launcher.retirements >= 2 and launcher.slots[0].inc >= 2
                await launcher.stop()
                await _until(lambda: not server.running_pids(), "the lambda workers to exit")
            incs = sorted(inv.event["inc"] for inv in server.completed)
            assert incs[:2] == [0, 1]
            assert all(inv.error is None for inv in server.completed)
        finally:
            await server.aclose()
            await shard.aclose()
    asyncio.run(go())


def test_lambda_launcher_start_fails_for_an_unknown_function() -> None:
    async def go():
        async with LambdaServer({"echo": "cirrus.lambda_local:echo"}) as server:
            launcher = LambdaLauncher({}, 1, function_name="missing", endpoint_url=server.endpoint_url)
            try:
                with pytest.raises(Exception, match="ResourceNotFoundException"):
                    await launcher.start()
            finally:
                await launcher.stop(grace=1)
            assert server.invocations == 0
    asyncio.run(go())
