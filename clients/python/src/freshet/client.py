"""A client of one Freshet node's HTTP API, on the standard library alone."""

from __future__ import annotations

import http.client
import json
import os
import socket
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from itertools import islice
from typing import Any, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

from .errors import ConnectionFailed, FreshetError, for_status

#: A sparse feature's value: a string or integer id, a list of them, or
#: ``{"values": [...], "weights": [...]}``, as in the node's JSON samples.
SparseValue = Union[str, int, Sequence[Union[str, int]], Mapping[str, Any]]

#: Lines per ``POST /v1/events`` when :meth:`Client.send_events` is given an iterable.
EVENTS_PER_REQUEST = 1000


@dataclass(frozen=True)
class Candidate:
    """One item to score: its own sparse and dense features, added to the request's shared ones."""

    sparse: Mapping[str, SparseValue] = field(default_factory=dict)
    dense: Mapping[str, float] = field(default_factory=dict)

    def to_json(self) -> Dict[str, Any]:
        return {"sparse": dict(self.sparse), "dense": dict(self.dense)}


@dataclass(frozen=True)
class Prediction:
    """What ``POST /v1/predict`` answered: the version that scored, and one click probability per
    candidate, in the order given."""

    version: int
    scores: List[float]


@dataclass(frozen=True)
class Refusal:
    """An event the node refused (and dead-lettered): its position in the iterable given to
    :meth:`Client.send_events`, counted from 0, and the node's reason."""

    index: int
    reason: str
    error: str


@dataclass(frozen=True)
class SendResult:
    """What :meth:`Client.send_events` did: events appended, and those refused with why."""

    accepted: int
    refused: List[Refusal]

    @property
    def rejected(self) -> int:
        return len(self.refused)


class Client:
    """One node's HTTP API.

    ``url`` is the node's address (``freshet dev``'s ``--listen``, by default
    ``http://127.0.0.1:8080``). ``token`` is the admin token (``--admin-token``); it is sent as
    ``Authorization: Bearer <token>``, as ``freshet ctl`` sends it. ``admin_url`` is where the
    admin API and status are asked, when that is another port than ``url`` (the node's operations
    port); by default ``url``.

    Every method raises a :class:`~freshet.FreshetError` subclass on failure:
    :class:`~freshet.ConnectionFailed` when the node cannot be reached, and for an error answer
    :class:`~freshet.BadRequest`, :class:`~freshet.Unauthorized`, :class:`~freshet.Forbidden`,
    :class:`~freshet.NotFound`,
    :class:`~freshet.Conflict`, :class:`~freshet.Unavailable` or :class:`~freshet.ServerError`,
    each with the server's ``reason``.
    """

    def __init__(
        self,
        url: str = "http://127.0.0.1:8080",
        token: Optional[str] = None,
        *,
        admin_url: Optional[str] = None,
        timeout: float = 30.0,
    ) -> None:
        self.url = _base(url)
        self.admin_url = _base(admin_url) if admin_url else self.url
        self.token = token
        self.timeout = timeout

    def __repr__(self) -> str:
        # Never the token: a repr ends up in logs.
        token = ", token=***" if self.token else ""
        return f"Client({self.url!r}{token})"

    # Serving.

    def predict(
        self,
        user: Optional[Mapping[str, SparseValue]],
        candidates: Sequence[Union[Candidate, Mapping[str, SparseValue]]],
        *,
        dense: Optional[Mapping[str, float]] = None,
    ) -> Prediction:
        """Scores ``candidates`` for one request.

        ``user`` holds the sparse features every candidate shares (the user's, the context's),
        ``dense`` the shared dense ones. Each candidate is a :class:`Candidate`, or a mapping of
        its sparse features alone.
        """
        if not candidates:
            raise ValueError("predict needs at least one candidate")
        body = {
            "sparse": dict(user or {}),
            "dense": dict(dense or {}),
            "candidates": [
                c.to_json() if isinstance(c, Candidate) else {"sparse": dict(c)} for c in candidates
            ],
        }
        answer = self._json("POST", self.url, "/v1/predict", body)
        return Prediction(version=int(answer["version"]), scores=[float(s) for s in answer["scores"]])

    def health(self) -> Dict[str, Any]:
        """``GET /healthz``: whether the node serves, the served version and its age. A node that
        serves nothing yet answers 503, raised as :class:`~freshet.Unavailable`."""
        return self._json("GET", self.url, "/healthz")

    # Events.

    def send_events(self, events: Iterable[Mapping[str, Any]]) -> SendResult:
        """Appends events (impressions and actions, as in ``docs/stream.md``) to the node's event
        log, :data:`EVENTS_PER_REQUEST` per request, so that any iterable (a generator over a
        file) can be sent.

        A malformed event does not stop the others: the node appends the rest, dead-letters it,
        and it comes back in :attr:`SendResult.refused` with the node's reason. An error of the
        whole request (the node stopped training, the log failed) raises; events of earlier
        requests stay appended.
        """
        accepted = 0
        refused: List[Refusal] = []
        start = 0
        for batch in _chunks(events, EVENTS_PER_REQUEST):
            lines = "\n".join(json.dumps(e, separators=(",", ":")) for e in batch) + "\n"
            status, text = self._request("POST", self.url, "/v1/events", lines.encode())
            answer = _parse(text)
            # 400 with a per-line answer: every line of this request was refused. Reported as
            # refusals like any other, not raised, so the caller sees which and why.
            if status == 400 and isinstance(answer, dict) and "refused" in answer:
                pass
            elif not 200 <= status < 300:
                raise for_status("POST", "/v1/events", status, _reason(answer, text), text)
            accepted += int(answer.get("accepted", 0))
            for r in answer.get("refused", []):
                # The node counts lines from 1 within one request.
                refused.append(
                    Refusal(
                        index=start + int(r.get("line", 1)) - 1,
                        reason=str(r.get("reason", "")),
                        error=str(r.get("error", "")),
                    )
                )
            start += len(batch)
        return SendResult(accepted=accepted, refused=refused)

    # Versions and the admin API.

    def versions(self) -> List[Dict[str, Any]]:
        """``GET /v1/models``: every retained version, oldest first, with its parent, kind,
        offsets, validation (verdict, reason, metrics) and marks; ``serving`` is true on the one
        served."""
        return list(self._json("GET", self.url, "/v1/models")["versions"])

    def serving(self) -> Optional[int]:
        """The version the node serves, or ``None`` before the first."""
        v = self._json("GET", self.url, "/v1/models").get("serving")
        return None if v is None else int(v)

    def versions_frame(self) -> Any:
        """:meth:`versions` as a pandas ``DataFrame``, one row per version, validation metrics
        as columns (``auc``, ``logloss``, ``calibration``, and the served version's beside
        them). Needs pandas (``pip install "freshet-client[pandas]"``)."""
        try:
            import pandas as pd
        except ImportError as e:
            raise ImportError(
                "versions_frame needs pandas: pip install pandas, or pip install "
                "'freshet-client[pandas]'"
            ) from e
        rows = []
        for v in self.versions():
            val = v.get("validation") or {}
            row = {
                "version": v.get("version"),
                "kind": v.get("kind"),
                "parent": v.get("parent"),
                "created": pd.to_datetime(v.get("created_unix_ms"), unit="ms", utc=True),
                "step": v.get("step"),
                "rows_trained": v.get("rows_trained"),
                "passed": val.get("passed"),
                "reason": val.get("reason"),
                "samples_validated": val.get("samples"),
                "serving": bool(v.get("serving")),
                "rolled_back": v.get("rolled_back") is not None,
                "calibrated_from": v.get("calibrated_from"),
            }
            for k, x in (val.get("metrics") or {}).items():
                row[k] = x
            rows.append(row)
        frame = pd.DataFrame(rows)
        if not frame.empty:
            frame = frame.set_index("version")
        return frame

    def status(self) -> Dict[str, Any]:
        """``GET /v1/admin/status``: the supervisor's children, the trainer, the validator,
        the replicas and the joiners."""
        return self._json("GET", self.admin_url, "/v1/admin/status")

    def nodes(self) -> Dict[str, Any]:
        """``GET /v1/admin/nodes``: the cluster's nodes and where each shard runs."""
        return self._json("GET", self.admin_url, "/v1/admin/nodes")

    def rollback(self, version: int) -> Dict[str, Any]:
        """Serves ``version`` now and retrains from it (``freshet ctl rollback``)."""
        return self._json("POST", self.admin_url, "/v1/admin/rollback", {"version": int(version)})

    def replay(
        self,
        from_: int,
        to: int,
        *,
        partition: int = 0,
        skip: Optional[Tuple[int, int]] = None,
    ) -> Dict[str, Any]:
        """Trains again on sample offsets ``from_..to`` of ``partition``, leaving out the range
        ``skip`` (``freshet ctl replay``)."""
        body = {
            "partition": int(partition),
            "from": int(from_),
            "to": int(to),
            "skip": None if skip is None else [int(skip[0]), int(skip[1])],
        }
        return self._json("POST", self.admin_url, "/v1/admin/replay", body)

    def calibrate(self, base: Union[str, "os.PathLike[str]"], version: Optional[int] = None) -> Dict[str, Any]:
        """Restarts training from a base model store (``freshet train --out``) on the node's
        machine, under its ``node.bases_dir`` (``freshet ctl calibrate``). ``base`` is made
        absolute here, as the node resolves no relative path."""
        body = {"base": os.path.abspath(os.fspath(base)), "version": version}
        return self._json("POST", self.admin_url, "/v1/admin/calibrate", body)

    # The wire.

    def _json(self, method: str, base: str, path: str, body: Any = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        status, text = self._request(method, base, path, data)
        answer = _parse(text)
        if not 200 <= status < 300:
            raise for_status(method, path, status, _reason(answer, text), text)
        if answer is None:
            raise FreshetError(f"{method} {path}: the node answered {status} with no JSON: {text[:200]!r}")
        return answer

    def _request(self, method: str, base: str, path: str, data: Optional[bytes]) -> Tuple[int, str]:
        headers = {"Accept": "application/json"}
        if data is not None:
            headers["Content-Type"] = "application/json"
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        req = urllib.request.Request(base + path, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                return resp.status, resp.read().decode("utf-8", "replace")
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode("utf-8", "replace")
        except (urllib.error.URLError, http.client.HTTPException, socket.timeout, OSError) as e:
            raise ConnectionFailed(base + path, e) from e


def _base(url: str) -> str:
    u = url if "://" in url else "http://" + url
    parts = urllib.parse.urlsplit(u)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"{url!r} is not a node address such as http://127.0.0.1:8080")
    return u.rstrip("/")


def _parse(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return None


def _reason(answer: Any, text: str) -> str:
    if isinstance(answer, dict) and isinstance(answer.get("error"), str):
        return answer["error"]
    return text.strip()[:500] or "(no body)"


def _chunks(items: Iterable[Any], n: int) -> Iterator[List[Any]]:
    it = iter(items)
    while True:
        batch = list(islice(it, n))
        if not batch:
            return
        yield batch
