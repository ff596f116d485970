"""The blocking facade: the thesis's API (figure 4.2) for code that is not asyncio.

One background thread per process runs the runtime's event loop; every call
hands a coroutine to it and waits with a deadline. The controller address comes
from ``ZIPCOMM_CONTROLLER`` (how a serverless function gets its configuration)
unless :func:`configure` was called first.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import threading
from typing import Any, Callable

from ._entry import loop_factory
from .channels.shuffle import BOTH
from .errors import ZipTimeout
from .runtime import Runtime, connect

__all__ = ["BroadcastChannel", "ReduceChannel", "ShuffleChannel", "configure", "shutdown"]

_lock = threading.Lock()
_background: _Background | None = None
_settings: dict[str, Any] = {}
_NOTHING: Any = object()


class _Background:
    def __init__(self) -> None:
        factory = loop_factory()
        self.loop = factory() if factory is not None else asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="zipcomm-runtime", daemon=True)
        self.thread.start()
        self.runtime: Runtime = self.call(self._start(), timeout=None)

    async def _start(self) -> Runtime:
        return await connect(**_settings)

    def call(self, coro, timeout: float | None) -> Any:
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError:
            if future.done():
                raise  # the call itself timed out (e.g. CollectiveTimeout): its own error
            future.cancel()
            raise ZipTimeout(f"blocking call did not finish within {timeout}s") from None

    def close(self) -> None:
        try:
            self.call(self.runtime.aclose(), timeout=30)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)
            if not self.thread.is_alive():
                self.loop.close()


def configure(controller: str | None = None, **kwargs: Any) -> None:
    """Set the controller address (and runtime options) before the first channel."""
    with _lock:
        if _background is not None:
            raise RuntimeError("zipcomm is already running in this process; configure() first")
        _settings.clear()
        _settings.update(kwargs)
        if controller is not None:
            _settings["controller"] = controller


def _runtime() -> _Background:
    global _background
    with _lock:
        if _background is None:
            _background = _Background()
            atexit.register(shutdown)
        return _background


def shutdown() -> None:
    """Leave every channel and stop the background runtime (also run at exit)."""
    global _background
    with _lock:
        bg, _background = _background, None
    if bg is not None:
        bg.close()


class _Handle:
    def __init__(self, join: Callable[[Runtime], Any], timeout: float | None) -> None:
        self._bg = _runtime()
        self._core = self._bg.call(join(self._bg.runtime), timeout)

    @property
    def name(self) -> str:
        return self._core.name

    def close(self) -> None:
        """Leave the channel."""
        self._bg.call(self._core.aclose(), timeout=30)

    def __enter__(self):
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class BroadcastChannel(_Handle):
    """``BroadcastChannel(name)``: join; ``send(data)``; ``data = receive()``."""

    def __init__(self, name: str, *, queue_size: int = 64, timeout: float | None = 30.0) -> None:
        super().__init__(lambda rt: rt.broadcast_channel(name, queue_size=queue_size, timeout=timeout), None)

    def send(self, data: Any, timeout: float | None = 30.0) -> None:
        self._bg.call(self._core.send(data, timeout=timeout), None)

    def receive(self, timeout: float | None = None) -> Any:
        return self._bg.call(self._core.receive(timeout=timeout), None)


class ReduceChannel(_Handle):
    """``ReduceChannel(name, reduce_f, handler)``; ``reduce(data)``; ``allreduce(data)``."""

    def __init__(self, name: str, reduce_f: Any = None, handler: Callable[[Any, int], Any] | None = None,
                 *, timeout: float | None = 30.0) -> None:
        super().__init__(lambda rt: rt.reduce_channel(name, reduce_f, handler, timeout=timeout), None)

    def reduce(self, data: Any = _NOTHING, timeout: float | None = 30.0) -> Any:
        if data is _NOTHING:
            return self._bg.call(self._core.reduce(timeout=timeout), None)
        return self._bg.call(self._core.reduce(data, timeout=timeout), None)

    def allreduce(self, data: Any = _NOTHING, timeout: float | None = 30.0) -> Any:
        if data is _NOTHING:
            return self._bg.call(self._core.allreduce(timeout=timeout), None)
        return self._bg.call(self._core.allreduce(data, timeout=timeout), None)


class ShuffleChannel(_Handle):
    """``ShuffleChannel(name, role)``; ``shuffle_send``; ``shuffle_receive``; ``shuffle_send_receive``."""

    def __init__(self, name: str, role: str = BOTH, *, timeout: float | None = 30.0) -> None:
        super().__init__(lambda rt: rt.shuffle_channel(name, role, timeout=timeout), None)

    def shuffle_send(self, data: Any, hash_function: Callable, timeout: float | None = 30.0) -> int:
        return self._bg.call(self._core.shuffle_send(data, hash_function, timeout=timeout), None)

    def shuffle_receive(self, timeout: float | None = 30.0, with_senders: bool = False,
                        parts: bool = False) -> Any:
        return self._bg.call(self._core.shuffle_receive(timeout=timeout, with_senders=with_senders,
                                                        parts=parts), None)

    def shuffle_send_receive(self, data: Any, hash_function: Callable, timeout: float | None = 30.0,
                             with_senders: bool = False, parts: bool = False) -> Any:
        return self._bg.call(self._core.shuffle_send_receive(data, hash_function, timeout=timeout,
                                                             with_senders=with_senders,
                                                             parts=parts), None)
