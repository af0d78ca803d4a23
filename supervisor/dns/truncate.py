"""Fitting answers into a response, as Consul 1.5's ``trimDNSResponse``.

Over UDP a response is at most 512 bytes, or the client's EDNS0 buffer size when it
offers more; without EDNS0 (a 512-byte client) it also carries at most ``udp_answer_limit``
answers (default 3, never more than 8). Over TCP the caps are 4096 answers (1024 SRV) and
64 KiB. Answers are dropped from the end (they are shuffled), the additional records of
SRV answers follow their answer out, and a single answer is sent even when it does not
fit. TC is set only with ``dns_config.enable_truncate`` (Consul's default is to hand back
the partial answer without it, which spares the client a retry over TCP).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import dns.message
import dns.rcode
import dns.rrset

from supervisor.config.model import DNSConfig

MAX_UDP_ANSWERS = 8
TCP_MAX_SIZE = 65523
TCP_MAX_ANSWERS = 4096
TCP_MAX_SRV_ANSWERS = 1024


@dataclass
class Records:
    answer: list[dns.rrset.RRset] = field(default_factory=list)
    authority: list[dns.rrset.RRset] = field(default_factory=list)
    additional: list[dns.rrset.RRset] = field(default_factory=list)
    rcode: dns.rcode.Rcode = dns.rcode.NOERROR
    srv: bool = False
    srv_extra: list[list[dns.rrset.RRset]] = field(default_factory=list)  # per SRV answer

    def add_srv(self, srv: dns.rrset.RRset, extra: list[dns.rrset.RRset]) -> None:
        self.answer.append(srv)
        self.srv_extra.append(extra)

    def first(self, count: int) -> tuple[list[dns.rrset.RRset], list[dns.rrset.RRset]]:
        """The first ``count`` answers and the additional records that go with them."""
        additional = list(self.additional)
        seen = {(rrset.name, rrset.rdtype) for rrset in additional}
        for extra in self.srv_extra[:count]:
            for rrset in extra:
                if (rrset.name, rrset.rdtype) not in seen:
                    seen.add((rrset.name, rrset.rdtype))
                    additional.append(rrset)
        return self.answer[:count], additional


def limits(
    records: Records, query: dns.message.Message, transport: Literal["udp", "tcp"], config: DNSConfig
) -> tuple[int, int]:
    """How many answers may go at most, and in how many bytes."""
    total = len(records.answer)
    if transport == "udp":
        max_size = query.payload if query.edns >= 0 and query.payload > 512 else 512
        keep = min(total, MAX_UDP_ANSWERS, config.udp_answer_limit) if max_size == 512 else total
        return keep, max_size
    return min(total, TCP_MAX_SRV_ANSWERS if records.srv else TCP_MAX_ANSWERS), TCP_MAX_SIZE


def fit(render: Callable[[int], bytes | None], keep: int, max_size: int) -> tuple[int, bytes | None]:
    """The response with the most answers, up to ``keep``, that fits ``max_size`` bytes
    (at least one answer, sent even when it alone is larger): ``render(count)`` makes the
    response with the first ``count``, None when no DNS message can hold it. One rendering
    when it fits, as it nearly always does; a binary search when not."""
    wire = render(keep)
    if wire is not None and (keep <= 1 or len(wire) <= max_size):
        return keep, wire
    low, high = 1, keep - 1
    while low < high:
        middle = (low + high + 1) // 2
        candidate = render(middle)
        if candidate is not None and len(candidate) <= max_size:
            low = middle
        else:
            high = middle - 1
    return low, render(low)
