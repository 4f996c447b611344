"""The client against a real `freshet dev`, which these tests start and stop themselves.

The binary is `$FRESHET_BIN`, else the workspace's `target/debug/freshet` (built by `cargo
test` or `cargo build`); without one the tests fail and say how to build it.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Callable, Iterator, List, Optional, TypeVar

import pytest

import freshet
from freshet import (
    BadRequest,
    Candidate,
    Client,
    ConnectionFailed,
    Forbidden,
    NotFound,
    Unauthorized,
    Unavailable,
)

ROOT = Path(__file__).resolve().parents[3]
START_LIMIT_S = 120.0
T = TypeVar("T")


def binary() -> str:
    b = os.environ.get("FRESHET_BIN") or str(ROOT / "target" / "debug" / "freshet")
    if not os.access(b, os.X_OK):
        pytest.fail(f"no freshet binary at {b}: run `cargo build` first, or set FRESHET_BIN")
    return b


class Node:
    """A `freshet dev` on free loopback ports in its own data directory."""

    def __init__(self, data: Path, *extra: str) -> None:
        self.log = data / "node.log"
        data.mkdir(parents=True, exist_ok=True)
        self._out = open(self.log, "wb")
        self.proc = subprocess.Popen(
            [binary(), "dev", "--data-dir", str(data / "data"), "--listen", "127.0.0.1:0", *extra],
            cwd=data,
            stdout=self._out,
            stderr=subprocess.STDOUT,
        )
        self.url = ""
        self.ops = ""
        deadline = time.monotonic() + START_LIMIT_S
        # Its addresses, from the lines it prints once it listens.
        while time.monotonic() < deadline:
            text = self.log.read_text(errors="replace")
            m = re.search(r"predict: POST (http://\S+)/v1/predict", text)
            o = re.search(r"admin:\s+freshet ctl --url (http://\S+) status", text)
            if m and o:
                self.url, self.ops = m.group(1), o.group(1)
                break
            if self.proc.poll() is not None:
                pytest.fail(f"freshet dev exited with {self.proc.returncode}:\n{self.tail()}")
            time.sleep(0.1)
        else:
            self.stop()
            pytest.fail(f"freshet dev did not listen within {START_LIMIT_S} s:\n{self.tail()}")

    def tail(self, lines: int = 30) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._out.close()


def until(what: str, f: Callable[[], Optional[T]], node: Node, limit_s: float = START_LIMIT_S) -> T:
    """`f()` once it is not None (errors count as not yet), or a failure naming `what`."""
    deadline = time.monotonic() + limit_s
    last: object = None
    while time.monotonic() < deadline:
        try:
            got = f()
            if got is not None:
                return got
        except freshet.FreshetError as e:
            last = e
        time.sleep(0.2)
    pytest.fail(f"{what} not within {limit_s} s (last error: {last}):\n{node.tail()}")


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    n = Node(tmp_path_factory.mktemp("dev"))
    yield n
    n.stop()


@pytest.fixture(scope="module")
def client(node: Node) -> Client:
    c = Client(node.url, admin_url=node.ops)
    until("a served version", lambda: c.serving(), node)
    return c


def test_predict_scores_each_candidate_with_a_version_the_node_has(client: Client) -> None:
    p = client.predict(
        {"C1": "u17"},
        [{"C2": "i3"}, Candidate(sparse={"C2": "i9"}, dense={"I1": 2.0})],
        dense={"I2": 0.5},
    )
    assert len(p.scores) == 2
    assert all(0.0 < s < 1.0 for s in p.scores), p
    assert p.version in {v["version"] for v in client.versions()}


def test_a_bad_prediction_request_raises_with_the_servers_reason(client: Client) -> None:
    with pytest.raises(BadRequest) as e:
        client.predict(None, [Candidate(dense={"nope": 1.0})])
    assert e.value.status == 400
    assert "nope" in e.value.reason, e.value.reason
    with pytest.raises(ValueError):
        client.predict({"C1": "u1"}, [])


def test_events_are_appended_and_a_malformed_one_comes_back_with_its_reason(
    client: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    now = int(time.time() * 1000)

    def events() -> Iterator[dict]:
        for i in range(5):
            yield {
                "type": "impression",
                "request_id": f"py-{now}-{i}",
                "time_ms": now,
                "user": "u-py",
                "item": f"i-{i}",
                "features": {"dense": {"I1": 0.5}, "sparse": {"C1": "u-py", "C2": f"i-{i}"}},
            }
            if i == 2:
                yield {"type": "impression", "request_id": "", "time_ms": -5}
        yield {"type": "action", "request_id": f"py-{now}-1", "item": "i-1", "time_ms": now + 10, "kind": "click"}

    # Two lines per request, so that a refusal's index is counted across requests.
    monkeypatch.setattr(freshet.client, "EVENTS_PER_REQUEST", 2)
    sent = client.send_events(events())
    assert sent.accepted == 6, sent
    assert [r.index for r in sent.refused] == [3], sent
    assert sent.refused[0].reason and sent.refused[0].error, sent
    # A request whose every line is refused: reported, not raised.
    alone = client.send_events([{"type": "nonsense"}])
    assert (alone.accepted, alone.rejected) == (0, 1), alone


def test_versions_status_and_the_frame_agree_on_what_is_served(client: Client, node: Node) -> None:
    versions = client.versions()
    served = [v["version"] for v in versions if v["serving"]]
    assert len(served) == 1 and served[0] in {v["version"] for v in versions}, served
    status = client.status()
    assert {"children", "trainer", "validator", "replicas", "joiners"} <= set(status), status.keys()
    assert any(c["name"].startswith("joiner") for c in status["children"])
    frame = until("a validated version", lambda: _validated(client), node)
    assert {"kind", "parent", "passed", "reason", "serving", "rows_trained"} <= set(frame.columns)
    assert frame["serving"].sum() == 1
    assert frame.index.is_monotonic_increasing


def _validated(client: Client) -> Optional["pandas.DataFrame"]:  # noqa: F821
    """The versions as a frame once one has a verdict."""
    frame = client.versions_frame()
    return frame if frame["passed"].notna().any() else None


def test_rollback_serves_the_version_and_marks_those_after_it(client: Client, node: Node) -> None:
    def two_passed() -> Optional[List[dict]]:
        passed = [v for v in client.versions() if (v["validation"] or {}).get("passed") and not v["rolled_back"]]
        return passed if len(passed) >= 2 else None

    target = until("two versions that passed validation", two_passed, node)[0]["version"]
    live = {v["version"] for v in client.versions() if v["version"] > target and not v["rolled_back"]}
    assert live, "no version after the rollback's target"
    answer = client.rollback(target)
    assert answer["rolled_back_to"] == target, answer
    # The rollback answers once the replicas serve the target: serving is the target, or
    # already a version trained from it, never one of those rolled back.
    assert answer["serving"] == target or answer["serving"] > max(live), (answer, live)
    assert client.serving() == target or client.serving() > max(live)
    # Each version after the target that was live is marked rolled back to it (training goes
    # on from the target, so newer versions follow at once).
    marked = {v["version"]: v["rolled_back"] for v in client.versions() if v["version"] in live}
    assert marked and all(m and m["to"] == target for m in marked.values()), marked
    with pytest.raises(NotFound) as e:
        client.rollback(10**9)
    assert str(10**9) in e.value.reason


def test_replay_and_calibrate_answer_or_refuse_with_a_reason(client: Client, tmp_path: Path) -> None:
    r = client.replay(0, 5, partition=0)
    assert r["replaying"] == {"partition": 0, "from": 0, "to": 5, "skip": None}, r
    with pytest.raises(BadRequest):
        client.replay(10, 5)
    # Outside the node's bases directory (its working directory): refused whatever the token.
    with pytest.raises(Forbidden) as e:
        client.calibrate("/nonexistent-base")
    assert "bases_dir" in e.value.reason


def test_the_admin_api_needs_the_nodes_token(tmp_path: Path) -> None:
    n = Node(tmp_path, "--admin-token", "s3cret")
    try:
        anyone = Client(n.url, admin_url=n.ops)
        until("a served version", lambda: anyone.serving(), n)
        with pytest.raises(Unauthorized) as e:
            anyone.status()
        assert e.value.status == 401 and "Bearer" in e.value.reason
        with pytest.raises(Unauthorized):
            Client(n.url, "wrong", admin_url=n.ops).rollback(1)
        admin = Client(n.url, "s3cret", admin_url=n.ops)
        assert "trainer" in admin.status()
        assert "s3cret" not in repr(admin)
        # Predictions need no token.
        assert anyone.predict({"C1": "u1"}, [{"C2": "i1"}]).scores
    finally:
        n.stop()


def test_an_unreachable_node_and_a_bad_address_raise_before_any_answer() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # Nothing listens there once the socket is closed.
    with pytest.raises(ConnectionFailed):
        Client(f"http://127.0.0.1:{port}", timeout=5).versions()
    with pytest.raises(ValueError):
        Client("ftp://127.0.0.1:1")
    with pytest.raises(Unavailable):
        raise freshet.errors.for_status("GET", "/healthz", 503, "no version yet", None)
