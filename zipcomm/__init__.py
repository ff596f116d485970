"""zipcomm: broadcast, reduce and shuffle channels between short-lived worker processes.

Async API (for asyncio applications)::

    async with zipcomm.connect("127.0.0.1:7000") as rt:
        bc = await rt.broadcast_channel("weights")
        await bc.send(array)

Blocking API (thesis figure 4.2; the controller comes from ``ZIPCOMM_CONTROLLER``)::

    from zipcomm import BroadcastChannel
    bc = BroadcastChannel("weights")
    data = bc.receive()
"""

from .channels.shuffle import BOTH, RECEIVER, SENDER
from .controller import Controller
from .errors import (
    AuthenticationError,
    BrokenByPeer,
    ChannelClosed,
    ClosedByUs,
    CollectiveTimeout,
    ConnectionClosed,
    FrameTooLarge,
    HandshakeError,
    LocalProtocolError,
    MembershipError,
    ProtocolError,
    RemoteProtocolError,
    UnsupportedPayload,
    ZipError,
    ZipTimeout,
)
from .ops import MAX, MIN, PROD, SUM
from .rpc import RemoteError, RpcClient, RpcPeer, RpcServer, rpc_connect, serve_rpc
from .runtime import Runtime, connect
from .sync import BroadcastChannel, ReduceChannel, ShuffleChannel

__all__ = [
    "connect", "Runtime", "Controller",
    "serve_rpc", "rpc_connect", "RpcServer", "RpcClient", "RpcPeer", "RemoteError",
    "BroadcastChannel", "ReduceChannel", "ShuffleChannel",
    "SENDER", "RECEIVER", "BOTH",
    "SUM", "MIN", "MAX", "PROD",
    "ZipError", "ProtocolError", "LocalProtocolError", "RemoteProtocolError", "FrameTooLarge",
    "HandshakeError", "AuthenticationError", "ConnectionClosed", "ClosedByUs", "BrokenByPeer",
    "ZipTimeout", "CollectiveTimeout", "MembershipError", "ChannelClosed", "UnsupportedPayload",
]
