"""The built-in proxy's event loop in-process: a callback that raises costs only what it
served (logged once), never the loop and every other connection with it."""

from __future__ import annotations

import logging
import socket

import pytest

from builtin_proxy.loop import READ, EventLoop


class Owner:
    def __init__(self, loop: EventLoop, sock: socket.socket, fail: bool) -> None:
        self.loop = loop
        self.sock = sock
        self.fail = fail
        self.closed = False
        self.reads = 0
        loop.watch(sock.fileno(), READ, self.on_read)

    def on_read(self, fd: int, events: int) -> None:
        self.sock.recv(16)
        self.reads += 1
        if self.fail:
            raise RuntimeError("a bug in one connection")

    def close(self) -> None:
        self.closed = True


def test_a_raising_callback_closes_only_its_owner(caplog: pytest.LogCaptureFixture) -> None:
    loop = EventLoop()
    pairs = [socket.socketpair() for _ in range(2)]
    try:
        bad = Owner(loop, pairs[0][0], fail=True)
        good = Owner(loop, pairs[1][0], fail=False)
        pairs[0][1].send(b"x")
        pairs[1][1].send(b"x")
        loop.call_later(0.05, pairs[1][1].send, b"y")
        loop.call_later(0.05, pairs[0][1].send, b"y")  # no longer watched: nothing happens
        loop.call_later(0.1, lambda: (_ for _ in ()).throw(ValueError("a timer bug")))
        loop.call_later(0.2, loop.stop)
        loop.run()
        assert bad.closed and bad.reads == 1  # unwatched and closed after its failure
        assert not good.closed and good.reads == 2  # the loop and the other connection went on
        errors = [r for r in caplog.records if r.levelno == logging.ERROR]
        assert len(errors) == 2 and "Owner.on_read" in errors[0].getMessage()
    finally:
        loop.close()
        for a, b in pairs:
            a.close()
            b.close()
