"""The controller's asyncio shell: sessions, heartbeats, and executing pushes.

Requests on a session are answered in order, one reply each, so a member may pipeline them (send
many joins without waiting). Every frame a read delivered is handled in the same task step: the
hot path (join) has no await, no task and no log line per request.

A session may host members besides the one its hello named (``Join.member``): they share its
address and host, it receives their pushes (``to`` = the hosted member), and they end with it.
"""

from __future__ import annotations

import asyncio
import logging
import time

from ..errors import ConnectionClosed, LocalProtocolError, MembershipError, ProtocolError, RemoteProtocolError
from ..protocol import messages as m
from ..transport.connection import Connection, Server, start_server
from .state import ControllerState, Push

log = logging.getLogger("zipcomm.controller")

# Members one session may host besides its own: each costs about 1 KB of controller memory
# (bench/controller.py measures it), so one session cannot make the controller hold unbounded state.
MAX_HOSTED_MEMBERS = 1 << 20


class _Session:
    """One member's controller connection and the members it hosts."""

    __slots__ = ("member", "address", "host", "conn", "send", "hosted", "last_seen")

    def __init__(self, member: int, address: str, host: str, conn: Connection) -> None:
        self.member = member
        self.address = address
        self.host = host
        self.conn = conn
        # Replies and pushes: with a transport that can write every frame of a loop iteration
        # at once (Connection.send_soon), a pipelined batch of joins is answered in one system
        # call instead of one per reply; otherwise each goes out as it is made.
        self.send = getattr(conn, "send_soon", conn.send)
        self.hosted: set[int] = set()
        self.last_seen = time.monotonic()


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
        max_hosted_members: int = MAX_HOSTED_MEMBERS,
    ) -> None:
        self._listen = listen
        self._secret = secret
        self.state = ControllerState(fanout=fanout, depth_slack=depth_slack)
        self.heartbeat = heartbeat
        self.heartbeat_timeout = heartbeat_timeout
        self.max_hosted_members = max_hosted_members
        self._sessions: dict[int, _Session] = {}  # by the member its hello named
        self._owner: dict[int, _Session] = {}  # every member (own and hosted) -> its session
        self._server: Server | None = None
        self._sweeper: asyncio.Task | None = None
        self._closing = False
        self.address = ""
        self._requests = {
            "join": self._on_join,
            "leave": self._on_leave,
            "lookup_root": self._on_lookup_root,
            "list_members": self._on_list_members,
            "ping": self._on_ping,
        }

    async def start(self) -> None:
        self._closing = False
        self._server = await start_server(self._listen, self._serve, secret=self._secret)
        self.address = self._server.address
        self._sweeper = asyncio.create_task(self._sweep(), name="controller-heartbeat-sweep")

    async def aclose(self) -> None:
        self._closing = True  # sessions cancelled now need no tree repairs: nobody is told anyway
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
        owner = self._owner.get(member)
        if owner is not None and owner.member != member:
            raise RemoteProtocolError(f"member {member:x} is hosted by another session")
        session = _Session(member, hello.address, hello.host, conn)
        old = self._sessions.get(member)
        if old is not None:  # a reconnect of the same incarnation replaces the old session
            old.conn.abort()
            session.hosted = old.hosted  # and takes over the members it hosted
            for hosted in session.hosted:
                self._owner[hosted] = session
        self.state.hello(member, hello.address, hello.host)
        self._sessions[member] = session
        self._owner[member] = session
        conn.send(*m.Welcome(heartbeat=self.heartbeat, timeout=self.heartbeat_timeout).to_frame())
        requests = self._requests
        monotonic = time.monotonic
        try:
            while True:
                frames = await conn.recv_batch()  # every frame its reads delivered so far
                session.last_seen = monotonic()
                for frame in frames:
                    handler = requests.get(frame.header["op"])
                    if handler is None:
                        raise RemoteProtocolError(f"op {m.decode(frame).OP!r} is not a controller request")
                    handler(session, frame)
        except (ConnectionClosed, ProtocolError) as exc:
            log.info("member %x session ended: %s", member, exc)
        finally:
            if self._sessions.get(member) is session and not self._closing:
                self._end_session(session)

    def _end_session(self, session: _Session) -> None:
        del self._sessions[session.member]
        for member in (session.member, *sorted(session.hosted)):
            if self._owner.get(member) is session:
                del self._owner[member]
            self._execute(self.state.session_lost(member))
        session.hosted = set()

    # -- requests ------------------------------------------------------------

    def _on_ping(self, session: _Session, frame) -> None:
        session.send(*m.Ping().to_frame())

    def _on_join(self, session: _Session, frame) -> None:
        header = frame.header
        req, channel, kind, role = header.get("req"), header.get("channel"), header.get("kind"), header.get("role")
        hint, member = header.get("epoch_hint"), header.get("member")
        # The usual well-typed join skips the generic decoder; anything else gets its exact checks.
        if not (type(req) is int and type(channel) is str and type(kind) is str and type(role) is str
                and type(hint) is int and (member is None or type(member) is int)):
            msg: m.Join = m.Join.from_frame(frame)  # type: ignore[assignment]
            req, channel, kind, role, hint, member = msg.req, msg.channel, msg.kind, msg.role, msg.epoch_hint, msg.member
        try:
            if member is None or member == session.member:
                member = session.member
            else:
                owner = self._owner.get(member)
                if owner is not session:  # else a member this session hosts already
                    member = self._register(session, owner, member, channel)
            try:
                result, pushes = self.state.join(member, channel, kind, role, hint)
            except MembershipError:
                self._release_if_idle(session, member)
                raise
        except MembershipError as exc:
            self._refuse(session, req, exc)
            return
        self._reply(session, req, result)
        if pushes:
            self._execute(pushes)

    def _on_leave(self, session: _Session, frame) -> None:
        msg: m.Leave = m.Leave.from_frame(frame)  # type: ignore[assignment]
        try:
            member = self._acting(session, msg.member, msg.channel)
            pushes = self.state.leave(member, msg.channel)
        except MembershipError as exc:
            self._refuse(session, msg.req, exc)
            return
        self._release_if_idle(session, member)
        self._reply(session, msg.req, {})
        self._execute(pushes)

    def _on_lookup_root(self, session: _Session, frame) -> None:
        msg: m.LookupRoot = m.LookupRoot.from_frame(frame)  # type: ignore[assignment]
        try:
            result = self.state.root(msg.channel)
        except MembershipError as exc:
            self._refuse(session, msg.req, exc)
            return
        self._reply(session, msg.req, result)

    def _on_list_members(self, session: _Session, frame) -> None:
        msg: m.ListMembers = m.ListMembers.from_frame(frame)  # type: ignore[assignment]
        try:
            result = self.state.member_list(msg.channel)
        except MembershipError as exc:
            self._refuse(session, msg.req, exc)
            return
        self._reply(session, msg.req, result)

    def _acting(self, session: _Session, member: int | None, channel: str) -> int:
        """The member a request acts for: the session's own, or one it hosts (registered by its first join)."""
        if member is None or member == session.member:
            return session.member
        owner = self._owner.get(member)
        if owner is session:
            return member
        if owner is not None:
            raise MembershipError("member id belongs to another session", channel=channel, member=member)
        raise MembershipError("not a member", channel=channel, member=member)

    def _register(self, session: _Session, owner: _Session | None, member: int, channel: str) -> int:
        """Host ``member`` (owned by ``owner``, another session or None) on ``session``: its first join."""
        if owner is not None:
            raise MembershipError("member id belongs to another session", channel=channel, member=member)
        if len(session.hosted) >= self.max_hosted_members:
            raise MembershipError(f"a session may host at most {self.max_hosted_members} members",
                                  channel=channel, member=member)
        self.state.hello(member, session.address, session.host)
        self._owner[member] = session
        session.hosted.add(member)
        return member

    def _release_if_idle(self, session: _Session, member: int) -> None:
        """A hosted member in no channel any more is forgotten (its id may be reused)."""
        if member != session.member and self.state.channel_count(member) == 0:
            session.hosted.discard(member)
            if self._owner.get(member) is session:
                del self._owner[member]
            self.state.session_lost(member)

    # -- sending -------------------------------------------------------------

    def _reply(self, session: _Session, req: int, result: dict) -> None:
        try:
            session.send({"op": "reply", "req": req, "ok": True, "result": result, "error": "", "code": ""})
        except LocalProtocolError as exc:  # e.g. the member list of a huge channel: refuse, keep the session
            log.warning("cannot send the reply to request %d of member %x: %s", req, session.member, exc)
            session.send(*m.Reply(req=req, ok=False, error=f"reply not sendable: {exc}").to_frame())

    @staticmethod
    def _refuse(session: _Session, req: int, exc: MembershipError) -> None:
        session.send(*m.Reply(req=req, ok=False, error=str(exc), code=exc.code).to_frame())

    def _execute(self, pushes: list[Push]) -> None:
        owners = self._owner
        for target, msg in pushes:
            session = owners.get(target)
            if session is None or session.conn.is_closed:
                continue  # its own session loss will repair the tree around it
            if target != session.member:
                msg.to = target  # type: ignore[attr-defined]  # Rewire and Gone carry it
            try:
                session.send(*msg.to_frame())
            except ConnectionClosed:
                pass

    async def _sweep(self) -> None:
        """Drop sessions that went silent (a SIGSTOPped member keeps its socket open)."""
        while True:
            await asyncio.sleep(self.heartbeat)
            deadline = time.monotonic() - self.heartbeat_timeout
            for session in list(self._sessions.values()):
                if session.last_seen < deadline:
                    log.warning("member %x missed heartbeats for %.1fs: dropping", session.member,
                                self.heartbeat_timeout)
                    session.conn.abort()
