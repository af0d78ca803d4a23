"""What a health check does on the network: TCP connect, HTTP request, TLS response.

Each probe returns (status, output) and never raises. HTTP is spoken through h11 (the
same library as the API server) so a check's answer is framed correctly whatever the
checked service sends back.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import ssl
from urllib.parse import SplitResult, urlsplit

import h11

from supervisor.catalog.status import CheckStatus
from supervisor.net import split_host_port

MAX_OUTPUT = 4096  # bytes of an HTTP check's body kept as its output (Consul: 4 KiB)


def _reason(exc: Exception) -> str:
    """Go's wording for a failed dial: "connection refused", not asyncio's sentence."""
    code = getattr(exc, "errno", None)
    return os.strerror(code).lower() if code else str(exc)


async def _close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()


def connected_to_itself(writer: asyncio.StreamWriter) -> bool:
    """A TCP connect to a local port in the kernel's ephemeral range, where nothing
    listens, can succeed by connecting to itself (the kernel picked the same port as the
    source): that is not a listener answering."""
    sock = writer.get_extra_info("socket")
    if sock is None:
        return False
    try:
        return bool(sock.getsockname() == sock.getpeername())
    except OSError:
        return False


async def probe_tcp(target: str, timeout: float) -> tuple[CheckStatus, str]:
    try:
        host, port = split_host_port(target)
        _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
    except TimeoutError:
        return CheckStatus.CRITICAL, f"dial tcp {target}: i/o timeout"
    except (OSError, ValueError) as exc:
        return CheckStatus.CRITICAL, f"dial tcp {target}: connect: {_reason(exc)}"
    try:
        if connected_to_itself(writer):
            return CheckStatus.CRITICAL, f"dial tcp {target}: connect: connection refused (self-connect)"
    finally:
        await _close(writer)
    return CheckStatus.PASSING, f"TCP connect {target}: Success"


def _client_hello() -> bytes:
    """The first flight of a TLS client, to see whether a TLS listener answers at all."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_side=False)
    with contextlib.suppress(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


async def probe_tls_listener(target: str, timeout: float) -> tuple[CheckStatus, str]:
    """TCP connect, then a TLS ClientHello that must get an answer within ``timeout``.

    A stopped (SIGSTOP) or wedged proxy still has its listening socket, and the kernel
    completes TCP handshakes into its backlog, so a plain TCP check stays passing while
    every connection blackholes; a proxy that answers a ClientHello is serving.
    """
    try:
        host, port = split_host_port(target)
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
    except TimeoutError:
        return CheckStatus.CRITICAL, f"dial tcp {target}: i/o timeout"
    except (OSError, ValueError) as exc:
        return CheckStatus.CRITICAL, f"dial tcp {target}: connect: {_reason(exc)}"
    try:
        if connected_to_itself(writer):
            return CheckStatus.CRITICAL, f"dial tcp {target}: connect: connection refused (self-connect)"
        writer.write(_client_hello())
        answer = await asyncio.wait_for(reader.read(1), timeout)
    except TimeoutError:
        return (
            CheckStatus.CRITICAL,
            f"TLS {target}: no answer to a TLS hello within {timeout:g}s (proxy not serving)",
        )
    except OSError as exc:
        return CheckStatus.CRITICAL, f"TLS {target}: {exc.strerror or exc}"
    finally:
        await _close(writer)
    if not answer:
        return CheckStatus.CRITICAL, f"TLS {target}: connection closed without a TLS answer"
    return CheckStatus.PASSING, f"TCP connect {target}: Success (TLS listener answering)"


async def probe_http(
    url: str,
    *,
    method: str = "GET",
    headers: tuple[tuple[str, tuple[str, ...]], ...] = (),
    timeout: float = 10.0,
    tls_skip_verify: bool = False,
) -> tuple[CheckStatus, str]:
    """``method url``: 2xx passing, 429 warning, anything else critical (Consul's rule)."""
    where = f"{method} {url}"
    parts = urlsplit(url)
    secure = parts.scheme == "https"
    context = None
    if secure:
        context = ssl.create_default_context()
        if tls_skip_verify:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
    try:
        port = parts.port or (443 if secure else 80)
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(parts.hostname, port, ssl=context), timeout
        )
    except TimeoutError:
        return CheckStatus.CRITICAL, f"{where}: timeout after {timeout:g}s"
    except (OSError, ValueError) as exc:
        return CheckStatus.CRITICAL, f"{where}: {exc}"
    try:
        outcome = await asyncio.wait_for(_exchange(reader, writer, parts, method, headers), timeout)
    except TimeoutError:
        return CheckStatus.CRITICAL, f"{where}: timeout after {timeout:g}s"
    except (OSError, h11.ProtocolError, ValueError) as exc:
        return CheckStatus.CRITICAL, f"{where}: {exc or type(exc).__name__}"
    finally:
        await _close(writer)
    code, reason, body = outcome
    output = f"HTTP {where}: {code} {reason} Output: {body.decode(errors='replace')}"
    if 200 <= code < 300:
        return CheckStatus.PASSING, output
    if code == 429:
        return CheckStatus.WARNING, output
    return CheckStatus.CRITICAL, output


async def _exchange(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    parts: SplitResult,
    method: str,
    headers: tuple[tuple[str, tuple[str, ...]], ...],
) -> tuple[int, str, bytes]:
    conn = h11.Connection(h11.CLIENT)
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    request_headers = [
        ("Host", parts.netloc),
        ("User-Agent", "Consul Health Check"),
        ("Accept", "text/plain, text/*, */*"),
        ("Connection", "close"),
    ]
    request_headers += [(name, value) for name, values in headers for value in values]
    writer.write(conn.send(h11.Request(method=method, target=target, headers=request_headers)))
    writer.write(conn.send(h11.EndOfMessage()))
    await writer.drain()
    status, reason, body = 0, "", bytearray()
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(await reader.read(65536))
            continue
        if isinstance(event, h11.Response):
            status, reason = event.status_code, event.reason.decode("latin-1")
        elif isinstance(event, h11.Data):
            if len(body) < MAX_OUTPUT:
                body += event.data[: MAX_OUTPUT - len(body)]
        elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
            break
    return status, reason, bytes(body)


SCRIPT_OUTPUT_LIMIT = 4096  # Consul's checks.BufSize


async def probe_script(args: tuple[str, ...], timeout: float) -> tuple[CheckStatus, str]:
    """Run a script check (Consul's monitor): exit 0 passing, 1 warning, else critical.

    The command runs in its own session with the agent's environment; on timeout the whole
    process group is killed. Output (stdout and stderr together) is kept to 4 KB.
    """
    try:
        process = await asyncio.create_subprocess_exec(
            *args,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            start_new_session=True,
        )
    except OSError as exc:
        return CheckStatus.CRITICAL, f"cannot run {args[0]}: {exc.strerror or exc}"
    try:
        output, _ = await asyncio.wait_for(process.communicate(), timeout)
    except TimeoutError:
        _kill_group(process.pid)
        await process.wait()
        return CheckStatus.CRITICAL, f"Timed out ({timeout:g}s) running check"
    except asyncio.CancelledError:
        _kill_group(process.pid)
        raise
    text = output[:SCRIPT_OUTPUT_LIMIT].decode("utf-8", "replace")
    if len(output) > SCRIPT_OUTPUT_LIMIT:
        text += f" ... (captured {SCRIPT_OUTPUT_LIMIT} of {len(output)} bytes)"
    code = process.returncode
    status = CheckStatus.PASSING if code == 0 else CheckStatus.WARNING if code == 1 else CheckStatus.CRITICAL
    return status, text


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
