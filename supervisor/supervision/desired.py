"""What should run: one planned proxy per service that asks for a managed proxy.

Pure: port probing and token generation are injected, so planning is tested without
sockets. The *spec* is what a restart decision compares (DESIGN section 4): the command
as declared (the built-in proxy is one symbolic command), exec mode, proxy ID, token and
the environment the agent sets explicitly -- never the agent's ambient environment, and
never the proxy's ``config`` map, which reaches a running proxy through the config
endpoint instead.
"""

from __future__ import annotations

import hashlib
import json
import random
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from supervisor.config.model import BUILTIN_COMMAND, AgentConfig, ServiceDef, Upstream, freeze, thaw
from supervisor.net import join_host_port
from supervisor.process.privileges import RunAs, UnknownUser, resolve_run_as
from supervisor.state.datadir import Allocation

ENV_PROXY_ID = "CONNECT_PROXY_ID"
ENV_PROXY_TOKEN = "CONNECT_PROXY_TOKEN"
ENV_HTTP_ADDR = "CONSUL_HTTP_ADDR"
ENV_HTTP_SSL = "CONSUL_HTTP_SSL"


@dataclass(frozen=True)
class ProxySpec:
    """The declared parts of a proxy; a change of any of them restarts the proxy."""

    proxy_id: str
    command: tuple[str, ...]
    exec_mode: str
    token: str
    env: tuple[tuple[str, str], ...]
    user: str = ""  # "user" or "user:group" as configured; "": the agent's user
    die_with_agent: bool = False

    @property
    def hash(self) -> str:
        parts: list[Any] = [
            self.proxy_id,
            list(self.command),
            self.exec_mode,
            self.token,
            [list(pair) for pair in self.env],
        ]
        if self.user or self.die_with_agent:  # (absent before: the hashes of running proxies hold)
            parts += [self.user, self.die_with_agent]
        canonical = json.dumps(parts, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]

    @property
    def is_builtin(self) -> bool:
        return self.command == BUILTIN_COMMAND


@dataclass(frozen=True)
class PlannedProxy:
    """A managed proxy the configuration wants, with everything resolved."""

    service: ServiceDef
    spec: ProxySpec
    port: int  # 0: no port could be allocated (see ``problem``)
    bind_address: str
    config: Mapping[str, Any]  # the effective config the proxy sees (defaults filled in)
    upstreams: tuple[Upstream, ...]
    problem: str | None = None  # why it cannot be started, if it cannot
    run_as: RunAs | None = None  # None: the agent's own user

    @property
    def proxy_id(self) -> str:
        return self.service.proxy_id

    @property
    def spec_hash(self) -> str:
        return self.spec.hash


@dataclass
class Plan:
    proxies: dict[str, PlannedProxy] = field(default_factory=dict)
    allocations: dict[str, Allocation] = field(default_factory=dict)


def address_for_proxies(host: str, port: int) -> str:
    """The API address proxies should use: a wildcard listen address is reached on loopback
    (Consul turned 0.0.0.0 into 127.0.0.1 and :: into [::1] the same way)."""
    if host in ("0.0.0.0", ""):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    return join_host_port(host, port)


def plan_proxies(
    config: AgentConfig,
    api_address: str,
    previous: Mapping[str, Allocation],
    port_is_free: Callable[[str, int], bool],
    new_token: Callable[[], str] = lambda: str(uuid.uuid4()),
    rng: random.Random | None = None,
    registered: Sequence[ServiceDef] = (),
    resolve_user: Callable[[str, str | None], RunAs] = resolve_run_as,
) -> Plan:
    """Plan every managed proxy of ``config`` (and of API ``registered`` services), reusing
    earlier tokens and ports."""
    rng = rng or random.Random()
    plan = Plan()
    managed = [*config.managed_services(), *(s for s in registered if s.managed_proxy is not None)]
    fixed_ports = {int(port) for service in managed if (port := _configured_port(config, service))}
    taken: set[int] = set(fixed_ports)
    # Proxies that keep an earlier auto-assigned port claim it before any new one is picked.
    for service in managed:
        earlier = previous.get(service.proxy_id)
        if earlier and earlier.port_auto and not _configured_port(config, service):
            if (
                config.proxy_min_port <= earlier.port <= config.proxy_max_port
                and earlier.port not in fixed_ports
            ):
                taken.add(earlier.port)
    for service in managed:
        plan.proxies[service.proxy_id], allocation = _plan_one(
            config,
            service,
            api_address,
            previous.get(service.proxy_id),
            taken,
            port_is_free,
            new_token,
            rng,
            resolve_user,
        )
        plan.allocations[service.proxy_id] = allocation
    return plan


def _configured_port(config: AgentConfig, service: ServiceDef) -> int:
    proxy = service.managed_proxy
    assert proxy is not None
    port = proxy.config.get("bind_port") or config.proxy_defaults.config.get("bind_port") or 0
    return int(port)


def _plan_one(
    config: AgentConfig,
    service: ServiceDef,
    api_address: str,
    earlier: Allocation | None,
    taken: set[int],
    port_is_free: Callable[[str, int], bool],
    new_token: Callable[[], str],
    rng: random.Random,
    resolve_user: Callable[[str, str | None], RunAs],
) -> tuple[PlannedProxy, Allocation]:
    proxy = service.managed_proxy
    assert proxy is not None
    bind_address = str(
        proxy.config.get("bind_address")
        or config.proxy_defaults.config.get("bind_address")
        or config.bind_addr
    )
    token = earlier.token if earlier else new_token()
    problem = None
    fixed = _configured_port(config, service)
    if fixed:
        port, port_auto = fixed, False
    elif earlier and earlier.port_auto and config.proxy_min_port <= earlier.port <= config.proxy_max_port:
        port, port_auto = earlier.port, True
    else:
        port = _pick_port(config, bind_address, taken, port_is_free, rng)
        port_auto = True
        if port == 0:
            problem = (
                f"no free port left in ports.proxy_min_port..proxy_max_port "
                f"({config.proxy_min_port}-{config.proxy_max_port}); widen the range or free a port"
            )
    taken.add(port)
    user, group = (proxy.user, proxy.group) if proxy.user else (config.proxy_user, config.proxy_group)
    run_as = None
    if user:
        try:
            run_as = resolve_user(user, group or None)
        except UnknownUser as exc:
            problem = problem or f"{exc}; create it, or change the setting"
    command = proxy.command or config.proxy_defaults.command or BUILTIN_COMMAND
    spec = ProxySpec(
        proxy_id=service.proxy_id,
        command=tuple(command),
        exec_mode=proxy.exec_mode,
        token=token,
        env=(
            (ENV_HTTP_ADDR, api_address),
            (ENV_HTTP_SSL, "false"),
            (ENV_PROXY_ID, service.proxy_id),
            (ENV_PROXY_TOKEN, token),
        ),
        user=f"{user}:{group}" if user and group else user,
        die_with_agent=config.data_dir is None,
    )
    planned = PlannedProxy(
        service=service,
        spec=spec,
        port=port,
        bind_address=bind_address,
        config=freeze(effective_config(config, service, bind_address, port)),
        upstreams=proxy.upstreams,
        problem=problem,
        run_as=run_as,
    )
    return planned, Allocation(token=token, port=port, port_auto=port_auto)


def effective_config(
    config: AgentConfig, service: ServiceDef, bind_address: str, port: int
) -> dict[str, Any]:
    """What ``GET /v1/agent/connect/proxy/:id`` serves as ``Config``: proxy_defaults.config,
    then the service's config, then the agent's fill-ins for missing keys (Consul's
    ``applyProxyConfigDefaults``)."""
    proxy = service.managed_proxy
    assert proxy is not None
    merged: dict[str, Any] = dict(thaw(config.proxy_defaults.config))
    merged.pop("upstreams", None)
    merged.update(thaw(proxy.config))
    merged["bind_port"] = port
    merged.setdefault("bind_address", bind_address)
    merged.setdefault("local_service_address", f"127.0.0.1:{service.port}")
    return merged


def _pick_port(
    config: AgentConfig,
    bind_address: str,
    taken: set[int],
    port_is_free: Callable[[str, int], bool],
    rng: random.Random,
) -> int:
    """A random port of the proxy range that no proxy claims and nothing on the host holds."""
    candidates = list(range(config.proxy_min_port, config.proxy_max_port + 1))
    rng.shuffle(candidates)
    for port in candidates:
        if port not in taken and port_is_free(bind_address, port):
            return port
    return 0
