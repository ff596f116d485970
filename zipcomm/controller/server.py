"""The controller's asyncio shell: sessions, heartbeats, and executing pushes."""

from __future__ import annotations

import asyncio
import logging
import time

from ..errors import ConnectionClosed, MembershipError, ProtocolError, RemoteProtocolError
from ..protocol import messages as m
from ..transport.connection import Connection, Server, start_server
from .state import ControllerState, Push

log = logging.getLogger("zipcomm.controller")


class Controller:
    """Membership service. ``async with Controller("127.0.0.1:0") as c: c.address``."""

    def __init__(
        self,
        listen: str = "127.0.0.1:0",
        *,
        secret: bytes | None = None,
        fanout: int = 4,
        depth_slack: int = 1,
        heartbeat: float = 1.0,
        heartbeat_timeout: float = 5.0,
    ) -> None:
        self._listen = listen
        self._secret = secret
        self.state = ControllerState(fanout=fanout, depth_slack=depth_slack)
        self.heartbeat = heartbeat
        self.heartbeat_timeout = heartbeat_timeout
        self._sessions: dict[int, Connection] = {}
        self._last_seen: dict[int, float] = {}
        self._server: Server | None = None
        self._sweeper: asyncio.Task | None = None
        self.address = ""

    async def start(self) -> None:
        self._server = await start_server(self._listen, self._serve, secret=self._secret)
        self.address = self._server.address
        self._sweeper = asyncio.create_task(self._sweep(), name="controller-heartbeat-sweep")

    async def aclose(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            await asyncio.gather(self._sweeper, return_exceptions=True)
            self._sweeper = None
        if self._server is not None:
            await self._server.aclose()
            self._server = None

    async def __aenter__(self) -> Controller:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # -- sessions ------------------------------------------------------------

    async def _serve(self, conn: Connection) -> None:
        hello = m.decode(await conn.recv())
        if not isinstance(hello, m.Hello):
            raise RemoteProtocolError(f"expected hello, got {hello.OP!r}")
        member = hello.member
        old = self._sessions.get(member)
        if old is not None:  # a reconnect of the same incarnation replaces the old session
            old.abort()
        self.state.hello(member, hello.address, hello.host)
        self._sessions[member] = conn
        self._last_seen[member] = time.monotonic()
        conn.send(*m.Welcome(heartbeat=self.heartbeat, timeout=self.heartbeat_timeout).to_frame())
        try:
            while True:
                frame = await conn.recv()
                self._last_seen[member] = time.monotonic()
                msg = m.decode(frame)
                self._handle(member, conn, msg)
        except (ConnectionClosed, ProtocolError) as exc:
            log.info("member %x session ended: %s", member, exc)
        finally:
            if self._sessions.get(member) is conn:
                del self._sessions[member]
                self._last_seen.pop(member, None)
                self._execute(self.state.session_lost(member))

    def _handle(self, member: int, conn: Connection, msg: m.Message) -> None:
        match msg:
            case m.Ping():
                conn.send(*m.Ping().to_frame())
            case m.Join(req=req, channel=ch, kind=kind, role=role, epoch_hint=hint):
                self._answer(conn, req, lambda: self._join(member, ch, kind, role, hint))
            case m.Leave(req=req, channel=ch):
                self._answer(conn, req, lambda: self._leave(member, ch))
            case m.LookupRoot(req=req, channel=ch):
                self._answer(conn, req, lambda: self.state.root(ch))
            case m.ListMembers(req=req, channel=ch):
                self._answer(conn, req, lambda: self.state.member_list(ch))
            case _:
                raise RemoteProtocolError(f"op {msg.OP!r} is not a controller request")

    def _join(self, member: int, channel: str, kind: str, role: str, hint: int) -> dict:
        result, pushes = self.state.join(member, channel, kind, role, hint)
        self._execute(pushes)
        return result

    def _leave(self, member: int, channel: str) -> dict:
        self._execute(self.state.leave(member, channel))
        return {}

    def _answer(self, conn: Connection, req: int, compute) -> None:
        try:
            reply = m.Reply(req=req, ok=True, result=compute())
        except MembershipError as exc:
            reply = m.Reply(req=req, ok=False, error=str(exc), code=exc.code)
        conn.send(*reply.to_frame())

    def _execute(self, pushes: list[Push]) -> None:
        for target, msg in pushes:
            conn = self._sessions.get(target)
            if conn is None or conn.is_closed:
                continue  # its own session loss will repair the tree around it
            try:
                conn.send(*msg.to_frame())
            except ConnectionClosed:
                pass

    async def _sweep(self) -> None:
        """Drop sessions that went silent (a SIGSTOPped member keeps its socket open)."""
        while True:
            await asyncio.sleep(self.heartbeat)
            deadline = time.monotonic() - self.heartbeat_timeout
            for member, seen in list(self._last_seen.items()):
                if seen < deadline:
                    conn = self._sessions.get(member)
                    log.warning("member %x missed heartbeats for %.1fs: dropping", member, self.heartbeat_timeout)
                    if conn is not None:
                        conn.abort()
