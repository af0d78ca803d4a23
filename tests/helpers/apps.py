"""Small TCP apps on loopback for proxy tests: they count what reaches them."""

from __future__ import annotations

import hashlib
import socket
import threading
from typing import Any


class EchoApp:
    """Echoes bytes; after the client's end-of-stream it sends ``trailer`` and closes.

    ``accepted`` counts connections that reached the app (a denied client must never
    add to it).
    """

    def __init__(self, trailer: bytes = b"") -> None:
        self.trailer = trailer
        self.accepted = 0
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(1024)
        self.port = int(self.sock.getsockname()[1])
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._running = True
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while self._running:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with self._lock:
                self.accepted += 1
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            try:
                while data := conn.recv(65536):
                    conn.sendall(data)
                if self.trailer:
                    conn.sendall(self.trailer)
            except OSError:
                pass

    def close(self) -> None:
        self._running = False
        self.sock.close()


class SinkSource:
    """Per connection: hash everything received while sending ``size`` pseudo-random bytes."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.results: list[dict[str, Any]] = []
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = int(self.sock.getsockname()[1])
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        received = hashlib.sha256()
        count = 0
        sender = threading.Thread(target=send_pattern, args=(conn, self.size, b"app"), daemon=True)
        sender.start()
        try:
            while data := conn.recv(1 << 20):
                received.update(data)
                count += len(data)
        except OSError:
            pass
        sender.join()
        conn.close()
        self.results.append({"bytes": count, "sha256": received.hexdigest()})

    def close(self) -> None:
        self.sock.close()


def pattern_block(seed: bytes) -> bytes:
    block = b""
    counter = 0
    while len(block) < 1 << 20:
        block += hashlib.sha256(seed + counter.to_bytes(8, "big")).digest()
        counter += 1
    return block


def send_pattern(conn: socket.socket, size: int, seed: bytes) -> str:
    """Send ``size`` bytes of a seeded pattern, then end the stream; return their sha256."""
    block = pattern_block(seed)
    digest = hashlib.sha256()
    remaining = size
    try:
        while remaining > 0:
            chunk = block[: min(remaining, len(block))]
            conn.sendall(chunk)
            digest.update(chunk)
            remaining -= len(chunk)
        conn.shutdown(socket.SHUT_WR)
    except OSError:
        pass
    return digest.hexdigest()
