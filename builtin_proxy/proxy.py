"""The proxy: watches its agent, and runs the public and upstream listeners on one loop.

Everything the agent says arrives through watches (config, CA roots, its leaf, the
intentions naming its service, and per upstream the healthy instances) and is applied
live: upstreams are diffed (added, removed, changed), the public listener moves when its
address changes, new certificates take effect for new connections while established
ones continue. A listener that cannot bind is fatal (exit 1), so the supervisor's
backoff makes the problem visible.
"""

from __future__ import annotations

import gc
import logging
import signal
import urllib.parse
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from builtin_proxy.agent import AgentConnection, AgentError, Requests, Watch
from builtin_proxy.authz import Authorizer
from builtin_proxy.config import ProxyConfig, from_managed, from_service
from builtin_proxy.loop import EventLoop
from builtin_proxy.public import PublicListener
from builtin_proxy.runtime import Runtime
from builtin_proxy.sockets import BindError
from builtin_proxy.tls import parse_service_uri
from builtin_proxy.upstream import UpstreamListener
from supervisor.resources import raise_open_file_limit

if TYPE_CHECKING:
    from builtin_proxy.telemetry import Telemetry

log = logging.getLogger("builtin_proxy.proxy")

EXIT_OK, EXIT_FATAL = 0, 1


class Proxy:
    def __init__(self, agent_address: str, token: str, proxy_id: str, *, managed: bool = True) -> None:
        self.agent_address = agent_address
        self.token = token
        self.proxy_id = proxy_id
        self.managed = managed
        self.loop = EventLoop()
        self.runtime: Runtime | None = None
        self.public: PublicListener | None = None
        self.upstreams: dict[tuple[str, int], UpstreamListener] = {}
        self.watches: list[Watch] = []
        self.service_watches: list[Watch] = []
        self.exit_code = EXIT_OK
        self._requests: Requests | None = None
        self._pending_roots: Any = None  # roots that arrived before the first config
        self.telemetry: Telemetry | None = None  # the metrics endpoint, once one is configured

    # -- running ----------------------------------------------------------------------------

    def run(self) -> int:
        raise_open_file_limit()
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, lambda num, _frame: self.loop.call_soon_threadsafe(self.stop, num))
        quoted = urllib.parse.quote(self.proxy_id, safe="")
        path = f"/v1/agent/connect/proxy/{quoted}" if self.managed else f"/v1/agent/service/{quoted}"
        self._watch("config", path, self._on_config, mode="hash", on_error=self._on_config_error)
        self._watch("CA roots", "/v1/agent/connect/ca/roots", self._on_roots)
        gc.freeze()  # start-up objects need no more collection: shorter GC pauses later
        try:
            self.loop.run()
        finally:
            self._shutdown()
        return self.exit_code

    def stop(self, signum: int | None = None) -> None:
        if signum is not None:
            log.info("stopping (%s)", signal.Signals(signum).name)
        self.loop.stop()

    def fatal(self, message: str) -> None:
        log.error("%s", message)
        self.exit_code = EXIT_FATAL
        self.loop.stop()

    def _shutdown(self) -> None:
        for watch in [*self.watches, *self.service_watches]:
            watch.stop()
        if self.public is not None:
            self.public.close()
        for listener in self.upstreams.values():
            listener.close()
        if self.runtime is not None:
            for pending in list(self.runtime.pending):
                pending.close()
            for connection in list(self.runtime.connections):
                connection.close()
            for tunnel in list(self.runtime.tunnels):
                tunnel.close()
            self.runtime.pool.close()
        if self._requests is not None:
            self._requests.stop()
        if self.telemetry is not None:
            self.telemetry.stop()
        self.loop.close()

    def _watch(self, name: str, path: str, deliver: Callable[[Any], None], **options: Any) -> Watch:
        watch = Watch(
            name,
            AgentConnection(self.agent_address, self.token),
            path,
            self.loop.call_soon_threadsafe,
            deliver,
            **options,
        )
        watch.start()
        self.watches.append(watch)
        return watch

    # -- what the agent tells us --------------------------------------------------------------

    def _on_config_error(self, error: AgentError) -> None:
        if self.runtime is None and error.status in (403, 404):
            self.fatal(f"the agent does not know proxy {self.proxy_id!r}: {error.message}")

    def _on_config(self, data: Any) -> None:
        try:
            config = from_managed(data) if self.managed else from_service(data)
        except (KeyError, TypeError, ValueError) as exc:
            log.error("ignoring a configuration the proxy cannot use: %s", exc)
            return
        try:
            self._apply(config)
        except BindError as exc:
            self.fatal(str(exc))

    def _on_roots(self, data: Any) -> None:
        runtime = self.runtime
        identity = runtime.identity if runtime is not None else None
        if identity is None:
            self._pending_roots = data
            return
        if identity.update_roots(data):
            self._identity_changed("CA roots")

    def _on_leaf(self, data: Any) -> None:
        assert self.runtime is not None
        parsed = parse_service_uri(str(data.get("ServiceURI", "")))
        if parsed is not None:
            self.runtime.datacenter = parsed[1]
        if self.runtime.identity.update_leaf(data):
            self._identity_changed("leaf certificate")

    def _on_intentions(self, _data: Any) -> None:
        if self.runtime is not None:
            self.runtime.authorizer.invalidate()

    def _identity_changed(self, what: str) -> None:
        runtime = self.runtime
        assert runtime is not None
        runtime.sessions.clear()  # sessions belong to the old contexts
        # Tunnels made with the old certificates carry no new streams: idle ones close
        # now, busy ones when their stream is over; the public side asks its peers to go.
        runtime.pool.retire(runtime.identity.generation)
        for tunnel in list(runtime.tunnels):
            tunnel.goaway()
        log.info("TLS identity updated (%s): new connections use it", what)
        try:
            self._ensure_public()
        except BindError as exc:
            self.fatal(str(exc))
            return
        waiters, runtime.identity_waiters = runtime.identity_waiters, []
        for wake in waiters:
            wake()

    # -- applying configuration ----------------------------------------------------------------

    def _apply(self, config: ProxyConfig) -> None:
        runtime = self.runtime
        if runtime is None:
            self._requests = Requests(self.agent_address, self.token, self.loop.call_soon_threadsafe)
            authorizer = Authorizer(config.service, self._requests.submit)
            runtime = self.runtime = Runtime(self.loop, self.agent_address, self.token, config, authorizer)
            if self._pending_roots is not None:
                runtime.identity.update_roots(self._pending_roots)
            log.info("proxy %s for service %s starting", config.proxy_id, config.service)
            self._follow_service(config.service)
        previous = runtime.config
        runtime.config = config
        if previous.service != config.service:
            assert self._requests is not None
            runtime.authorizer = Authorizer(config.service, self._requests.submit)
            self._follow_service(config.service)
        if self.public is not None and self.public.address != config.listen:
            log.info("public listener moves to %s:%d", *config.listen)
            self.public.close()
            self.public = None
        self._ensure_public()
        wanted = {upstream.listen: upstream for upstream in config.upstreams}
        for key, listener in list(self.upstreams.items()):
            if wanted.get(key) != listener.upstream:
                log.info("upstream %s removed or changed", listener.upstream)
                listener.close()
                del self.upstreams[key]
        for key, upstream in wanted.items():
            if key not in self.upstreams:
                self.upstreams[key] = UpstreamListener(runtime, upstream)
        self._apply_telemetry(runtime, config)

    def _apply_telemetry(self, runtime: Runtime, config: ProxyConfig) -> None:
        if config.telemetry is None and self.telemetry is None:
            return  # prometheus_client is imported only by proxies that serve metrics
        if self.telemetry is None:
            from builtin_proxy.telemetry import Telemetry

            self.telemetry = Telemetry(runtime.stats, config.service, config.proxy_id)
        self.telemetry.move(config.telemetry)

    def _ensure_public(self) -> None:
        runtime = self.runtime
        if runtime is None or self.public is not None or runtime.config.bind_port <= 0:
            return
        if runtime.identity.ready:  # no certificates, nothing to serve: wait for them
            self.public = PublicListener(runtime, runtime.config.listen)

    def _follow_service(self, service: str) -> None:
        for watch in self.service_watches:
            watch.stop()
        quoted = urllib.parse.quote(service, safe="")
        self.service_watches = [
            self._watch("leaf", f"/v1/agent/connect/ca/leaf/{quoted}", self._on_leaf),
            self._watch(
                "intentions",
                f"/v1/connect/intentions/match?by=destination&name={quoted}",
                self._on_intentions,
            ),
        ]
