"""What the catalog, intentions and prepared queries raise for a request they cannot
carry out. Domain errors: ``supervisor/api`` maps them to HTTP statuses (404, 409, 400, 503)."""

from __future__ import annotations

from supervisor.errors import SupervisorError


class CatalogError(SupervisorError):
    """A request on the catalog, intentions or prepared queries cannot be carried out."""


class NotFound(CatalogError):
    """No such intention, query or check."""


class Conflict(CatalogError):
    """It would clash with what exists (a second intention for a pair, a taken query name)."""


class InvalidDefinition(CatalogError):
    """A definition that cannot be used (an unknown template expression, say)."""


class Unavailable(CatalogError):
    """The shared store is out of reach (cluster mode, etcd down): nothing changed."""
