"""Python client for a Freshet node: predictions, events, versions and the admin API.

>>> from freshet import Client
>>> node = Client("http://127.0.0.1:8080")
>>> node.predict({"C1": "u17"}, [{"C2": "i3"}, {"C2": "i9"}])  # doctest: +SKIP
Prediction(version=42, scores=[0.031, 0.012])
"""

from .client import (
    EVENTS_PER_REQUEST,
    Candidate,
    Client,
    Prediction,
    Refusal,
    SendResult,
    SparseValue,
)
from .errors import (
    BadRequest,
    Conflict,
    ConnectionFailed,
    Forbidden,
    FreshetError,
    HTTPError,
    NotFound,
    ServerError,
    Unauthorized,
    Unavailable,
)

__all__ = [
    "EVENTS_PER_REQUEST",
    "BadRequest",
    "Candidate",
    "Client",
    "Conflict",
    "ConnectionFailed",
    "Forbidden",
    "FreshetError",
    "HTTPError",
    "NotFound",
    "Prediction",
    "Refusal",
    "SendResult",
    "ServerError",
    "SparseValue",
    "Unauthorized",
    "Unavailable",
]
