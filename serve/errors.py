"""Every error as RFC 9457 problem details: the API's own, Litestar's (validation, routing, rate limit), an
oversized request head, and an unhandled exception."""

from __future__ import annotations

from http import HTTPStatus

import msgspec
from litestar import Request, Response
from litestar.exceptions import (
    HTTPException,
    MethodNotAllowedException,
    NotFoundException,
    TooManyRequestsException,
    ValidationException,
)
from litestar.plugins.problem_details import ProblemDetailsException
from litestar.types import ASGIApp, Receive, Scope, Send

from serve.observability import log
from serve.schemas import Problem

MAX_HEAD_BYTES = 16 * 1024


def problem(status: int, title: str, detail: str, **extensions: object) -> ProblemDetailsException:
    """The API's own error; `extensions` are members of the body beside detail (RFC 9457 section 3.2)."""
    return ProblemDetailsException(status_code=status, title=title, detail=detail, extra=extensions or None)


_WHAT_TO_DO = {
    ValidationException: "the parameters, their types and ranges are in the OpenAPI document at /schema",
    NotFoundException: "no such route; the API's routes are listed at /schema",
    MethodNotAllowedException: "the API answers GET requests only",
    TooManyRequestsException: "too many requests from this address; the RateLimit-Reset header says when to try again",
}


def as_problem(exc: HTTPException) -> ProblemDetailsException:
    """Litestar's own errors (validation, routing, rate limit) as problem details that say what to do."""
    advice = next((text for kind, text in _WHAT_TO_DO.items() if isinstance(exc, kind)), None)
    detail = exc.detail if exc.detail != HTTPStatus(exc.status_code).phrase else None
    if detail and len(detail) > 300:  # Litestar quotes the whole URL; a long bad input is not sent back whole
        detail = detail[:300] + "..."
    return ProblemDetailsException(
        status_code=exc.status_code,
        title=HTTPStatus(exc.status_code).phrase,
        detail="; ".join(filter(None, [detail, advice])),  # empty: the status phrase, as for None
        headers=exc.headers,
        extra={"errors": exc.extra} if isinstance(exc.extra, list) and exc.extra else None,
    )


def internal_error(request: Request, exc: Exception) -> Response:
    log.error("unhandled error", exc_info=exc, extra={"fields": {"path": request.url.path[:200]}})
    body = {
        "type": "about:blank",
        "title": "Internal Server Error",
        "status": 500,
        "detail": "the server failed to answer this request; the error is in its log",
    }
    return Response(body, status_code=500, media_type="application/problem+json")


class RequestHeadLimit:
    """ASGI middleware: a request whose target and headers together pass MAX_HEAD_BYTES is answered 431 unread."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            size = len(scope.get("raw_path") or b"") + len(scope.get("query_string") or b"")
            size += sum(len(name) + len(value) for name, value in scope.get("headers", []))
            if size > MAX_HEAD_BYTES:
                body = msgspec.json.encode(
                    Problem(
                        status=431,
                        title="Request Header Fields Too Large",
                        detail=f"the request's target and headers take {size:,} bytes, over {MAX_HEAD_BYTES:,}; send less",
                    )
                )
                headers = [(b"content-type", b"application/problem+json"), (b"content-length", str(len(body)).encode())]
                await send({"type": "http.response.start", "status": 431, "headers": headers})
                await send({"type": "http.response.body", "body": body, "more_body": False})
                return
        await self.app(scope, receive, send)
