"""The exceptions the client raises: one per way a call can fail, each with the server's reason."""

from __future__ import annotations

from typing import Optional


class FreshetError(Exception):
    """Base class of every error this client raises."""


class ConnectionFailed(FreshetError):
    """The node could not be reached, or it closed the connection before answering."""

    def __init__(self, url: str, cause: BaseException) -> None:
        super().__init__(f"{url}: {cause}")
        self.url = url
        self.cause = cause


class HTTPError(FreshetError):
    """The node answered with an error status.

    ``reason`` is the server's own words (the ``error`` field of its JSON answer), so that a
    caller can show or log why without parsing the body.
    """

    def __init__(self, method: str, path: str, status: int, reason: str, body: Optional[str] = None) -> None:
        super().__init__(f"{method} {path}: HTTP {status}: {reason}")
        self.method = method
        self.path = path
        self.status = status
        self.reason = reason
        self.body = body


class BadRequest(HTTPError):
    """400: the request was refused as malformed or invalid (for example, no candidates)."""


class Unauthorized(HTTPError):
    """401: the admin API needs a token (``Client(url, token=...)``), or this one is wrong."""


class Forbidden(HTTPError):
    """403: the node refuses this whatever the token (a base store outside its
    ``node.bases_dir``)."""


class NotFound(HTTPError):
    """404: no such route or version on this node."""


class Conflict(HTTPError):
    """409: the node's state does not allow it (for example, rolling back to a version that was
    set aside, or a replay while another runs)."""


class Unavailable(HTTPError):
    """503, 429 or 408: the node cannot do it now (no version served yet, training stopped,
    overloaded, or the request body came too slowly); trying again later may succeed."""


class ServerError(HTTPError):
    """Any other error status (a 5xx the node could not handle, or a status this client does
    not know)."""


def for_status(method: str, path: str, status: int, reason: str, body: Optional[str]) -> HTTPError:
    """The exception for an error answer of ``status``."""
    cls: type
    if status in (400, 413, 415, 422):
        cls = BadRequest
    elif status == 401:
        cls = Unauthorized
    elif status == 403:
        cls = Forbidden
    elif status == 404:
        cls = NotFound
    elif status == 409:
        cls = Conflict
    elif status in (408, 429, 503):
        cls = Unavailable
    else:
        cls = ServerError
    return cls(method, path, status, reason, body)
