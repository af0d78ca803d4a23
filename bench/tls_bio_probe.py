"""Would running the proxies' TLS over ``ssl.MemoryBIO`` speed up bulk transfer?

``python -m bench.tls_bio_probe [GiB]`` (default 2): a one-way relay pair on loopback --
source -> encrypting relay -> TLS -> decrypting relay -> sink, each a process of its own --
run with the socket BIO the proxies use (OpenSSL reads a record's header, then its body:
two ``read`` calls per 16 KiB record, one ``write`` per record) and with memory BIOs (one
``recv``/``send`` per 256 KiB, records encrypted and decrypted in memory), alternating.
It answers the question the proxy benchmark's profile raised; the proxies do not use it.
"""

from __future__ import annotations

import datetime
import os
import select
import signal
import socket
import ssl
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

CHUNK = 256 * 1024
RECORD = 16384


def _certificate(directory: str) -> tuple[str, str]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "probe")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = os.path.join(directory, "cert.pem"), os.path.join(directory, "key.pem")
    with open(cert_file, "wb") as handle:
        handle.write(cert.public_bytes(serialization.Encoding.PEM))
    with open(key_file, "wb") as handle:
        handle.write(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
    return cert_file, key_file


def _listener() -> socket.socket:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    return sock


def _handshake(
    tls: ssl.SSLObject, raw: socket.socket, incoming: ssl.MemoryBIO, outgoing: ssl.MemoryBIO
) -> None:
    while True:
        try:
            tls.do_handshake()
            break
        except ssl.SSLWantReadError:
            raw.sendall(outgoing.read())
            data = raw.recv(65536)
            if not data:
                raise ConnectionError("handshake cut") from None
            incoming.write(data)
    raw.sendall(outgoing.read())


def _sink(listener: socket.socket) -> None:
    conn, _ = listener.accept()
    buffer = bytearray(1 << 20)
    while conn.recv_into(buffer):
        pass


def _read_gathered(read: Callable[[int, Any], Any], view: memoryview) -> tuple[int, bool]:
    """Decrypt what is here into ``view``, as the proxies gather records; (bytes, ended)."""
    got = 0
    try:
        while got <= CHUNK - RECORD:
            count = int(read(CHUNK - got, view[got:]))
            if not count:
                return got, True
            got += count
    except ssl.SSLWantReadError:
        pass
    except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
        return got, True
    return got, False


def _decrypt(mode: str, listener: socket.socket, sink: tuple[str, int], cert: tuple[str, str]) -> None:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(*cert)
    raw, _ = listener.accept()
    out = socket.create_connection(sink)
    view = memoryview(bytearray(CHUNK))
    if mode == "socket":
        wrapped = context.wrap_socket(raw, server_side=True)
        wrapped.setblocking(False)
        while True:
            got, ended = _read_gathered(wrapped.read, view)
            out.sendall(view[:got])
            if ended:
                return
            if not got:
                select.select([wrapped], [], [])
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_side=True)
    _handshake(tls, raw, incoming, outgoing)
    raw.setblocking(False)
    received = memoryview(bytearray(CHUNK))
    while True:
        try:
            count = raw.recv_into(received)
            if count:
                incoming.write(received[:count])
            else:
                incoming.write_eof()
        except BlockingIOError:
            pass
        got, ended = _read_gathered(tls.read, view)
        out.sendall(view[:got])
        if ended:
            return
        if not got:
            select.select([raw], [], [])


def _encrypt(mode: str, listener: socket.socket, peer: tuple[str, int]) -> None:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    plain, _ = listener.accept()
    raw = socket.create_connection(peer)
    buffer = bytearray(CHUNK)
    view = memoryview(buffer)
    if mode == "socket":
        wrapped = context.wrap_socket(raw)
        while count := plain.recv_into(buffer):
            wrapped.sendall(view[:count])
        socket.socket.shutdown(wrapped, socket.SHUT_WR)
        return
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing)
    _handshake(tls, raw, incoming, outgoing)
    while count := plain.recv_into(buffer):
        tls.write(view[:count])
        raw.sendall(outgoing.read())
    raw.shutdown(socket.SHUT_WR)


def run(mode: str, total: int, cert: tuple[str, str]) -> float:
    """Gbit/s through the pair for ``total`` bytes."""
    sink, decrypting, encrypting = _listener(), _listener(), _listener()
    jobs: list[Callable[[], None]] = [
        lambda: _sink(sink),
        lambda: _decrypt(mode, decrypting, sink.getsockname(), cert),
        lambda: _encrypt(mode, encrypting, decrypting.getsockname()),
    ]
    children = []
    for job in jobs:
        pid = os.fork()
        if pid == 0:
            try:
                job()
            finally:
                os._exit(0)
        children.append(pid)
    try:
        data = memoryview(os.urandom(CHUNK))
        with socket.create_connection(encrypting.getsockname()) as source:
            started = time.perf_counter()
            for _ in range(total // CHUNK):
                source.sendall(data)
            source.shutdown(socket.SHUT_WR)
            os.waitpid(children[0], 0)  # the sink has everything
            return (total // CHUNK) * CHUNK * 8 / (time.perf_counter() - started) / 1e9
    finally:
        for pid in children:
            try:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
            except (ChildProcessError, ProcessLookupError):
                pass
        for sock in (sink, decrypting, encrypting):
            sock.close()


def main() -> int:
    total = int(float(sys.argv[1] if len(sys.argv) > 1 else "2") * 2**30)
    with tempfile.TemporaryDirectory() as directory:
        cert = _certificate(directory)
        figures: dict[str, list[float]] = {"socket": [], "memory": []}
        for _ in range(3):
            for mode in figures:
                figures[mode].append(run(mode, total, cert))
    for mode, runs in figures.items():
        print(f"{mode:>6} BIO: " + ", ".join(f"{gbits:.2f}" for gbits in runs) + " Gbit/s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
