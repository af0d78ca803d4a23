"""Cluster mode: agents on many hosts form one mesh through etcd (``cluster`` config block).

``Cluster`` puts the parts together for the composition root: the catalog storage that
merges this host with the mirror of etcd (``storage.py``), and the member that keeps this
host's lease and records in etcd and the mirror current (``member.py``). Without a
``cluster`` block none of this is built and the agent is the single-host agent.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from supervisor.catalog.index import Index
from supervisor.cluster.layout import Layout
from supervisor.cluster.member import ClusterMember, Deliver, Identity
from supervisor.cluster.records import Render
from supervisor.cluster.state import ClusterState
from supervisor.cluster.storage import ClusterStorage
from supervisor.config.model import AgentConfig

__all__ = ["Cluster", "ClusterState"]


class Cluster:
    def __init__(
        self, config: AgentConfig, node_id: str, index: Index, render: Render, data_dir: str | None
    ) -> None:
        cluster = config.cluster
        self.layout = Layout(cluster.key_prefix, config.datacenter)
        self.identity = Identity(config.node_name, node_id)
        self.storage = ClusterStorage(self.layout, config.node_name, index, render, self._publish)
        self.config = cluster
        self.lease_file = os.path.join(data_dir, "cluster", "lease.json") if data_dir else None
        self.member: ClusterMember | None = None
        self._pending: dict[str, bytes] | None = None

    def start(self, deliver: Deliver, on_change: Callable[[], None]) -> None:
        self.member = ClusterMember(
            self.config,
            self.layout,
            self.identity,
            self.storage,
            deliver,
            on_change,
            lease_file=self.lease_file,
        )
        if self._pending is not None:
            self.member.want(self._pending)
        self.member.start()

    def _publish(self, records: dict[str, bytes]) -> None:
        if self.member is None:
            self._pending = records  # (the catalog's first publication comes before start)
        else:
            self.member.want(records)

    def stop(self) -> None:
        if self.member is not None:
            self.member.stop()

    def leave(self) -> None:
        if self.member is not None:
            self.member.leave()

    def contact(self) -> tuple[bool, int]:
        return self.member.contact() if self.member is not None else (False, 0)

    def status(self) -> dict[str, Any]:
        if self.member is None:
            return {"State": str(ClusterState.JOINING)}
        return self.member.status()
