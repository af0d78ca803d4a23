"""Health probes against real sockets in-process: a listener that accepts but never
answers is not serving; a self-connect is not a listener; fast probing backs off."""

from __future__ import annotations

import asyncio
import signal
import socket
import subprocess
import sys
from collections.abc import Awaitable, Callable

from supervisor.catalog.checks import FAST_PROBE_INTERVAL, CheckSpec, CheckState, next_delay, stopped_process
from supervisor.catalog.probes import connected_to_itself, probe_http, probe_tcp, probe_tls_listener
from supervisor.catalog.status import CheckKind, CheckStatus
from tests.helpers.processes import wait_until


def run(coroutine: Awaitable[tuple[CheckStatus, str]]) -> tuple[CheckStatus, str]:
    return asyncio.run(asyncio.wait_for(coroutine, 10))


async def with_server(
    handle: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]],
    probe: Callable[[str], Awaitable[tuple[CheckStatus, str]]],
) -> tuple[CheckStatus, str]:
    handlers: list[asyncio.Task[None]] = []

    async def tracked(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        handlers.append(task)
        try:
            await handle(reader, writer)
        except (OSError, asyncio.IncompleteReadError):
            pass  # the probe hung up first: that is its business
        finally:
            writer.close()

    server = await asyncio.start_server(tracked, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        outcome = await probe(f"127.0.0.1:{port}")
    for task in handlers:
        task.cancel()
    await asyncio.gather(*handlers, return_exceptions=True)
    return outcome


async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await asyncio.sleep(5)  # accepts, reads nothing, says nothing: a wedged proxy
    writer.close()


async def answers(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await reader.read(1)
    writer.write(b"\x16\x03\x03")  # the start of a ServerHello record
    await writer.drain()
    writer.close()


def test_a_listener_that_never_answers_tls_is_not_serving() -> None:
    status, output = run(with_server(silent, lambda target: probe_tls_listener(target, 0.3)))
    assert status is CheckStatus.CRITICAL and "no answer to a TLS hello" in output
    status, _ = run(with_server(silent, lambda target: probe_tcp(target, 0.3)))
    assert status is CheckStatus.PASSING  # what a plain TCP check said about it


def test_a_listener_that_answers_tls_is_serving() -> None:
    status, output = run(with_server(answers, lambda target: probe_tls_listener(target, 2)))
    assert status is CheckStatus.PASSING and "TLS listener answering" in output


def test_nothing_listening_is_critical() -> None:
    with socket.socket() as placeholder:
        placeholder.bind(("127.0.0.1", 0))
        port = placeholder.getsockname()[1]
    status, output = run(probe_tcp(f"127.0.0.1:{port}", 1))
    assert status is CheckStatus.CRITICAL and "refused" in output


def test_a_self_connected_socket_is_recognised() -> None:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.connect(sock.getsockname())  # TCP simultaneous open with itself, as the kernel may pick

    class Writer:
        def get_extra_info(self, name: str) -> socket.socket:
            return sock

    try:
        assert connected_to_itself(Writer())  # type: ignore[arg-type]
    finally:
        sock.close()


def test_http_probe_statuses() -> None:
    async def reply(code: int) -> tuple[CheckStatus, str]:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(f"HTTP/1.1 {code} X\r\nContent-Length: 2\r\n\r\nok".encode())
            await writer.drain()
            writer.close()
            await writer.wait_closed()

        return await with_server(handle, lambda target: probe_http(f"http://{target}/health", timeout=2))

    assert run(reply(200))[0] is CheckStatus.PASSING
    assert run(reply(429))[0] is CheckStatus.WARNING
    status, output = run(reply(503))
    assert status is CheckStatus.CRITICAL and output.endswith("Output: ok")


def test_http_probe_of_garbage_is_critical_not_an_exception() -> None:
    async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"NOT HTTP AT ALL\r\n\r\n")
        await writer.drain()
        writer.close()

    status, _ = run(with_server(garbage, lambda target: probe_http(f"http://{target}/", timeout=2)))
    assert status is CheckStatus.CRITICAL


def test_fast_probes_back_off_to_the_interval() -> None:
    spec = CheckSpec("c", "c", "s", "s", (), CheckKind.TCP, "127.0.0.1:1", interval=10.0)
    state = CheckState(spec, CheckStatus.CRITICAL, "", 1, 1)
    state.probe_fast(now=100.0)
    delays = [next_delay(state, CheckStatus.CRITICAL, 100.0) for _ in range(10)]
    assert delays[:4] == [FAST_PROBE_INTERVAL, 0.1, 0.2, 0.4]
    assert delays[-1] == 10.0 and sum(delays) > 20  # ten probes in over 20 s, not 200 in 10 s
    assert next_delay(state, CheckStatus.PASSING, 100.0) == 10.0
    state.probe_fast(now=100.0)  # a restart begins the fast probing again
    assert next_delay(state, CheckStatus.CRITICAL, 100.0) == FAST_PROBE_INTERVAL
    assert next_delay(state, CheckStatus.CRITICAL, 200.0) == 10.0  # the fast window is over


def test_a_stopped_process_is_recognised() -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"], start_new_session=True)
    try:
        assert stopped_process(child.pid) is None
        child.send_signal(signal.SIGSTOP)
        reason = wait_until(
            lambda: stopped_process(child.pid), timeout=5, message="the stop to show in /proc"
        )
        assert f"proxy process {child.pid} is stopped" in str(reason)
    finally:
        child.kill()
        child.wait(5)
