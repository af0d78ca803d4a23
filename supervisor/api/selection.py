"""What a read asks to narrow its answer by: ``?filter=`` and ``?node-meta=key:value``.

Parsed and checked before a blocking query waits (a bad expression is a 400 at once),
then applied to the answer's wire objects each time it is computed. ``key`` is part of
the cached result's key, so two filters never share an answer.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from supervisor.api.filtering import FilterError, compile_filter
from supervisor.api.http import HttpError, Request

NodeMetaOf = Callable[[Any], Mapping[str, str]]


@dataclass(frozen=True)
class Selection:
    expression: str | None = None
    node_meta: tuple[tuple[str, str], ...] = ()

    @classmethod
    def of(cls, request: Request, *, node_meta: bool = False) -> Selection:
        expression = request.arg("filter") or None
        if expression is not None:
            try:
                compile_filter(expression)
            except FilterError as exc:
                raise HttpError(400, f"Failed to create filter: {exc}") from None
        pairs: list[tuple[str, str]] = []
        if node_meta:
            for pair in request.query.get("node-meta", []):
                key, separator, value = pair.partition(":")
                if not separator or not key:
                    raise HttpError(400, f"Invalid node-meta {pair[:80]!r}: use key:value")
                pairs.append((key, value))
        return cls(expression, tuple(pairs))

    @property
    def key(self) -> tuple[Any, ...]:
        return (self.expression, self.node_meta)

    def apply(self, items: Iterable[Any], node_meta_of: NodeMetaOf | None = None) -> list[Any]:
        chosen = list(items)
        if self.node_meta and node_meta_of is not None:
            chosen = [item for item in chosen if _has_meta(node_meta_of(item), self.node_meta)]
        if self.expression:
            predicate = compile_filter(self.expression)
            chosen = [item for item in chosen if _keep(predicate, item)]
        return chosen

    def apply_values(self, mapping: Mapping[str, Any]) -> dict[str, Any]:
        """Consul filters a map-shaped answer (agent services and checks) by its values."""
        if not self.expression:
            return dict(mapping)
        predicate = compile_filter(self.expression)
        return {key: value for key, value in mapping.items() if _keep(predicate, value)}


def _keep(predicate: Callable[[Any], bool], item: Any) -> bool:
    try:
        return predicate(item)
    except FilterError as exc:
        raise HttpError(400, f"Failed to apply filter: {exc}") from None


def _has_meta(meta: Mapping[str, str], wanted: tuple[tuple[str, str], ...]) -> bool:
    return all(meta.get(key) == value for key, value in wanted)
