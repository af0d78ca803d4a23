"""The tunnel wire format (``builtin_proxy/frames.py``): frames split across reads of any
size come out whole, in order; a broken stream of frames is a ProtocolError."""

from __future__ import annotations

import random

import pytest

from builtin_proxy.frames import MAX_PAYLOAD, Frame, FrameReader, ProtocolError, header


def frames_of(chunks: list[bytes]) -> list[tuple[str, bytes]]:
    reader, out = FrameReader(), list[tuple[str, bytes]]()

    def on_data(payload: memoryview) -> None:
        if out and out[-1][0] == "DATA":
            out[-1] = ("DATA", out[-1][1] + bytes(payload))
        else:
            out.append(("DATA", bytes(payload)))

    for chunk in chunks:
        reader.feed(memoryview(chunk), on_data, lambda frame: out.append((frame.name, b"")))
    assert reader.rest == b"" and reader.payload_left == 0
    return out


def test_frames_split_anywhere_come_out_whole() -> None:
    payload = bytes(range(256)) * 300
    wire = header(Frame.OPEN) + header(Frame.DATA, len(payload)) + payload + header(Frame.FIN)
    expected = [("OPEN", b""), ("DATA", payload), ("FIN", b"")]
    assert frames_of([wire]) == expected
    rng = random.Random(4)
    for _ in range(50):
        cuts = sorted(rng.sample(range(1, len(wire)), 12))
        chunks = [wire[a:b] for a, b in zip([0, *cuts], [*cuts, len(wire)], strict=True)]
        assert frames_of(chunks) == expected
    assert frames_of([wire[i : i + 1] for i in range(len(wire))]) == expected  # byte by byte


def test_frames_that_arrive_whole_are_delivered_in_one_piece_and_a_stop_keeps_the_rest() -> None:
    pieces: list[bytes] = []
    seen: list[Frame] = []
    wire = header(Frame.DATA, 3) + b"abc" + header(Frame.DATA, 2) + b"de" + header(Frame.FIN)
    wire += header(Frame.OPEN) + header(Frame.DATA, 1) + b"z"  # the next stream's

    def on_frame(frame: Frame) -> bool:
        seen.append(frame)
        return frame is Frame.FIN  # the stream is over: what follows is not its

    reader = FrameReader()
    reader.feed(memoryview(wire), lambda p: pieces.append(bytes(p)), on_frame)
    assert pieces == [b"abc", b"de"] and seen == [Frame.FIN]
    assert reader.rest == header(Frame.OPEN) + header(Frame.DATA, 1) + b"z"


def test_a_data_frame_longer_than_the_limit_is_refused() -> None:
    with pytest.raises(ProtocolError, match="DATA frame of"):
        FrameReader().feed(memoryview(header(Frame.DATA, MAX_PAYLOAD + 1)), lambda _p: None, lambda _f: None)


@pytest.mark.parametrize("bad", [bytes((9, 0, 0, 0)), header(Frame.FIN)[:1] + bytes((0, 0, 1)) + b"x"])
def test_unknown_frames_and_payloads_on_control_frames_are_refused(bad: bytes) -> None:
    with pytest.raises(ProtocolError):
        FrameReader().feed(memoryview(bad), lambda _p: None, lambda _f: None)


class FakeTunnel:
    """Stands in for a tunnel's TLS socket in the pool (a real fd, nothing to read)."""

    def __init__(self) -> None:
        import socket

        self.ours, self.theirs = socket.socketpair()
        self.closed = False

    def fileno(self) -> int:
        return -1 if self.closed else self.ours.fileno()

    def pending(self) -> int:
        return 0

    def close(self) -> None:
        self.closed = True
        self.ours.close()
        self.theirs.close()


def test_the_pool_keeps_its_bounds_and_its_count() -> None:
    from typing import Any, cast

    from builtin_proxy.loop import EventLoop
    from builtin_proxy.stats import TunnelStats
    from builtin_proxy.tunnels import MAX_IDLE_PER_INSTANCE, TunnelPool

    loop, stats = EventLoop(), TunnelStats()
    pool = TunnelPool(loop, stats)
    key = ("10.0.0.1", 21000, 1)
    made = [FakeTunnel() for _ in range(MAX_IDLE_PER_INSTANCE + 4)]
    try:
        for tunnel in made:
            pool.give(key, cast(Any, tunnel), FrameReader(), generation=1)
        assert stats.idle == MAX_IDLE_PER_INSTANCE and sum(t.closed for t in made) == 4
        for _round in range(3):  # taken and given back again and again: the count holds
            taken = [pool.take(key) for _ in range(MAX_IDLE_PER_INSTANCE)]
            assert all(taken) and pool.take(key) is None and stats.idle == 0
            for entry in taken:
                assert entry is not None
                pool.give(key, entry[0], entry[1], generation=1)
            assert stats.idle == MAX_IDLE_PER_INSTANCE
        assert stats.reused == 3 * MAX_IDLE_PER_INSTANCE
        pool.retire(generation=2)  # new certificates: the old tunnels go
        assert stats.idle == 0 and all(t.closed for t in made)
    finally:
        for tunnel in made:
            if not tunnel.closed:
                tunnel.close()
        loop.close()


def test_accept_pauses_instead_of_spinning_when_descriptors_run_out() -> None:
    import errno
    import socket

    from builtin_proxy.loop import EventLoop
    from builtin_proxy.sockets import PAUSE, AcceptPauser

    loop = EventLoop()
    listener = socket.socket()
    try:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        calls: list[int] = []
        loop.watch(listener.fileno(), 1, lambda fd, events: calls.append(fd))
        pauser = AcceptPauser(loop, listener, lambda fd, events: calls.append(fd), "a test listener")
        pauser.failed(OSError(errno.EMFILE, "Too many open files"))
        assert listener.fileno() not in loop._handlers  # not watched while paused
        loop.call_later(PAUSE * 2, loop.stop)
        loop.run()
        assert listener.fileno() in loop._handlers  # watched again after the pause
    finally:
        listener.close()
        loop.close()


def test_dial_reports_a_refusal_a_connection_or_nothing_once_cancelled() -> None:
    import socket

    from builtin_proxy.loop import EventLoop
    from builtin_proxy.sockets import Dial

    loop = EventLoop()
    listener = socket.socket()
    outcomes: list[str] = []
    try:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        closed = socket.socket()
        closed.bind(("127.0.0.1", 0))
        refused_port = closed.getsockname()[1]
        closed.close()  # nothing listens there now

        def connected(sock: socket.socket) -> None:
            outcomes.append("connected")
            sock.close()
            loop.stop()

        def failed(exc: OSError, timed_out: bool) -> None:
            outcomes.append(f"failed timed_out={timed_out}")
            loop.stop()

        Dial(loop, ("127.0.0.1", refused_port), 5, connected, failed)
        if not outcomes:
            loop.run()
        Dial(loop, listener.getsockname(), 5, connected, failed)
        loop.run()
        assert outcomes == ["failed timed_out=False", "connected"]
        cancelled = Dial(loop, listener.getsockname(), 5, connected, failed)
        cancelled.cancel()
        loop.call_later(0.05, loop.stop)
        loop.run()
        assert outcomes == ["failed timed_out=False", "connected"]  # nothing more after cancel
    finally:
        listener.close()
        loop.close()
