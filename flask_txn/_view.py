"""What ``@atomic`` on a Flask view adds: a request body every attempt can read,
and the rollback of a view that returns an error status."""

from __future__ import annotations

import contextlib
import io
from collections.abc import Callable
from typing import Any

from flask import current_app, has_request_context, request
from werkzeug.wrappers import Response

from ._config import RetryPolicy, StatusVeto
from ._errors import UsageError

#: Set on a function that ``@atomic`` wrapped: the wrapper, which is what a route
#: must serve for the view to run in a transaction.
_WRAPPED_BY = "__flask_txn_wrapped_by__"


def mark_wrapped(func: Callable[..., Any], wrapper: Callable[..., Any]) -> None:
    """Remember on ``func`` that ``wrapper`` is its transaction."""
    # functools.wraps copied the mark of an earlier '@atomic' of func onto the wrapper.
    vars(wrapper).pop(_WRAPPED_BY, None)
    # A builtin or a bound method takes no attributes; no route serves one unwrapped.
    with contextlib.suppress(AttributeError, TypeError):
        setattr(func, _WRAPPED_BY, wrapper)


def check_route_order(app: Any) -> None:
    """Refuse a route that serves a function ``@atomic`` wrapped, instead of the wrapper."""
    views: dict[str, Callable[..., Any]] = app.view_functions
    for endpoint, view in views.items():
        wrapper = getattr(view, _WRAPPED_BY, None)
        # Only the very function '@atomic' wrapped: another decorator's wrapper
        # carries a copy of the mark without being that function.
        if wrapper is not None and getattr(wrapper, "__wrapped__", None) is view:
            raise UsageError(
                f"The route of endpoint {endpoint!r} serves {wrapper.__qualname__!r} without its"
                " transaction: '@atomic' was written above the route decorator, which had"
                " already registered the plain function, so the view runs with no"
                " transaction and its writes are lost. Put '@atomic' below '@app.route'"
                " (or '@bp.post', ...), right above the function."
            )


def keep_request_body(policy: RetryPolicy | None) -> bytes | None:
    """Before a view's first attempt: its request body, read into memory if the
    view may be re-run, so that every attempt can read all of it (see
    :func:`rewind_request_body`). None if there is nothing to keep: no retries,
    no request, or no body (no ``Content-Length`` above 0, not chunked)."""
    if policy is None or not policy.retries or not has_request_context():
        return None
    environ = request.environ
    if environ.get("CONTENT_LENGTH", "") in ("", "0") and "HTTP_TRANSFER_ENCODING" not in environ:
        return None
    return request.get_data(cache=True)


def rewind_request_body(body: bytes | None) -> None:
    """At the start of an attempt: ``request.stream`` reads the kept body from its
    start (``get_data()``, ``get_json()`` and ``form`` read the kept copy anyway)."""
    if body is not None:
        # Werkzeug's cached_property: setting it replaces the cached stream.
        request.stream = io.BytesIO(body)


def vetoed(rv: object, veto: StatusVeto, wrapper: Callable[..., Any]) -> bool:
    """True if the view returned a response that asks for a rollback.

    Only the request's view function is judged (``TXN_ROLLBACK_ON_STATUS``): a
    helper returning a tuple like ``(item_id, 500)`` is data, not a response.
    """
    if veto is None:
        return False
    if callable(veto):
        return has_request_context() and _is_current_view(wrapper) and bool(veto(rv))
    # The status first: finding the view is only worth it for an error response.
    status = _status_of(rv)
    return (
        status is not None
        and status >= veto
        and has_request_context()
        and _is_current_view(wrapper)
    )


def _is_current_view(wrapper: Callable[..., Any]) -> bool:
    """True if ``wrapper`` is (or is wrapped by) the view serving this request."""
    view = current_app.view_functions.get(request.endpoint or "")
    while view is not None:
        if view is wrapper:
            return True
        view_class = getattr(view, "view_class", None)
        if view_class is not None:
            # A class-based view whose method was decorated.
            return getattr(view_class, request.method.lower(), None) is wrapper
        view = getattr(view, "__wrapped__", None)
    return False


def _status_of(rv: object) -> int | None:
    """The HTTP status of a view's return value, without touching a streamed body."""
    if isinstance(rv, tuple) and len(rv) in (2, 3):
        status = rv[1]
        if isinstance(status, int) and not isinstance(status, bool):
            return status
        if isinstance(status, str) and status.split(" ", 1)[0].isdigit():
            return int(status.split(" ", 1)[0])
        return _status_of(rv[0])
    if isinstance(rv, Response):
        return rv.status_code
    return None
