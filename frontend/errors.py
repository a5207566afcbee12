"""API errors in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`."""

from __future__ import annotations

import re
import sys

import msgspec


class ErrorInfo(msgspec.Struct):
    message: str
    type: str
    param: str | None = None
    code: str | int | None = None


class ErrorResponse(msgspec.Struct):
    error: ErrorInfo


class APIError(Exception):
    """Raised anywhere while serving a request; the error middleware turns it into a response."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        # Messages may quote what the client sent (a header, a path) with undecodable bytes
        # as lone surrogates, which JSON cannot carry: escape them.
        message = message.encode("utf-8", "backslashreplace").decode()
        super().__init__(message)
        self.status = status
        self.info = ErrorInfo(message=message, type="invalid_request_error" if status < 500 else "server_error", param=param, code=code)
        self.headers = headers or {}  # sent with the error response (e.g. Retry-After)

    def body(self) -> bytes:
        return msgspec.json.encode(ErrorResponse(self.info))


def invalid_param(param: str | None, message: str) -> APIError:
    return APIError(400, message, param=param, code="invalid_value" if param else None)


# Clients (the OpenAI SDK among them) wait this long before retrying a 503.
OVERLOADED_RETRY_AFTER_S = 1
# While the engine restarts: about the time the default model takes to load on a CPU.
ENGINE_RESTART_RETRY_AFTER_S = 5


def engine_dead(reason: str) -> APIError:
    """For requests that arrive while the engine is down (restarting, or gone for good)."""
    return APIError(503, f"The engine is not running: {reason}", code="engine_dead",
                    headers={"Retry-After": str(ENGINE_RESTART_RETRY_AFTER_S)})


def engine_failed(reason: str) -> APIError:
    """For requests the engine was serving when it died: their work is lost, a retry starts over."""
    return APIError(500, f"The engine died while serving this request: {reason}", code="engine_dead")


def shutting_down(detail: str) -> APIError:
    return APIError(503, f"The server is shutting down: {detail}", code="shutting_down",
                    headers={"Retry-After": str(OVERLOADED_RETRY_AFTER_S)})


def request_timed_out(timeout_s: float) -> APIError:
    return APIError(408, f"The request ran longer than its timeout of {timeout_s:g} s and was stopped.",
                    param="request_timeout", code="request_timeout")


def overloaded(limit: int) -> APIError:
    return APIError(503, f"The server is overloaded: {limit} requests are already running or waiting. "
                    "Retry later.", code="overloaded", headers={"Retry-After": str(OVERLOADED_RETRY_AFTER_S)})


def unsupported_media_type(content_type: str | None) -> APIError:
    got = "none" if content_type is None else repr(content_type)
    return APIError(415, f"The request body must be JSON sent with Content-Type: application/json; the "
                    f"Content-Type was {got}.", code="unsupported_media_type")


def unsupported_content_encoding(encoding: str, supported: list[str]) -> APIError:
    return APIError(415, f"The request body's Content-Encoding must be one of {', '.join(supported)}; got "
                    f"{encoding!r}.", code="unsupported_media_type")


def undecodable_body(encoding: str, detail: str) -> APIError:
    return invalid_param(None, f"The request body is not the {encoding} data its Content-Encoding says: {detail}")


# msgspec says where a value failed as "- at `$.messages[0].role`" (a dict's key: "- at `key`
# in `$.logit_bias`", a dict's value: "- at `$.logit_bias[...]`") or names a missing field.
_AT_PATH = re.compile(r"`\$\.([^`]*)`")
_MISSING = re.compile(r"missing required field `([^`]*)`")
# A number out of its msgspec.Meta bounds ("Expected `int` <= 128 - at `$.n`"): the message
# names the bound but not the value, which is looked up in the body by its path.
_OUT_OF_BOUNDS = re.compile(r"^(Expected `[^`]+` [<>]=? \S+) - at `\$\.(\w+(?:\.\w+|\[\d+\])*)`$")
_PATH_STEP = re.compile(r"(\w+)|\[(\d+)\]")
_MAX_SHOWN_VALUE = 100  # characters of an offending value quoted back


def from_decode_error(e: Exception, body: bytes = b"") -> APIError:
    """A msgspec decode/validation failure (or invalid UTF-8, or JSON nested deeper than the
    decoder recurses) as a 400 naming the parameter."""
    if isinstance(e, UnicodeDecodeError):
        return invalid_param(None, "The request body is not valid UTF-8")
    if isinstance(e, RecursionError):
        return invalid_param(None, "The request body nests JSON arrays or objects too deeply (the limit is "
                             f"about {sys.getrecursionlimit()} levels)")
    if isinstance(e, msgspec.ValidationError):
        message = str(e)
        found = _AT_PATH.search(message) or _MISSING.search(message)
        param = found.group(1).replace("[...]", "") if found else None
        return invalid_param(param, _with_value(message, body))
    return invalid_param(None, f"The request body is not valid JSON: {e}")


def _with_value(message: str, body: bytes) -> str:
    found = _OUT_OF_BOUNDS.match(message)
    if found is None:
        return message
    bound, path = found.groups()
    try:
        value = msgspec.json.decode(body)
        for name, index in _PATH_STEP.findall(path):
            value = value[int(index)] if index else value[name]
        # ValueError: repr() refuses ints of over 4,300 digits (and DecodeError is one).
        shown = repr(value)
    except (ValueError, RecursionError, LookupError, TypeError):
        return message
    if len(shown) > _MAX_SHOWN_VALUE:
        shown = shown[:_MAX_SHOWN_VALUE] + "..."
    return f"{bound}, got {shown} - at `$.{path}`"


def from_value_error(e: ValueError) -> APIError:
    """A `check_arg` failure ("<name> must be ..."), naming the parameter it starts with."""
    message = str(e)
    return invalid_param(message.split(" ", 1)[0], message)
