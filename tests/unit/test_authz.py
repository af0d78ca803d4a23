"""builtin_proxy.authz.Authorizer: the per-identity decision cache in front of the agent's
``POST /v1/agent/connect/authorize``, in-process.

The agent is replaced by ``FakeAgent``, which only records the requests the Authorizer
submits and lets each test answer them (or fail them) when it chooses, as the request
threads would through the event loop. Time is a ``FakeClock`` so the TTL can expire.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

import builtin_proxy.authz as authz
from builtin_proxy.agent import AgentError
from builtin_proxy.authz import Authorizer
from tests.helpers.fakes import FakeClock

WEB = "spiffe://11111111-2222-3333-4444-555555555555.consul/ns/default/dc/dc1/svc/web"
API = "spiffe://11111111-2222-3333-4444-555555555555.consul/ns/default/dc/dc1/svc/api"

Done = Callable[[Any, Exception | None], None]


@dataclass
class Submitted:
    method: str
    path: str
    body: Any
    done: Done


@dataclass
class FakeAgent:
    """Stands in for ``Requests.submit``: requests wait here until the test answers them."""

    requests: list[Submitted] = field(default_factory=list)

    def submit(self, method: str, path: str, body: Any, done: Done) -> None:
        self.requests.append(Submitted(method, path, body, done))

    def answer(self, index: int, data: Any = None, error: Exception | None = None) -> None:
        self.requests[index].done(data, error)


@dataclass
class Decisions:
    got: list[tuple[bool, str]] = field(default_factory=list)

    def __call__(self, allowed: bool, reason: str) -> None:
        self.got.append((allowed, reason))


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    fake = FakeClock()
    monkeypatch.setattr(authz, "time", fake)
    return fake


@pytest.fixture
def agent() -> FakeAgent:
    return FakeAgent()


@pytest.fixture
def authorizer(agent: FakeAgent, clock: FakeClock) -> Authorizer:
    return Authorizer("db", agent.submit)


ALLOW = {"Authorized": True, "Reason": "Matched intention: ALLOW web => db"}
DENY = {"Authorized": False, "Reason": "Matched intention: DENY web => db"}


def test_the_first_connection_asks_the_agent_with_target_uri_and_serial(
    authorizer: Authorizer, agent: FakeAgent
) -> None:
    decide = Decisions()
    authorizer.authorize(WEB, "2a:0f", decide)
    assert decide.got == []  # nothing is decided before the agent answers
    (request,) = agent.requests
    assert (request.method, request.path) == ("POST", "/v1/agent/connect/authorize")
    assert request.body == {"Target": "db", "ClientCertURI": WEB, "ClientCertSerial": "2a:0f"}
    agent.answer(0, ALLOW)
    assert decide.got == [(True, ALLOW["Reason"])]


def test_a_decision_is_reused_for_the_same_identity_without_asking_again(
    authorizer: Authorizer, agent: FakeAgent
) -> None:
    authorizer.authorize(WEB, "1", Decisions())
    agent.answer(0, DENY)
    again = Decisions()
    authorizer.authorize(WEB, "2", again)
    assert again.got == [(False, DENY["Reason"])]  # a deny is cached as much as an allow
    assert len(agent.requests) == 1


def test_decisions_are_cached_per_identity(authorizer: Authorizer, agent: FakeAgent) -> None:
    authorizer.authorize(WEB, "1", Decisions())
    agent.answer(0, ALLOW)
    other = Decisions()
    authorizer.authorize(API, "3", other)
    assert len(agent.requests) == 2
    assert agent.requests[1].body["ClientCertURI"] == API
    agent.answer(1, DENY)
    assert other.got == [(False, DENY["Reason"])]


def test_concurrent_first_connections_share_one_request(authorizer: Authorizer, agent: FakeAgent) -> None:
    waiting = [Decisions() for _ in range(3)]
    for decide in waiting:
        authorizer.authorize(WEB, "1", decide)
    assert len(agent.requests) == 1
    agent.answer(0, ALLOW)
    assert [decide.got for decide in waiting] == [[(True, ALLOW["Reason"])]] * 3


def test_a_cached_decision_expires_after_the_ttl(
    authorizer: Authorizer, agent: FakeAgent, clock: FakeClock
) -> None:
    authorizer.authorize(WEB, "1", Decisions())
    agent.answer(0, ALLOW)
    clock.advance(authz.TTL - 1)
    authorizer.authorize(WEB, "1", Decisions())
    assert len(agent.requests) == 1  # still fresh
    clock.advance(2)
    late = Decisions()
    authorizer.authorize(WEB, "1", late)
    assert len(agent.requests) == 2  # expired: the agent is asked again
    agent.answer(1, DENY)
    assert late.got == [(False, DENY["Reason"])]


@pytest.mark.parametrize(
    "failure",
    [AgentError(500, "rpc error"), ConnectionRefusedError(111, "Connection refused"), TimeoutError()],
)
def test_an_agent_that_cannot_answer_means_denied(
    authorizer: Authorizer, agent: FakeAgent, failure: Exception
) -> None:
    waiting = [Decisions(), Decisions()]
    for decide in waiting:
        authorizer.authorize(WEB, "1", decide)
    agent.answer(0, error=failure)
    for decide in waiting:
        ((allowed, reason),) = decide.got
        assert allowed is False
        assert reason.startswith("authorization failed")


@pytest.mark.parametrize(
    ("answer", "reason"),
    [
        (None, "authorization failed: bad answer"),
        ([], "authorization failed: bad answer"),
        ("true", "authorization failed: bad answer"),
        ({"Reason": "ACL not found"}, "ACL not found"),  # no "Authorized": not authorized
    ],
)
def test_an_answer_that_does_not_say_authorized_means_denied(
    authorizer: Authorizer, agent: FakeAgent, answer: Any, reason: str
) -> None:
    decide = Decisions()
    authorizer.authorize(WEB, "1", decide)
    agent.answer(0, answer)
    assert decide.got == [(False, reason)]


def test_a_failure_is_not_cached_so_the_next_connection_asks_again(
    authorizer: Authorizer, agent: FakeAgent
) -> None:
    authorizer.authorize(WEB, "1", Decisions())
    agent.answer(0, error=ConnectionResetError())
    after = Decisions()
    authorizer.authorize(WEB, "1", after)
    assert len(agent.requests) == 2  # the outage must not pin a deny for a whole TTL
    agent.answer(1, ALLOW)
    assert after.got == [(True, ALLOW["Reason"])]


def test_an_intention_change_empties_the_cache(authorizer: Authorizer, agent: FakeAgent) -> None:
    authorizer.authorize(WEB, "1", Decisions())
    agent.answer(0, ALLOW)
    authorizer.invalidate()
    after = Decisions()
    authorizer.authorize(WEB, "1", after)
    assert len(agent.requests) == 2
    agent.answer(1, DENY)
    assert after.got == [(False, DENY["Reason"])]


def test_an_answer_to_a_request_from_before_an_intention_change_is_used_once_but_not_kept(
    authorizer: Authorizer, agent: FakeAgent
) -> None:
    waiting = Decisions()
    authorizer.authorize(WEB, "1", waiting)
    authorizer.invalidate()  # intentions changed while the request was on its way
    agent.answer(0, ALLOW)
    assert waiting.got == [(True, ALLOW["Reason"])]  # the waiting connection is not left hanging
    authorizer.authorize(WEB, "1", Decisions())
    assert len(agent.requests) == 2  # but the possibly stale answer was not cached
