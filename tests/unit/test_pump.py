"""builtin_proxy.pump.Connection: copying between a plain socket and a TLS socket on the
event loop: both directions, half-close, end of stream, backpressure and close.

A ``Rig`` is the whole data path of one proxied connection, in one process:

    app  <-socketpair->  plain | Connection | tls  <-socketpair, mutual TLS->  peer

``app`` plays the local application, ``peer`` the other proxy; certificates come from the
repo's CA. The test moves bytes at either end without blocking and turns the real
EventLoop one poll at a time (``turn``), so every step is deterministic.
"""

from __future__ import annotations

import itertools
import random
import socket
import ssl
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pytest

from builtin_proxy.loop import READ, WRITE, EventLoop
from builtin_proxy.pump import Connection
from builtin_proxy.tls import Identity
from supervisor.config.model import CAConfig
from supervisor.connect.ca import CertificateAuthority

CHUNK = 16 * 1024


@pytest.fixture(scope="module")
def contexts(tmp_path_factory: pytest.TempPathFactory) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """(server context of db's proxy, client context of web's proxy), one CA."""
    counter = itertools.count(1)
    ca = CertificateAuthority(str(tmp_path_factory.mktemp("ca") / "ca.json"), "dc1", lambda: next(counter))
    ca.start(CAConfig())
    built = []
    for service in ("db", "web"):
        identity = Identity()
        identity.update_roots(ca.roots_json())
        identity.update_leaf(ca.sign_leaf(service).to_json())
        built.append(identity)
    server, client = built[0].server, built[1].client
    assert server is not None and client is not None
    return server, client


class RecordingLoop(EventLoop):
    """The real loop, remembering the interest each fd was last given (``watch`` is the
    interface between a Connection and its loop)."""

    def __init__(self) -> None:
        super().__init__()
        self.interest: dict[int, int] = {}

    def watch(self, fd: int, mask: int, handler: Callable[[int, int], None]) -> None:
        self.interest[fd] = mask
        super().watch(fd, mask, handler)

    def unwatch(self, fd: int) -> None:
        self.interest.pop(fd, None)
        super().unwatch(fd)


@dataclass
class Rig:
    loop: RecordingLoop
    app: socket.socket
    peer: ssl.SSLSocket
    plain: socket.socket
    tls: ssl.SSLSocket
    closed: list[Connection] = field(default_factory=list)
    open_fds_at_close: list[tuple[int, int]] = field(default_factory=list)
    conn: Connection | None = None

    def on_close(self, connection: Connection) -> None:
        self.closed.append(connection)
        self.open_fds_at_close.append((connection.plain.fileno(), connection.tls.fileno()))

    def turn(self, times: int = 1) -> None:
        """Let the loop handle what is ready now, ``times`` times (never blocks)."""
        for _ in range(times):
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.loop.run()

    def start(self) -> Connection:
        self.conn = Connection(self.loop, self.plain, self.tls, self.on_close)
        self.conn.start()
        return self.conn


def lock_step_handshake(server: ssl.SSLSocket, client: ssl.SSLSocket) -> None:
    waiting = [server, client]
    for _ in range(50):
        for side in list(waiting):
            try:
                side.do_handshake()
            except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                continue
            waiting.remove(side)
        if not waiting:
            return
    raise AssertionError("the handshake did not finish")


@pytest.fixture
def rig(contexts: tuple[ssl.SSLContext, ssl.SSLContext]) -> Iterator[Rig]:
    server, client = contexts
    app, plain = socket.socketpair()
    tls_raw, peer_raw = socket.socketpair()
    for sock in (app, plain, tls_raw, peer_raw):
        sock.setblocking(False)
    tls = server.wrap_socket(tls_raw, server_side=True, do_handshake_on_connect=False)
    peer = client.wrap_socket(peer_raw, server_side=False, do_handshake_on_connect=False)
    lock_step_handshake(tls, peer)
    loop = RecordingLoop()
    rig = Rig(loop, app, peer, plain, tls)
    yield rig
    if rig.conn is not None:
        rig.conn.close()
    for sock in (app, plain, tls, peer):
        sock.close()
    loop.close()


# -- moving bytes without blocking ---------------------------------------------------------------------


def receive(sock: socket.socket) -> bytes | None:
    """What ``sock`` has now; b"" at end of stream; None if nothing yet."""
    got = bytearray()
    while True:
        try:
            data = sock.recv(256 * 1024)
        except (BlockingIOError, ssl.SSLWantReadError):
            return bytes(got) if got else None
        if not data:
            return bytes(got)  # b"" only when nothing came before the end
        got += data


def end_of_stream(sock: socket.socket) -> bool:
    try:
        return sock.recv(1) == b""
    except (BlockingIOError, ssl.SSLWantReadError):
        return False


class Sender:
    """Writes ``payload`` to a non-blocking socket as far as it goes; TLS-safe retries."""

    def __init__(self, sock: socket.socket, payload: bytes) -> None:
        self.sock = sock
        self.payload = payload
        self.sent = 0

    def push(self) -> int:
        """Send until the socket would block; returns how many bytes went this time."""
        before = self.sent
        while self.sent < len(self.payload):
            # TLS needs a retry with the same chunk: keep chunk boundaries fixed.
            chunk = self.payload[self.sent : self.sent + CHUNK]
            try:
                self.sent += self.sock.send(chunk)
            except (BlockingIOError, ssl.SSLWantWriteError, ssl.SSLWantReadError):
                break
        return self.sent - before


def transfer(rig: Rig, sender: socket.socket, receiver: socket.socket, payload: bytes) -> bytes:
    """Stream ``payload`` through the connection, reading as it arrives."""
    out = Sender(sender, payload)
    got = bytearray()
    for _ in range(2000):
        out.push()
        rig.turn()
        data = receive(receiver)
        if data:
            got += data
        if len(got) >= len(payload):
            return bytes(got)
    raise AssertionError(f"only {len(got)} of {len(payload)} bytes arrived")


def turn_until(rig: Rig, condition: Callable[[], bool], turns: int = 50) -> None:
    for _ in range(turns):
        if condition():
            return
        rig.turn()
    raise AssertionError("the connection never got there")


def payload(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


# -- tests ----------------------------------------------------------------------------------------------


def test_bytes_cross_in_both_directions_intact(rig: Rig) -> None:
    rig.start()
    up, down = payload(1_500_000, 1), payload(1_500_000, 2)
    assert transfer(rig, rig.app, rig.peer, up) == up  # encrypted on the way out
    assert transfer(rig, rig.peer, rig.app, down) == down  # decrypted on the way in
    assert rig.closed == []


def test_small_messages_go_out_at_once(rig: Rig) -> None:
    # Interactive traffic: each request is forwarded on the turn it arrives, not batched.
    rig.start()
    for message in (b"GET / HTTP/1.0\r\n", b"\r\n"):
        rig.app.send(message)
        rig.turn()
        assert receive(rig.peer) == message


def test_the_apps_half_close_reaches_the_peer_and_the_reply_still_flows(rig: Rig) -> None:
    rig.start()
    rig.app.send(b"request")
    rig.app.shutdown(socket.SHUT_WR)  # the app is done sending, and waits for the answer
    turn_until(rig, lambda: receive(rig.peer) == b"request")
    turn_until(rig, lambda: end_of_stream(rig.peer))
    reply = payload(600_000, 3)
    assert transfer(rig, rig.peer, rig.app, reply) == reply
    assert rig.closed == []  # one direction still open: the connection lives


def test_the_peers_half_close_reaches_the_app_and_the_app_can_still_send(rig: Rig) -> None:
    rig.start()
    socket.socket.shutdown(rig.peer, socket.SHUT_WR)  # a TCP FIN, as the other proxy sends it
    turn_until(rig, lambda: end_of_stream(rig.app))
    upload = payload(600_000, 4)
    assert transfer(rig, rig.app, rig.peer, upload) == upload
    assert rig.closed == []


def test_a_close_notify_from_the_peer_ends_that_direction_like_a_fin(rig: Rig) -> None:
    rig.start()
    with pytest.raises(ssl.SSLWantReadError):
        rig.peer.unwrap()  # sends close_notify, then would wait for the proxy's
    turn_until(rig, lambda: end_of_stream(rig.app))
    assert rig.closed == []


def test_when_both_directions_ended_the_connection_closes_once(rig: Rig) -> None:
    connection = rig.start()
    rig.app.shutdown(socket.SHUT_WR)
    socket.socket.shutdown(rig.peer, socket.SHUT_WR)
    turn_until(rig, lambda: connection.closed)
    assert rig.closed == [connection]
    # on_close ran before the sockets were closed, and they are closed now.
    ((plain_fd, tls_fd),) = rig.open_fds_at_close
    assert plain_fd >= 0 and tls_fd >= 0
    assert rig.plain.fileno() == -1 and rig.tls.fileno() == -1
    connection.close()
    assert rig.closed == [connection]


@pytest.mark.parametrize("congested", ["app", "peer"])
def test_a_congested_side_stops_the_proxy_reading_the_other_and_loses_nothing(
    rig: Rig, congested: str
) -> None:
    source: socket.socket
    sink: socket.socket
    if congested == "app":
        # A small send buffer makes the kernel take part of a send, as TCP does.
        rig.plain.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 * 1024)
        source, sink, destination_fd, source_fd = rig.peer, rig.app, rig.plain.fileno(), rig.tls.fileno()
    else:
        source, sink, destination_fd, source_fd = rig.app, rig.peer, rig.tls.fileno(), rig.plain.fileno()
    rig.start()
    flood = Sender(source, payload(6_000_000, 5))
    stalled = 0
    for _ in range(400):  # the congested side reads nothing meanwhile
        stalled = stalled + 1 if flood.push() == 0 else 0
        rig.turn()
        if stalled == 5:
            break
    # The sender is blocked: the proxy took no more than socket buffers and one pending
    # read (256 KiB), not everything there was to send ...
    assert stalled == 5
    assert flood.sent < 3_000_000
    # ... and waits to be told the destination drained instead of polling the source:
    # epoll is level-triggered, so a READ interest left on would spin the loop.
    assert rig.loop.interest[source_fd] & READ == 0
    assert rig.loop.interest[destination_fd] & WRITE
    got = bytearray()
    for _ in range(2000):  # the congested side drains; the sender resumes until all is across
        data = receive(sink)
        if data:
            got += data
        if len(got) >= len(flood.payload):
            break
        flood.push()
        rig.turn()
    assert bytes(got) == flood.payload
    assert rig.loop.interest[source_fd] & READ  # reading again


def test_a_peer_that_closes_while_the_app_is_congested_still_delivers_everything(rig: Rig) -> None:
    # A download that ends with the server closing while the client reads slowly: the
    # proxy still holds unsent bytes, and more wait in the socket, when the peer is gone.
    # All of them go out first, then the end of stream.
    rig.plain.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 * 1024)
    rig.start()
    flood = Sender(rig.peer, payload(3_000_000, 7))
    for _ in range(20):
        flood.push()
        rig.turn()
    socket.socket.close(rig.peer)
    assert 0 < flood.sent < len(flood.payload)
    got = bytearray()
    for _ in range(2000):
        rig.turn()
        data = receive(rig.app)
        if data == b"":
            break
        got += data or b""
    assert bytes(got) == flood.payload[: flood.sent]


def test_records_decrypted_before_the_connection_started_are_forwarded(rig: Rig) -> None:
    # The handshake code may have read application data along with the last handshake
    # record: it sits decrypted inside OpenSSL, where epoll cannot see it.
    rig.peer.send(b"early bytes")
    turn_until(rig, lambda: rig.tls.recv(1) == b"e")  # pulls the whole record into OpenSSL
    assert rig.tls.pending() == len(b"arly bytes")
    rig.start()
    assert receive(rig.app) == b"arly bytes"


def test_an_app_that_goes_away_closes_the_connection_without_an_internal_error(
    rig: Rig, caplog: pytest.LogCaptureFixture
) -> None:
    connection = rig.start()
    rig.app.close()  # the app crashed: writes to it now fail with EPIPE
    Sender(rig.peer, payload(100_000, 6)).push()
    turn_until(rig, lambda: connection.closed)
    assert rig.closed == [connection]
    assert not [record for record in caplog.records if record.name == "builtin_proxy.loop"]


def test_a_peer_that_goes_away_mid_stream_closes_the_connection(rig: Rig) -> None:
    connection = rig.start()
    rig.app.send(b"x" * 1000)
    rig.turn()
    socket.socket.close(rig.peer)  # gone without a word: the proxy's next write fails
    rig.app.send(b"y" * 1000)
    turn_until(rig, lambda: connection.closed)
    assert rig.closed == [connection]
