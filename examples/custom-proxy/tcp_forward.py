"""A minimal custom managed proxy: plain TCP from its public port to the local service.

It shows the contract every managed proxy follows (Consul 1.2-1.5 "custom proxy
integration"): read CONNECT_PROXY_ID, CONNECT_PROXY_TOKEN and CONSUL_HTTP_ADDR from the
environment, fetch ``/v1/agent/connect/proxy/<id>``, and keep watching it with
hash-blocking queries so that config changes apply without a restart. Standard library
only. No TLS: the built-in proxy is the one that speaks mutual TLS.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import threading
import urllib.request


def log(message: str) -> None:
    print(f"tcp_forward: {message}", file=sys.stderr, flush=True)


def fetch_config(content_hash: str = "") -> tuple[dict, str]:
    query = f"?hash={content_hash}&wait=5m" if content_hash else ""
    request = urllib.request.Request(
        f"http://{os.environ['CONSUL_HTTP_ADDR']}/v1/agent/connect/proxy/{os.environ['CONNECT_PROXY_ID']}{query}",
        headers={"X-Consul-Token": os.environ["CONNECT_PROXY_TOKEN"]},
    )
    with urllib.request.urlopen(request, timeout=330) as response:
        data = json.load(response)
    return data["Config"], data["ContentHash"]


async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        writer.write_eof()
    except (ConnectionError, OSError):
        pass


class Forwarder:
    def __init__(self) -> None:
        self.target = ("127.0.0.1", 0)
        self.server: asyncio.Server | None = None
        self.listening = ("", 0)

    async def handle(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        try:
            app_reader, app_writer = await asyncio.open_connection(*self.target)
        except OSError as exc:
            log(f"cannot reach the local service at {self.target[0]}:{self.target[1]}: {exc}")
            client_writer.close()
            return
        await asyncio.gather(pipe(client_reader, app_writer), pipe(app_reader, client_writer))
        app_writer.close()
        client_writer.close()

    async def apply(self, config: dict) -> None:
        host, _, port = config["local_service_address"].rpartition(":")
        self.target = (host, int(port))
        listen = (config.get("bind_address", "0.0.0.0"), int(config["bind_port"]))
        if listen != self.listening:
            if self.server is not None:
                self.server.close()
            self.server = await asyncio.start_server(self.handle, *listen)
            self.listening = listen
            log(f"listening on {listen[0]}:{listen[1]}")
        log(f"forwarding to {host}:{port}")


def watch(loop: asyncio.AbstractEventLoop, updates: asyncio.Queue, content_hash: str) -> None:
    """Blocking queries on a daemon thread (it must not delay the proxy's exit)."""
    while True:
        try:
            config, new_hash = fetch_config(content_hash)
        except OSError as exc:
            log(f"config watch failed ({exc}); retrying in 1s")
            threading.Event().wait(1)
            continue
        if new_hash != content_hash:
            content_hash = new_hash
            loop.call_soon_threadsafe(updates.put_nowait, config)


async def main() -> None:
    forwarder = Forwarder()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    config, content_hash = fetch_config()
    await forwarder.apply(config)
    updates: asyncio.Queue = asyncio.Queue()
    threading.Thread(target=watch, args=(loop, updates, content_hash), daemon=True).start()
    stopping = asyncio.ensure_future(stop.wait())
    while not stop.is_set():
        update = asyncio.ensure_future(updates.get())
        await asyncio.wait({update, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if update.done():
            await forwarder.apply(update.result())
        else:
            update.cancel()
    log("stopping")


if __name__ == "__main__":
    asyncio.run(main())
