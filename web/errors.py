"""Every error leaves as JSON: {"error": {"code", "message"}}."""

from __future__ import annotations

import logging

import redis
from flask import Flask, jsonify
from werkzeug.exceptions import HTTPException

from shared.schema import ErrorCode
from web import services

log = logging.getLogger(__name__)


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        code: ErrorCode,
        message: str,
        retry_after_s: int | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.retry_after_s = status, code, message, retry_after_s
        self.headers = headers or {}


def error_response(status: int, code: str, message: str, retry_after_s: int | None = None, headers=None):
    headers = dict(headers or {})
    if retry_after_s is not None:
        headers["Retry-After"] = str(retry_after_s)
    return jsonify({"error": {"code": code, "message": message}}), status, headers


_HTTP_CODES = {
    404: ErrorCode.NOT_FOUND,
    405: ErrorCode.METHOD_NOT_ALLOWED,
    413: ErrorCode.UPLOAD_TOO_LARGE,
    415: ErrorCode.UNSUPPORTED_MEDIA_TYPE,
}


def register_error_handlers(app: Flask) -> None:
    @app.errorhandler(ApiError)
    def _api_error(exc: ApiError):
        return error_response(exc.status, exc.code.value, exc.message, exc.retry_after_s, exc.headers)

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException):
        status = exc.code or 500
        code = _HTTP_CODES.get(status)
        if status == 413:
            limit = services(app).settings.MAX_UPLOAD_BYTES
            # werkzeug also answers 413 for a form part or a header section past its own limits
            message = f"the request is too large: uploads are limited to {limit} bytes, form fields to 500 KB"
            return error_response(413, ErrorCode.UPLOAD_TOO_LARGE.value, message)
        return error_response(status, (code.value if code else exc.name.lower().replace(" ", "_")), exc.description)

    @app.errorhandler(redis.RedisError)
    def _redis_down(exc: redis.RedisError):
        log.error("redis unavailable: %s", exc)
        return error_response(
            503, ErrorCode.SERVICE_UNAVAILABLE.value, "the job store is unavailable, retry later", retry_after_s=5
        )

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception):
        log.exception("unhandled error")
        return error_response(500, ErrorCode.INTERNAL.value, "internal error")
