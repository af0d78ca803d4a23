"""The pure parts of cluster mode, without etcd: the member's state machine, the mirror,
the key layout, indexes from content, records, and sealing the CA key."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from supervisor.catalog.index import Index
from supervisor.cluster.authority import SealError, load_kek, seal, unseal
from supervisor.cluster.etcd import Event, KeyValue, prefix_end
from supervisor.cluster.layout import Kind, Layout
from supervisor.cluster.mirror import Mirror
from supervisor.cluster.records import BadRecord, decode, read_check, read_instance
from supervisor.cluster.state import ClusterState, MemberHealth
from supervisor.cluster.storage import latest_modify_index

LAYOUT = Layout("/ps/", "dc1")


def kv(key: str, value: bytes = b"{}", revision: int = 1, lease: int = 0) -> KeyValue:
    return KeyValue(key, value, revision, revision, lease)


def test_the_member_logs_each_transition_once() -> None:
    health = MemberHealth(since=0.0)
    assert health.state is ClusterState.JOINING and not health.known_leader()
    assert health.reached(1.0) == "joined"
    assert health.reached(2.0) is None
    assert health.failed(3.0, "no leader") == "degraded, serving the last view of the cluster: no leader"
    assert health.failed(4.0, "timed out") is None and health.error == "timed out"
    assert health.contact_ms(5.5) == 3500 and not health.known_leader()
    assert "reachable again" in str(health.reached(6.0))
    assert health.reached(6.5) is None  # (logged once)
    assert health.known_leader() and health.contact_ms(7.0) == 0
    assert health.left(8.0).startswith("left")
    assert health.failed(9.0, "x") is None and health.state is ClusterState.LEFT


def test_the_layout_names_and_parses_every_kind_of_key() -> None:
    assert LAYOUT.parse(LAYOUT.service("h1", "web-1")) == LAYOUT.parse("/ps/dc1/services/h1/web-1")
    parsed = LAYOUT.parse(LAYOUT.check("h1", "service:web"))
    assert parsed is not None and (parsed.kind, parsed.node, parsed.item) == (Kind.CHECK, "h1", "service:web")
    alive = LAYOUT.parse(LAYOUT.alive("h2"))
    assert alive is not None and (alive.kind, alive.node) == (Kind.ALIVE, "h2")
    for foreign in ("/ps/dc2/nodes/h1", "/ps/dc1/unknown/x", "/ps/dc1/services/h1", "/other"):
        assert LAYOUT.parse(foreign) is None
    assert prefix_end("/ps/") == b"/ps0" and prefix_end("h\u00e9") == "h\u00e9".encode()[:-1] + b"\xaa"


def test_the_mirror_reports_what_changed_and_when_hosts_went() -> None:
    from supervisor.catalog.index import Family

    mirror = Mirror(LAYOUT)
    first = [kv(LAYOUT.node("h1")), kv(LAYOUT.alive("h1"), lease=7)]
    assert mirror.reset(first, 5) == {LAYOUT.node("h1"), LAYOUT.alive("h1")}
    assert mirror.reset(first, 9) == set()  # a re-listing with nothing new moves nothing
    assert mirror.revision == 9
    gone = Event("delete", KeyValue(LAYOUT.alive("h1"), b"", 0, 12))
    assert mirror.apply([gone], 12) == {LAYOUT.alive("h1")}
    assert mirror.gone_at["h1"] == 12
    assert mirror.removed_at == {Family.CATALOG: 12}  # (its instances leave ?passing answers)
    assert mirror.apply([gone], 13) == set()  # (already gone)


def test_an_answer_that_lost_an_item_moves_only_for_deletions_in_its_families() -> None:
    from supervisor.catalog.index import Family
    from supervisor.cluster.storage import ClusterStorage

    storage = ClusterStorage(LAYOUT, "me", Index(), lambda _instance: {}, lambda _records: None)
    storage.set_base(1000)
    keys = [LAYOUT.service("h2", "db-1"), LAYOUT.intention("i1"), LAYOUT.tombstone("h3"), LAYOUT.query("q1")]
    storage.mirror_reset([kv(key, revision=number + 1) for number, key in enumerate(keys)], 4)
    answer = [{"ModifyIndex": 1002}]
    catalog, intentions = (Family.CATALOG,), (Family.INTENTIONS,)
    assert storage.content_index(catalog, answer) == 1002

    def delete(key: str, revision: int) -> None:
        storage.mirror_apply([Event("delete", KeyValue(key, b"", 0, revision))], revision)

    delete(LAYOUT.tombstone("h3"), 5)  # (no answer shows tombstones, or the CA's requests)
    assert storage.content_index(catalog, answer) == 1002
    delete(LAYOUT.intention("i1"), 6)
    assert storage.content_index(catalog, answer) == 1002
    assert storage.content_index(intentions, []) == 1006
    delete(LAYOUT.service("h2", "db-1"), 7)
    assert storage.content_index(catalog, []) == 1007
    assert storage.content_index((Family.QUERIES, Family.CATALOG), []) == 1007
    assert storage.content_index((Family.QUERIES,), []) == 1000


def test_an_answers_index_is_its_latest_change() -> None:
    answer = [{"Node": {"ModifyIndex": 5}, "Service": {"ModifyIndex": 9}, "Checks": [{"ModifyIndex": 12}]}]
    assert latest_modify_index(answer) == 12
    assert latest_modify_index({"ModifyIndex": 3, "x": [{"y": {"ModifyIndex": 4}}]}) == 4
    assert latest_modify_index([]) == 0
    index = Index()
    start = index.value
    assert index.advance(start - 100) == start + 1  # never backwards
    assert index.advance(start + 50) == start + 50


def test_records_from_other_hosts_are_read_or_refused() -> None:
    service = {"Service": {"Service": "db", "Kind": "", "Tags": ["a"], "Port": 5432, "Address": "10.0.0.2"}}
    instance = read_instance(service, "db-1")
    assert (instance.name, instance.tags, instance.port, instance.weights) == ("db", ("a",), 5432, (1, 1))
    with pytest.raises(BadRecord):
        read_instance({"Service": "db"}, "x")
    with pytest.raises(BadRecord):
        read_check({"Status": "sideways"}, "c", 1, 1)
    with pytest.raises(BadRecord):
        decode(b"[1]")


def test_the_ca_key_is_sealed_under_the_key_encryption_key(tmp_path: Path) -> None:
    kek_file = tmp_path / "kek"
    kek_file.write_text(os.urandom(32).hex() + "\n")
    kek = load_kek(str(kek_file))
    sealed = seal(kek, b"-----BEGIN PRIVATE KEY-----", "root-1")
    assert b"PRIVATE" not in sealed.encode()
    assert unseal(kek, sealed, "root-1") == b"-----BEGIN PRIVATE KEY-----"
    with pytest.raises(SealError):
        unseal(os.urandom(32), sealed, "root-1")  # another host's key
    with pytest.raises(SealError):
        unseal(kek, sealed, "root-2")  # moved to another root's key
    kek_file.write_text("short")
    with pytest.raises(SealError, match="openssl rand -hex 32"):
        load_kek(str(kek_file))


def test_the_reaper_marks_dead_hosts_then_reaps_them_after_the_timeout() -> None:
    from supervisor.cluster.reaper import plan
    from supervisor.cluster.records import encode

    kvs = {
        LAYOUT.node("me"): kv(LAYOUT.node("me")),
        LAYOUT.node("alive"): kv(LAYOUT.node("alive")),
        LAYOUT.alive("alive"): kv(LAYOUT.alive("alive"), lease=3),
        LAYOUT.node("dead"): kv(LAYOUT.node("dead")),
    }
    assert plan(kvs, LAYOUT, "me", 60, now=1000) == (["dead"], [])
    tombstone = kv(LAYOUT.tombstone("dead"), encode({"failed_at": 1000.0}), revision=8)
    kvs[tombstone.key] = tombstone
    assert plan(kvs, LAYOUT, "me", 60, now=1059) == ([], [])
    assert plan(kvs, LAYOUT, "me", 60, now=1060) == ([], [("dead", tombstone)])


def test_the_cluster_storage_serves_every_host_and_skips_what_no_agent_wrote(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from supervisor.catalog.status import CheckStatus
    from supervisor.cluster.records import encode
    from supervisor.cluster.storage import ClusterStorage

    storage = ClusterStorage(LAYOUT, "me", Index(), lambda _instance: {}, lambda _records: None)
    storage.set_base(1000)
    service: dict[str, object] = {
        "Service": {"Service": "db", "Port": 5432},
        "ConnectTarget": None,
        "ConnectTags": [],
    }
    check = {"CheckID": "c1", "Name": "db", "Status": "passing", "ServiceID": "db-1", "ServiceName": "db"}
    kvs = [
        kv(LAYOUT.node("h2"), encode({"ID": "n2", "Address": "10.0.0.2"}), revision=3),
        kv(LAYOUT.alive("h2"), b"{}", revision=4, lease=9),
        kv(LAYOUT.service("h2", "db-1"), encode(service), revision=5),
        kv(LAYOUT.check("h2", "c1"), encode(check), revision=6),
        kv(LAYOUT.service("h2", "junk"), b"not json", revision=7),
        kv(LAYOUT.node("h3"), encode({"ID": "n3", "Address": "10.0.0.3"}), revision=8),
    ]
    assert storage.mirror_reset(kvs, 8)
    entries = list(storage.entries())
    assert [(e.node.name, e.instance.service_id, e.index) for e in entries] == [("h2", "db-1", 1005)]
    assert [c.check_id for c in entries[0].checks] == ["serfHealth", "c1"]
    assert entries[0].status is CheckStatus.PASSING
    assert [c.status for c in storage.node_checks("h3")] == [CheckStatus.CRITICAL]  # no alive/ key
    assert sum("no agent wrote" in r.message for r in caplog.records) == 1
    list(storage.entries())
    assert sum("no agent wrote" in r.message for r in caplog.records) == 1  # logged once per key
    assert storage.index.value >= 1008


def test_hostile_values_in_etcd_neither_break_answers_nor_raise() -> None:
    from supervisor.api.catalog_shapes import catalog_entry_json, health_entry_json
    from supervisor.cluster.records import encode
    from supervisor.cluster.storage import ClusterStorage

    storage = ClusterStorage(LAYOUT, "me", Index(), lambda _instance: {}, lambda _records: None)
    bare = {"Service": {"Service": "ghost"}}  # every other AgentService field left out
    nested = b"[" * 100_000 + b"]" * 100_000
    kvs = [
        kv(LAYOUT.node("h2"), encode({"ID": "n2"}), revision=2),
        kv(LAYOUT.service("h2", "ghost"), encode(bare), revision=3),
        kv(LAYOUT.service("h2", "deep"), nested, revision=4),
        kv(
            LAYOUT.service("h2", "huge-port"),
            encode({"Service": {"Service": "x", "Port": 10**400}}),
            revision=5,
        ),
        kv(LAYOUT.check("h2", "deep"), nested, revision=6),
        kv(LAYOUT.intention("deep"), nested, revision=7),
    ]
    storage.mirror_reset(kvs, 7)
    entries = list(storage.entries())
    assert [entry.instance.service_id for entry in entries] == ["ghost"]
    shown = catalog_entry_json(entries[0])
    assert (shown["ServiceTags"], shown["ServicePort"], shown["ServiceAddress"]) == ([], 0, "")
    assert health_entry_json(entries[0])["Service"]["Weights"] == {"Passing": 1, "Warning": 1}
    from supervisor.cluster.documents import read_intentions

    assert read_intentions(storage.mirror.kvs, LAYOUT, 0) == {}


def test_an_intention_is_read_only_when_its_keys_agree_with_it() -> None:
    from supervisor.cluster.documents import read_intentions
    from supervisor.cluster.records import encode

    def record(intention_id: str, action: str) -> bytes:
        return encode({"ID": intention_id, "SourceName": "web", "DestinationName": "db", "Action": action})

    kvs = {
        LAYOUT.intention("real"): kv(LAYOUT.intention("real"), record("real", "allow"), revision=2),
        LAYOUT.intention_pair("web", "db"): kv(LAYOUT.intention_pair("web", "db"), b"real", revision=2),
        # written past the transactions: another ID in its body, or no pair pointing at it
        LAYOUT.intention("shadow"): kv(LAYOUT.intention("shadow"), record("real", "deny"), revision=3),
        LAYOUT.intention("orphan"): kv(LAYOUT.intention("orphan"), record("orphan", "deny"), revision=4),
    }
    found = read_intentions(kvs, LAYOUT, 100)
    assert list(found) == ["real"] and found["real"].action == "allow"
    assert found["real"].modify_index == 102


def test_forged_ca_roots_are_refused_and_the_last_good_ones_kept(caplog: pytest.LogCaptureFixture) -> None:
    from supervisor.cluster.authority import ClusterAuthority, read_roots, roots_document
    from supervisor.cluster.records import encode
    from supervisor.config.model import CAConfig
    from supervisor.connect.ca import CertificateAuthority

    local = CertificateAuthority(None, "dc1", lambda: 1)
    local.start(CAConfig())
    good = kv(LAYOUT.ca_roots(), encode(roots_document(local)), revision=5)
    assert read_roots(good, 0) is not None
    authority = ClusterAuthority(local)
    assert authority.refresh({good.key: good}, LAYOUT, 0)
    forged = dict(roots_document(local), ClusterID={"x": "y"})
    bad = kv(LAYOUT.ca_roots(), encode(forged), revision=6)
    assert read_roots(bad, 0) is None
    assert not authority.refresh({bad.key: bad}, LAYOUT, 0)
    assert authority.trust_domain == local.trust_domain  # the last good roots stay
    said = sum("CA roots in etcd are unreadable" in r.message for r in caplog.records)
    for _ in range(3):  # (the mirror moves for other keys: said once, not on every move)
        assert not authority.refresh({bad.key: bad}, LAYOUT, 0)
    assert sum("CA roots in etcd are unreadable" in r.message for r in caplog.records) == said


def test_a_prepared_query_is_read_only_when_its_name_key_points_at_it() -> None:
    from supervisor.cluster.documents import read_queries
    from supervisor.cluster.records import encode

    definition = encode({"Definition": {"name": "primary", "service": {"service": "db"}}})
    kvs = {
        LAYOUT.query("q1"): kv(LAYOUT.query("q1"), definition, revision=2),
        LAYOUT.query_name("primary"): kv(LAYOUT.query_name("primary"), b"q1", revision=2),
        LAYOUT.query("forged"): kv(LAYOUT.query("forged"), definition, revision=3),  # no name key of its own
    }
    assert list(read_queries(kvs, LAYOUT, 0)) == ["q1"]
    failover = b'{"service": "db", "failover": {"nearest_n": Infinity}}'
    infinite = b'{"Definition": {"name": "primary", "service": ' + failover + b"}}"
    kvs[LAYOUT.query("q1")] = kv(LAYOUT.query("q1"), infinite, revision=4)
    assert read_queries(kvs, LAYOUT, 0) == {}  # skipped, not raised
    # Checked as the API checks them: no regexp that backtracks for ever, no tags of the wrong type.
    template = {"type": "name_prefix_match", "regexp": "^primary-(a+)+$"}
    for hostile in (
        {"name": "primary", "service": {"service": "db"}, "template": template},
        {"name": "primary", "service": {"service": "db", "tags": [1, 2]}},
        {"name": "primary", "service": {"service": "db", "node_meta": ["ab"]}},
    ):
        kvs[LAYOUT.query("q1")] = kv(LAYOUT.query("q1"), encode({"Definition": hostile}), revision=5)
        assert read_queries(kvs, LAYOUT, 0) == {}, hostile


def test_the_cluster_storage_lists_this_host_before_the_watch_brings_its_records() -> None:
    from supervisor.catalog.catalog import SERF_CHECK
    from supervisor.catalog.model import Node
    from supervisor.catalog.status import CheckStatus
    from supervisor.cluster.records import encode
    from supervisor.cluster.storage import ClusterStorage

    published: list[dict[str, bytes]] = []
    storage = ClusterStorage(LAYOUT, "me", Index(), lambda _instance: {}, published.append)
    storage.set_base(1000)
    assert storage.mirror_reset([kv(LAYOUT.node("h2"), encode({"ID": "n2", "Address": "10.0.0.2"}), 3)], 3)
    assert [node.name for node in storage.nodes()] == ["h2"]

    serf = storage.node_checks("h2")[0]
    own_serf = serf.__class__(SERF_CHECK, serf.name, CheckStatus.PASSING, "", "", "", "", (), 1, 1)
    storage.put_local(Node("n1", "me", "10.0.0.1", "dc1", {}), {}, (own_serf,))
    assert published and LAYOUT.node("me") in published[-1]
    assert [node.name for node in storage.nodes()] == ["h2", "me"]  # before the watch has it
    assert [check.status for check in storage.node_checks("me")] == [CheckStatus.PASSING]

    # A record there that no agent wrote: this host is still shown from its own state, and kept current.
    assert storage.mirror_apply([Event("put", kv(LAYOUT.node("me"), b"not json", revision=4))], 4)
    assert [node.address for node in storage.nodes() if node.name == "me"] == ["10.0.0.1"]
    storage.put_local(Node("n1", "me", "10.0.0.9", "dc1", {}), {}, (own_serf,))
    assert [node.address for node in storage.nodes() if node.name == "me"] == ["10.0.0.9"]

    record = kv(LAYOUT.node("me"), published[-1][LAYOUT.node("me")], revision=5)
    assert storage.mirror_apply([Event("put", record)], 5)
    assert [(node.name, node.index) for node in storage.nodes()] == [("h2", 1003), ("me", 1005)]


def test_output_only_check_changes_wait_for_the_check_update_interval() -> None:
    from supervisor.cluster.deferral import OutputDeferral

    def check(status: str, output: str) -> bytes:
        return json.dumps({"CheckID": "c1", "Status": status, "Output": output}).encode()

    key, node = LAYOUT.check("me", "c1"), LAYOUT.node("me")
    deferral = OutputDeferral(300.0, lambda k: k.startswith(LAYOUT.checks("me")))

    def sync(
        desired: dict[str, bytes], written: dict[str, bytes], now: float
    ) -> tuple[dict[str, bytes], float | None]:
        chosen, due = deferral.select(desired, written, now)
        deferral.written()  # (the sync thread's write went through)
        return chosen, due

    first = {node: b"{}", key: check("passing", "ok at 1")}
    chosen, due = sync(first, {}, now=0.0)
    assert chosen == first and due is None  # a new check: at once

    later = {node: b'{"Meta": 1}', key: check("passing", "ok at 2")}
    chosen, due = sync(later, first, now=10.0)
    assert chosen == {node: b'{"Meta": 1}', key: first[key]} and due == 300.0  # output held back
    chosen, due = sync(later, chosen, now=299.0)
    assert chosen[key] == first[key] and due == 300.0
    chosen, due = sync(later, chosen, now=300.0)
    assert chosen[key] == later[key] and due is None  # the latest output, once due

    failing = {node: b"{}", key: check("critical", "refused")}
    chosen, due = sync(failing, chosen, now=301.0)
    assert chosen[key] == failing[key] and due is None  # a status change: at once
    again = {node: b"{}", key: check("critical", "refused again")}
    chosen, due = sync(again, failing, now=302.0)
    assert chosen[key] == failing[key] and due == 601.0  # written at 301: this output waits

    retried = OutputDeferral(300.0, lambda k: k.startswith(LAYOUT.checks("me")))
    retried.select(first, {}, now=0.0)  # ... and that write failed (no ``written()``)
    assert retried.select(later, first, now=1.0)[0] == later  # so nothing is held back for it
    hostile = b"[" * 100_000 + b"]" * 100_000  # (what no agent writes: written over at once)
    assert retried.select({key: check("passing", "x")}, {key: hostile}, now=2.0)[0][key] != hostile

    at_once = OutputDeferral(0.0, lambda k: k.startswith(LAYOUT.checks("me")))
    at_once.select(first, {}, now=0.0)
    at_once.written()
    assert at_once.select(later, first, now=1.0) == (later, None)  # "0s": every change


def test_a_secret_file_others_may_read_is_used_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from supervisor.cluster.secretfile import read_secret_file

    secret = tmp_path / "password"
    secret.write_bytes(b"hunter2\n")
    secret.chmod(0o600)
    assert read_secret_file(str(secret)) == b"hunter2\n"
    assert not caplog.records
    secret.chmod(0o644)
    assert read_secret_file(str(secret), limit=4) == b"hunt"
    assert [r.message for r in caplog.records] == [
        f"{secret} can be read by others than its owner: chmod 600 it"
    ]
    assert "hunter2" not in caplog.text


def test_writes_are_split_into_transactions_etcd_takes() -> None:
    from supervisor.cluster.etcd import MAX_TXN_OPS
    from supervisor.cluster.member import MAX_TXN_BYTES, _batches

    many = [(f"/k/{n}", b"v") for n in range(300)]
    assert [len(batch) for batch in _batches(many, ["/gone"])] == [MAX_TXN_OPS, MAX_TXN_OPS, 45]
    wide = [(f"/w/{n}", b"x" * (MAX_TXN_BYTES // 3)) for n in range(7)]
    sizes = [len(batch) for batch in _batches(wide, [])]
    assert sum(sizes) == 7 and max(sizes) <= 2  # (two records of a third fit with their keys)
    assert list(_batches([], [])) == []


def test_a_record_nested_too_deep_or_with_infinity_is_refused_as_no_agents() -> None:
    from supervisor.cluster.records import RECORD_DEPTH, decode, encode

    deep = b'{"Service": {"Service": "db", "X": ' + b"[" * 400 + b"1" + b"]" * 400 + b"}}"
    with pytest.raises(BadRecord, match="levels deep"):
        decode(deep)  # (it parses; copying or walking it recursively would not)
    with pytest.raises(BadRecord, match="not JSON an agent writes"):
        decode(b'{"Service": {"Service": "db", "Port": Infinity}}')
    fits: dict[str, object] = {}
    for _ in range(RECORD_DEPTH - 1):
        fits = {"x": fits}
    assert decode(encode(fits))  # as deep as an API body inside its record: read
