"""Connect endpoints on a real agent: roots, leaves (blocking, renewal, rotation),
authorize, intentions over HTTP and the CLI, tokens and ACLs."""

from __future__ import annotations

import datetime
import json
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers.agent import AgentProcess, fake_proxy
from tests.test_ca import openssl_verify, operator_root

ALLOW_ROOT = {"connect": {"proxy": {"allow_managed_root": True}}}


def services(tmp_path: Path) -> dict[str, Any]:
    return {
        "services": [
            {
                "name": "web",
                "port": 8080,
                "connect": {"proxy": {"command": fake_proxy("run", tmp_path / "w")}},
            },
            {
                "name": "db",
                "port": 5432,
                "connect": {"proxy": {"command": fake_proxy("run", tmp_path / "d")}},
            },
        ]
    }


def token_of(agent: AgentProcess, proxy_id: str) -> str:
    assert agent.data_dir is not None
    allocations = json.loads((agent.data_dir / "proxy" / "allocations.json").read_text())
    return str(allocations["Proxies"][proxy_id]["Token"])


def start_agent(
    tmp_path: Path, extra: dict[str, Any] | None = None, token: str | None = None
) -> AgentProcess:
    agent = AgentProcess(tmp_path, extra={**ALLOW_ROOT, **(extra or {})})
    agent.write("services.json", services(tmp_path))
    agent.start()
    return agent


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[AgentProcess]:
    process = start_agent(tmp_path)
    process.wait_state("web-proxy", "running")
    yield process
    process.kill_everything()


def trust_domain(agent: AgentProcess) -> str:
    return str(agent.get("/v1/agent/connect/ca/roots")["TrustDomain"])


def authorize(agent: AgentProcess, body: Any, token: str | None = None) -> tuple[int, Any]:
    status, _, data = agent.http("POST", "/v1/agent/connect/authorize", body, token=token)
    return status, data


def spiffe(agent: AgentProcess, service: str) -> str:
    return f"spiffe://{trust_domain(agent)}/ns/default/dc/dc1/svc/{service}"


def test_roots_shape_and_index_blocking(agent: AgentProcess) -> None:
    status, headers, roots = agent.http("GET", "/v1/agent/connect/ca/roots")
    assert status == 200 and int(headers["X-Consul-Index"]) > 0
    assert roots["TrustDomain"].endswith(".consul")
    (root,) = roots["Roots"]
    assert root["Active"] and root["ID"] == roots["ActiveRootID"] and "BEGIN CERTIFICATE" in root["RootCert"]
    assert agent.get("/v1/connect/ca/roots") == roots
    started = time.monotonic()
    agent.http("GET", f"/v1/agent/connect/ca/roots?index={headers['X-Consul-Index']}&wait=300ms")
    assert time.monotonic() - started >= 0.3


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is not installed")
def test_leaf_for_a_proxy_token_verifies_with_openssl(agent: AgentProcess, tmp_path: Path) -> None:
    token = token_of(agent, "web-proxy")
    status, headers, leaf = agent.http("GET", "/v1/agent/connect/ca/leaf/web", token=token)
    assert status == 200 and headers["X-Consul-Index"] == str(leaf["ModifyIndex"])
    assert leaf["Service"] == "web" and leaf["ServiceURI"] == spiffe(agent, "web")
    roots = [root["RootCert"] for root in agent.get("/v1/agent/connect/ca/roots")["Roots"]]
    result = openssl_verify(tmp_path, roots, leaf["CertPEM"])
    assert result.returncode == 0, result.stdout + result.stderr
    # the same leaf is served again until it is renewed
    assert (
        agent.http("GET", "/v1/agent/connect/ca/leaf/web", token=token)[2]["SerialNumber"]
        == leaf["SerialNumber"]
    )
    # a proxy token only gets its own service's leaf
    assert agent.http("GET", "/v1/agent/connect/ca/leaf/db", token=token)[0] == 403
    assert agent.http("GET", "/v1/agent/connect/ca/leaf/..%2Fx")[0] in (400, 404)


def test_renewed_leaf_is_delivered_to_a_blocked_caller(tmp_path: Path) -> None:
    agent = start_agent(
        tmp_path, {"connect": {**ALLOW_ROOT["connect"], "ca_config": {"leaf_cert_ttl": "10s"}}}
    )
    try:
        _, headers, first = agent.http("GET", "/v1/agent/connect/ca/leaf/web")
        status, _, renewed = agent.http(
            "GET", f"/v1/agent/connect/ca/leaf/web?index={headers['X-Consul-Index']}&wait=30s", timeout=60
        )
        renewed_at = time.time()
        assert status == 200 and renewed["SerialNumber"] != first["SerialNumber"]
        # Renewal happens between 60 % and 90 % of the first leaf's validity, measured on the
        # leaf itself (it may have been issued before this test asked: the proxy asked first).
        valid_after = datetime.datetime.fromisoformat(first["ValidAfter"].replace("Z", "+00:00")).timestamp()
        valid_before = datetime.datetime.fromisoformat(
            first["ValidBefore"].replace("Z", "+00:00")
        ).timestamp()
        share = (renewed_at - valid_after) / (valid_before - valid_after)
        assert 0.55 <= share <= 0.95, share
    finally:
        agent.kill_everything()


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is not installed")
def test_changing_ca_config_rotates_the_root_for_blocked_callers(agent: AgentProcess, tmp_path: Path) -> None:
    _, _, old_roots = agent.http("GET", "/v1/agent/connect/ca/roots")
    _, headers, old_leaf = agent.http("GET", "/v1/agent/connect/ca/leaf/web")
    result: dict[str, Any] = {}

    def blocked() -> None:
        result["leaf"] = agent.http(
            "GET", f"/v1/agent/connect/ca/leaf/web?index={headers['X-Consul-Index']}&wait=60s", timeout=90
        )

    waiter = threading.Thread(target=blocked)
    waiter.start()
    key, cert = operator_root()
    agent.write(
        "00-agent.json",
        {
            **agent.base,
            "connect": {**ALLOW_ROOT["connect"], "ca_config": {"private_key": key, "root_cert": cert}},
        },
    )
    waiter.join(60)
    status, _, new_leaf = result["leaf"]
    assert status == 200 and new_leaf["SerialNumber"] != old_leaf["SerialNumber"]
    roots = agent.get("/v1/agent/connect/ca/roots")
    assert len(roots["Roots"]) == 2 and roots["ActiveRootID"] != old_roots["ActiveRootID"]
    assert roots["TrustDomain"] == old_roots["TrustDomain"]
    new_root = next(r["RootCert"] for r in roots["Roots"] if r["Active"])
    assert new_root.strip() == cert.strip()
    assert openssl_verify(tmp_path, [new_root], new_leaf["CertPEM"]).returncode == 0
    old_root = old_roots["Roots"][0]["RootCert"]
    assert openssl_verify(tmp_path, [old_root], old_leaf["CertPEM"]).returncode == 0
    assert "CA root rotated" in agent.current_log()


def test_authorize_with_intentions(agent: AgentProcess) -> None:
    web = spiffe(agent, "web")
    assert authorize(agent, {"Target": "db", "ClientCertURI": web}) == (
        200,
        {"Authorized": True, "Reason": "ACLs disabled, access is allowed by default"},
    )
    status, _, created = agent.http(
        "POST", "/v1/connect/intentions", {"SourceName": "web", "DestinationName": "db", "Action": "deny"}
    )
    assert status == 200 and set(created) == {"ID"}
    assert authorize(agent, {"Target": "db", "ClientCertURI": web}) == (
        200,
        {"Authorized": False, "Reason": "Matched intention: web => db (deny)"},
    )
    # a more precise intention wins over a wildcard one
    agent.http(
        "POST", "/v1/connect/intentions", {"SourceName": "*", "DestinationName": "db", "Action": "allow"}
    )
    assert authorize(agent, {"Target": "db", "ClientCertURI": web})[1]["Authorized"] is False
    assert authorize(agent, {"Target": "db", "ClientCertURI": spiffe(agent, "api")})[1] == {
        "Authorized": True,
        "Reason": "Matched intention: * => db (allow)",
    }
    # the proxy of db authorizes for db with its own token (as the built-in proxy does)
    db_token = token_of(agent, "db-proxy")
    assert authorize(agent, {"Target": "db", "ClientCertURI": web}, token=db_token)[0] == 200
    assert authorize(agent, {"Target": "web", "ClientCertURI": web}, token=db_token)[0] == 403


@pytest.mark.parametrize(
    ("body", "status", "text"),
    [
        (
            {"ClientCertURI": "spiffe://x.consul/ns/default/dc/dc1/svc/web"},
            400,
            "Target service must be specified",
        ),
        (
            {"Target": "db", "ClientCertURI": "http://web"},
            400,
            "ClientCertURI not a valid Connect identifier",
        ),
        (
            {"Target": "db", "ClientCertURI": "spiffe://x.consul"},
            400,
            "ClientCertURI not a valid Connect identifier",
        ),
        ({"Target": "db", "ClientCertURI": 5}, 400, "expected a string"),
        ("not json", 400, "Request decode failed"),
    ],
)
def test_authorize_bad_requests(agent: AgentProcess, body: Any, status: int, text: str) -> None:
    if isinstance(body, str):
        import urllib.request

        request = urllib.request.Request(
            f"http://{agent.address}/v1/agent/connect/authorize", data=body.encode(), method="POST"
        )
        try:
            urllib.request.urlopen(request, timeout=10)
            code, data = 200, ""
        except urllib.error.HTTPError as exc:
            code, data = exc.code, exc.read().decode()
    else:
        code, data = authorize(agent, body)
    assert code == status and text in str(data)


def test_external_trust_domain_is_denied(agent: AgentProcess) -> None:
    other = "spiffe://11111111-2222-3333-4444-555555555555.consul/ns/default/dc/dc1/svc/web"
    assert authorize(agent, {"Target": "db", "ClientCertURI": other}) == (
        200,
        {
            "Authorized": False,
            "Reason": "Identity from an external trust domain: 11111111-2222-3333-4444-555555555555.consul",
        },
    )


def test_intention_endpoints(agent: AgentProcess) -> None:
    _, _, created = agent.http(
        "POST",
        "/v1/connect/intentions",
        {"SourceName": "web", "DestinationName": "db", "Action": "allow", "Description": "d"},
    )
    ixn_id = created["ID"]
    one = agent.get(f"/v1/connect/intentions/{ixn_id}")
    assert (one["SourceName"], one["DestinationName"], one["Action"], one["Precedence"]) == (
        "web",
        "db",
        "allow",
        9,
    )
    assert one["SourceType"] == "consul" and one["Description"] == "d" and one["Hash"]
    # PUT is accepted as well as POST, and a duplicate pair is refused
    status, _, _ = agent.http(
        "PUT", "/v1/connect/intentions", {"SourceName": "web", "DestinationName": "db", "Action": "deny"}
    )
    assert status == 409
    assert agent.http("PUT", f"/v1/connect/intentions/{ixn_id}", {**one, "Action": "deny"})[0] == 200
    assert agent.get(f"/v1/connect/intentions/{ixn_id}")["Action"] == "deny"
    assert agent.get("/v1/connect/intentions/exact?source=web&destination=db")["ID"] == ixn_id
    assert agent.get("/v1/connect/intentions/check?source=web&destination=db") == {"Allowed": False}
    assert agent.get("/v1/connect/intentions/check?source=api&destination=db") == {"Allowed": True}
    match = agent.get("/v1/connect/intentions/match?by=destination&name=db")
    assert [m["ID"] for m in match["db"]] == [ixn_id]
    listed, headers = (
        agent.http("GET", "/v1/connect/intentions")[2],
        agent.http("GET", "/v1/connect/intentions")[1],
    )
    assert [m["ID"] for m in listed] == [ixn_id] and "X-Consul-Index" in headers
    assert agent.http("DELETE", f"/v1/connect/intentions/{ixn_id}")[0] == 200
    assert agent.http("GET", f"/v1/connect/intentions/{ixn_id}")[0] == 404
    assert agent.http("GET", "/v1/connect/intentions/match?by=sideways&name=db")[0] == 400
    assert agent.http("GET", "/v1/connect/intentions/check?source=web")[0] == 400


def test_intentions_persist_across_restarts(agent: AgentProcess) -> None:
    agent.http(
        "POST", "/v1/connect/intentions", {"SourceName": "web", "DestinationName": "db", "Action": "deny"}
    )
    agent.kill9()
    agent.start()
    assert agent.get("/v1/connect/intentions/check?source=web&destination=db") == {"Allowed": False}


def test_intention_cli(agent: AgentProcess) -> None:
    created = agent.cli("intention", "create", "-deny", "web", "db")
    assert created.returncode == 0 and created.stdout == "Created: web => db (deny)\n"
    assert agent.cli("intention", "create", "api", "*").stdout == "Created: api => * (allow)\n"
    duplicate = agent.cli("intention", "create", "web", "db")
    assert duplicate.returncode == 1 and "duplicate intention" in duplicate.stderr
    check = agent.cli("intention", "check", "web", "db")
    assert (check.returncode, check.stdout) == (2, "Denied\n")
    assert agent.cli("intention", "check", "api", "db").returncode == 0
    listing = agent.cli("intention", "list").stdout.splitlines()
    assert listing[0].split() == ["ID", "SOURCE", "ACTION", "DESTINATION", "PRECEDENCE"]
    assert any(line.split()[1:4] == ["web", "deny", "db"] for line in listing[1:])
    assert agent.cli("intention", "match", "db").stdout == "web => db (deny)\napi => * (allow)\n"
    assert agent.cli("intention", "create", "-replace", "web", "db").stdout == "Updated: web => db (allow)\n"
    deleted = agent.cli("intention", "delete", "web", "db")
    assert deleted.returncode == 0 and "Intention deleted: web => db (allow)" in deleted.stdout
    bad = agent.cli("intention", "create", "../x", "db")
    assert bad.returncode == 1 and "cannot be used" in bad.stderr


def test_proxy_token_scope(agent: AgentProcess) -> None:
    token = token_of(agent, "web-proxy")
    assert agent.http("GET", "/v1/agent/connect/proxy/web-proxy", token=token)[0] == 200
    assert agent.http("GET", "/v1/agent/connect/ca/roots", token=token)[0] == 200
    assert agent.http("GET", "/v1/health/connect/db?passing=1", token=token)[0] == 200
    assert agent.http("GET", "/v1/catalog/services", token=token)[0] == 200
    for method, path in [
        ("GET", "/v1/agent/connect/proxy/db-proxy"),
        ("GET", "/v1/agent/connect/ca/leaf/db"),
        ("GET", "/v1/connect/intentions"),
        ("POST", "/v1/connect/intentions"),
        ("GET", "/v1/agent/self"),
        ("GET", "/v1/agent/checks"),
        ("PUT", "/v1/agent/service/register"),
        ("PUT", "/v1/agent/service/deregister/web"),
        ("PUT", "/v1/agent/reload"),
        ("GET", "/v1/query"),
    ]:
        assert agent.http(method, path, {}, token=token)[0] == 403, path


def test_acl_default_deny_needs_the_master_token(tmp_path: Path) -> None:
    acl = {"acl": {"enabled": True, "default_policy": "deny", "tokens": {"master": "s3cret-master"}}}
    agent = start_agent(tmp_path, acl)
    try:
        assert agent.http("GET", "/v1/agent/self")[0] == 403
        assert agent.http("GET", "/v1/health/service/web")[0] == 403
        assert agent.http("GET", "/v1/connect/intentions")[0] == 403
        assert agent.http("GET", "/v1/agent/self", token="wrong")[0] == 403
        assert agent.http("GET", "/v1/agent/self", token="s3cret-master")[0] == 200
        web = spiffe_with_token(agent, "web", "s3cret-master")
        status, data = authorize(agent, {"Target": "db", "ClientCertURI": web}, token="s3cret-master")
        assert (status, data) == (200, {"Authorized": False, "Reason": "Default behavior configured by ACLs"})
        # proxies still work with their own tokens
        token = token_of(agent, "web-proxy")
        assert agent.http("GET", "/v1/agent/connect/proxy/web-proxy", token=token)[0] == 200
        assert agent.http("GET", "/v1/agent/connect/ca/leaf/web", token=token)[0] == 200
        assert "s3cret-master" not in agent.log() and token not in agent.log()
    finally:
        agent.kill_everything()


def spiffe_with_token(agent: AgentProcess, service: str, token: str) -> str:
    _, _, roots = agent.http("GET", "/v1/agent/connect/ca/roots", token=token)
    return f"spiffe://{roots['TrustDomain']}/ns/default/dc/dc1/svc/{service}"
