"""Every error the API answers, in one envelope, mapped once by exception type.

Routes and dependencies *raise* (:class:`ApiError`, :class:`~serve.http.schemas.SpecError`,
the graph's :mod:`serve.errors`, FastAPI's validation and HTTP errors); the handlers
:func:`install_error_handlers` adds turn each into ``{"error": {type, message, details},
"request_id"}`` with its status, headers and rejection metric.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from serve.errors import Overloaded, RequestTimedOut, StageUnavailable
from serve.http.admission import retry_after_header
from serve.http.schemas import ErrorResponse, SpecError

logger = logging.getLogger("kandinsky_serve.api")
T = TypeVar("T")


class ApiError(Exception):
    """An error answer. ``reason``: the rejection metric's label, when this refuses work
    (None for e.g. an unknown job)."""

    def __init__(self, status: int, kind: str, message: str, details: list[dict] | None = None,
                 headers: dict[str, str] | None = None, reason: str | None = None) -> None:
        super().__init__(message)
        self.status, self.kind, self.message = status, kind, message
        self.details = details or []
        self.headers = headers
        self.reason = reason

    @classmethod
    def invalid(cls, field: str, message: str) -> ApiError:
        """422 for one field."""
        return cls(422, "validation_error", f"{field}: {message}", [{"field": field, "message": message}],
                   reason="validation")

    @classmethod
    def from_validation(cls, error: Any, under: Callable[[str], str] = lambda field: field or "body") -> ApiError:
        """422 for a pydantic ``ValidationError``, each field's dotted path through ``under``."""
        return cls.from_details([{"field": under(".".join(str(part) for part in item["loc"])), "message": item["msg"]}
                                 for item in error.errors()])

    @classmethod
    def from_details(cls, details: list[dict]) -> ApiError:
        """422 for several fields."""
        message = "; ".join(f"{d['field']}: {d['message']}" for d in details)
        return cls(422, "validation_error", message, details, reason="validation")

    def renamed(self, rename_field: Callable[[str], str]) -> ApiError:
        """The same error in a foreign API's field names (the compat routes)."""
        details = [{**detail, "field": rename_field(detail["field"])} for detail in self.details]
        message = "; ".join(f"{d['field']}: {d['message']}" for d in details) or self.message
        return ApiError(self.status, self.kind, message, details, self.headers, self.reason)


def error_response(status: int, kind: str, message: str, request_id: str | None,
                   details: list[dict] | None = None, headers: dict[str, str] | None = None) -> JSONResponse:
    body = ErrorResponse.model_validate(
        {"error": {"type": kind, "message": message, "details": details or []}, "request_id": request_id}
    )
    return JSONResponse(body.model_dump(), status_code=status, headers=headers)


def field_name(loc: tuple) -> str:
    parts = [str(part) for part in loc if part not in ("body", "query", "header", "path")]
    return ".".join(parts) or "body"


async def from_backend(call: Awaitable[T], request_id: str) -> T:
    """Await a call into the graph or the job store: the service's own errors pass (their
    handlers answer them); anything else is a 500 that names only its type, logged here."""
    try:
        return await call
    except (RequestTimedOut, StageUnavailable, Overloaded, ApiError):
        raise
    except Exception as error:
        logger.exception("request %s failed", request_id)
        raise ApiError(500, "generation_failed", f"generation failed: {type(error).__name__}") from error


OPENAI_PREFIX = "/v1/images/"
"""The OpenAI Images routes answer errors in OpenAI's shape (the SDK reads it)."""


def answer_error(request: Request, error: ApiError, metrics: Any) -> JSONResponse:
    """``error`` as its response, counted as a rejection when it refuses work."""
    if error.reason is not None:
        metrics.rejection(error.reason)
    if _app_path(request).startswith(OPENAI_PREFIX):
        return openai_error_response(error)
    return error_response(error.status, error.kind, error.message, getattr(request.state, "request_id", None),
                          error.details, error.headers)


def openai_error_response(error: ApiError) -> JSONResponse:
    """OpenAI's error: ``{"error": {message, type, param, code}}``, 400 for invalid input
    (our 422); ``code`` is our error type, ``param`` the first field at fault."""
    status = 400 if error.status == 422 else error.status
    kind = "server_error" if status >= 500 else "invalid_request_error"
    param = error.details[0]["field"] if error.details else None
    return JSONResponse({"error": {"message": error.message, "type": kind, "param": param, "code": error.kind}},
                        status_code=status, headers=error.headers)


def _app_path(request: Request) -> str:
    path, root = request.scope.get("path", ""), request.scope.get("root_path", "")
    return path[len(root):] if root and path.startswith(root) else path


def install_error_handlers(app: FastAPI, metrics: Any, retry_after_s: Callable[[], float]) -> None:
    """``retry_after_s``: the Retry-After for 503s (the admission gate's estimate)."""

    def answer(request: Request, error: ApiError) -> JSONResponse:
        return answer_error(request, error, metrics)

    @app.exception_handler(ApiError)
    async def on_api_error(request: Request, error: ApiError) -> JSONResponse:
        return answer(request, error)

    @app.exception_handler(SpecError)
    async def on_spec_error(request: Request, error: SpecError) -> JSONResponse:
        return answer(request, ApiError.invalid(error.field, error.message))

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
        details = [{"field": field_name(tuple(item["loc"])), "message": item["msg"]} for item in error.errors()]
        return answer(request, ApiError.from_details(details))

    @app.exception_handler(RequestTimedOut)
    async def on_timeout(request: Request, error: RequestTimedOut) -> JSONResponse:
        return answer(request, ApiError(504, "timeout", str(error), reason="timeout"))

    @app.exception_handler(StageUnavailable)
    @app.exception_handler(Overloaded)
    async def on_unavailable(request: Request, error: Exception) -> JSONResponse:
        kind = "overloaded" if isinstance(error, Overloaded) else "stage_unavailable"
        return answer(request, ApiError(503, kind, str(error), headers={"Retry-After": retry_after_header(retry_after_s())},
                                        reason=kind))

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        """Starlette's own (unknown route 404, 405): in the same envelope."""
        kinds = {400: "invalid_body", 404: "not_found", 405: "method_not_allowed"}
        # FastAPI's 400 is a body it could not parse (nested too deep, a number too long, ...).
        details = [{"field": "body", "message": str(error.detail)}] if error.status_code == 400 else None
        return answer(request, ApiError(error.status_code, kinds.get(error.status_code, "http_error"), str(error.detail),
                                        details, headers=getattr(error, "headers", None),
                                        reason="validation" if error.status_code == 400 else None))
