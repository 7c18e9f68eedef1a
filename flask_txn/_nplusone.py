"""The N+1 guard: one relationship lazy-loaded, a query each, for many objects of one query.

It listens to the app's sessions with SQLAlchemy's own events, never to SQL
text. ``do_orm_execute`` marks a lazy load (``is_relationship_load``, with
``lazy_loaded_from``, the object whose relationship is loaded, and the
relationship at the end of ``loader_strategy_path``). Objects that one query
loaded share that query's run id (``InstanceState.runid``, the one mark
SQLAlchemy leaves of it on them), so a relationship lazy-loaded for
``TXN_NPLUSONE_THRESHOLD`` objects with the same run id is an N+1: a loop over
a query's results touching a relationship the query did not load. Objects
fetched one by one never share a run id, so a loop that loads one object's
relationship once is never reported.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from typing import Any

from flask import has_request_context, request
from sqlalchemy.orm import ORMExecuteState, RelationshipDirection, RelationshipProperty

from ._errors import NPlusOneError

log = logging.getLogger("flask_txn")

#: ``session.info`` key: (relationship, run id) -> identities of the objects whose
#: relationship was lazy-loaded.
_LOADS = "flask_txn.lazy_loads"


@dataclasses.dataclass(frozen=True)
class NPlusOne:
    """One N+1 found: where, which relationship, and for how many objects."""

    endpoint: str | None
    relationship: RelationshipProperty[Any]
    loads: int

    @property
    def name(self) -> str:
        """The relationship as ``Model.attribute``."""
        return f"{self.relationship.parent.class_.__name__}.{self.relationship.key}"

    def message(self) -> str:
        """What happened, and the eager load that fixes it, in SQLAlchemy 2.0 style."""
        owner = self.relationship.parent.class_.__name__
        # A collection: one more query for all of them, no duplicated rows. A
        # single object (many-to-one): a JOIN in the same query.
        loader = (
            "joinedload"
            if self.relationship.direction is RelationshipDirection.MANYTOONE
            else "selectinload"
        )
        where = "outside a request" if self.endpoint is None else f"in endpoint {self.endpoint!r}"
        return (
            f"N+1 queries {where}: {self.name} was lazy-loaded, one query each, for"
            f" {self.loads} {owner} objects that one query returned. Load it with that"
            f" query instead: select({owner}).options({loader}({self.name})). Set"
            " 'TXN_NPLUSONE' to 'off' to silence this."
        )


class Guard:
    """A ``do_orm_execute`` listener that counts lazy loads and reports N+1s.

    :param threshold: objects of one query whose relationship was lazy-loaded
        that make an N+1.
    :param report: called once for each relationship and query that reaches it.
    """

    def __init__(self, threshold: int, report: Callable[[NPlusOne], None]) -> None:
        self.threshold = threshold
        self.report = report

    def __call__(self, state: ORMExecuteState) -> None:
        # is_relationship_load first: lazy_loaded_from raises for INSERT and UPDATE.
        if not state.is_relationship_load:
            return
        parent = state.lazy_loaded_from
        if parent is None:
            return  # an eager loader's own query (selectinload), not a lazy load
        runid = getattr(parent, "runid", None)
        path = state.loader_strategy_path
        relationship = None if path is None else path[-1]
        if runid is None or not isinstance(relationship, RelationshipProperty):
            return  # an object never loaded by a query (new, or merged)
        loads: dict[tuple[Any, int], set[Any]] = state.session.info.setdefault(_LOADS, {})
        parents = loads.setdefault((relationship, runid), set())
        parents.add(parent.key)
        # Reported once, as the count reaches the threshold: more loads are the same N+1.
        if len(parents) == self.threshold:
            endpoint = request.endpoint if has_request_context() else None
            self.report(NPlusOne(endpoint, relationship, len(parents)))


class Warn:
    """``TXN_NPLUSONE = "warn"``: a WARNING, once per endpoint and relationship."""

    def __init__(self) -> None:
        self.reported: set[tuple[str | None, str]] = set()

    def __call__(self, found: NPlusOne) -> None:
        key = (found.endpoint, found.name)
        if key not in self.reported:
            self.reported.add(key)
            log.warning(found.message())


def raise_error(found: NPlusOne) -> None:
    """``TXN_NPLUSONE = "raise"``: the lazy load that makes the N+1 raises."""
    raise NPlusOneError(found.message())


def guard_for(mode: str, threshold: int) -> Guard | None:
    """The listener for ``TXN_NPLUSONE``, or None for "off"."""
    if mode == "off":
        return None
    return Guard(threshold, raise_error if mode == "raise" else Warn())
