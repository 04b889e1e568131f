"""Ray Serve failover: the only student replica is killed while it holds requests. Every well-formed request still
gets its own answer (the ingress retries it once on the replacement replica; requests are seeded, so the retry
answers the same) or a 503 with Retry-After; none gets a 500; the app serves afterwards.

The student is a slow plug-in (each model call sleeps) so that a known set of requests is in flight when the
replica dies; IKDDiT's seeded answers alone vs batched are checked in tests/test_serve.py."""

from __future__ import annotations

import asyncio
import hashlib
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace
from typing import Any

import pytest
from pydantic import BaseModel, ConfigDict

from serve.framework import Reply, StudentModel
from serve.schemas import StudentArgs, validate

try:
    from tests.ikddit_fixture import QUIET, free_port, http, start_serve
except ImportError:  # tests/ on sys.path (pytest's rootdir conftest)
    from ikddit_fixture import QUIET, free_port, http, start_serve

APP = "fabdistill-failover"
N_REQUESTS = 24


class Job(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    x: int
    seed: int


class SlowHash(StudentModel):
    """POST /slowhash/digest: a seeded digest of x, each model call taking `delay_s` (a busy model)."""

    kind, actions = "slowhash", {"digest": Job}
    deployment_options = {"ray_actor_options": {"num_cpus": 0.1}}
    delay_s = 0.4

    def load(self, checkpoint: str) -> None:
        self.checkpoint = checkpoint

    def describe(self) -> dict:
        return {"kind": self.kind, "checkpoint": self.checkpoint}

    def validate_request(self, action: str, payload: dict[str, Any]) -> Job:
        return validate(Job, payload)

    def handle_batch(self, action: str, requests: list[Job]) -> list[str]:
        time.sleep(self.delay_s)
        return [hashlib.sha256(f"{r.x}:{r.seed}".encode()).hexdigest()[:16] for r in requests]

    def respond(self, action: str, request: Job, result: str) -> Reply:
        return Reply.json({"x": request.x, "seed": request.seed, "digest": result})


class QuickHash(SlowHash):
    """The same student without the delay: the reference answers, computed in-process."""

    delay_s = 0.0


PLUGIN = f"{__name__}:SlowHash"
STUDENT_ARGS = {"checkpoint": "mem://slowhash", "max_batch_size": 4, "batch_wait_timeout_s": 0.02}


def _bodies() -> list[dict]:
    return [{"x": i, "seed": 1000 + 7 * i} for i in range(N_REQUESTS)]


def _solo_answers(bodies: list[dict]) -> list[bytes]:
    """Each request alone (a batch of one), through the student's own code in this process."""
    model = QuickHash(StudentArgs.model_validate(STUDENT_ARGS))
    answers = []
    for body in bodies:
        request = model.validate_request("digest", body)
        answers.append(model.respond("digest", request, model.handle_batch("digest", [request])[0]).content)
    return answers


def _replica_names() -> list[tuple[str, str]]:
    """(name, namespace) of the live SlowHash replica actors (Serve names them SERVE_REPLICA::app#deployment#id);
    asked of this session's own Ray, never of another cluster on the machine."""
    import ray

    return [(a["name"], a["namespace"]) for a in ray.util.list_named_actors(all_namespaces=True)
            if a["name"].startswith(f"SERVE_REPLICA::{APP}#SlowHash#")]


@pytest.fixture(scope="module")
def server(ray_local):
    from ray import serve

    from serve.app import build_app

    url = start_serve(free_port())
    serve.run(build_app({"students": {PLUGIN: STUDENT_ARGS}, "request_timeout_s": 60, "replica_wait_s": 45}),
              name=APP, route_prefix="/", logging_config=QUIET)
    yield url
    serve.delete(APP)
    serve.shutdown()


def test_killing_the_only_replica_mid_flight_loses_no_request(server):
    import ray

    bodies = _bodies()
    expected = _solo_answers(bodies)
    status, _, content = http("POST", server + "/slowhash/digest", bodies[0])
    assert status == 200 and content == expected[0]  # served replicas answer what the replica code does alone
    (victim,) = _replica_names()

    first_done = threading.Event()

    def post(body: dict) -> tuple[int, dict, bytes]:
        out = http("POST", server + "/slowhash/digest", body, timeout=120)
        first_done.set()
        return out

    with ThreadPoolExecutor(N_REQUESTS) as pool:
        futures = [pool.submit(post, body) for body in bodies]
        # One model call (4 requests) has finished, so the other ~20 wait in the replica or its queue: kill it.
        assert first_done.wait(timeout=60)
        ray.kill(ray.get_actor(*victim), no_restart=True)
        in_flight = sum(not f.done() for f in futures)
        results = [f.result() for f in futures]
    assert in_flight >= N_REQUESTS // 2  # the kill met requests the replica held (without retry: 500s)

    statuses = [status for status, _, _ in results]
    assert 500 not in statuses, [c[:300] for s, _, c in results if s == 500]
    assert set(statuses) <= {200, 503}, statuses
    for (status, headers, content), want in zip(results, expected):
        if status == 200:
            assert content == want
        else:
            assert int(headers["Retry-After"]) >= 1 and json.loads(content)["reason"], content
    assert statuses.count(200) >= N_REQUESTS // 2  # retried on the replacement, not merely refused
    assert [name for name in _replica_names() if name != victim]  # Serve replaced the replica
    # Later requests are served by the replacement.
    status, _, content = http("POST", server + "/slowhash/digest", bodies[5])
    assert status == 200 and content == expected[5]
    status, _, content = http("GET", server + "/healthz")
    assert status == 200 and json.loads(content)["students"] == {"slowhash": "ok"}


def test_bad_input_is_answered_by_the_replica_and_not_retried(server):
    status, headers, content = http("POST", server + "/slowhash/digest", {"x": "7", "seed": 1})
    assert status == 422 and "x: Input should be a valid integer" in content.decode()
    assert "Retry-After" not in headers


# --------------------------------------------------------------------------- the ingress's rules, offline

class _Method:
    """A DeploymentHandle method whose `.remote()` plays `script` in order: a value, an exception, or "hang"."""

    def __init__(self, script: list):
        self.script, self.calls = list(script), 0

    def remote(self, *args: Any):
        step = self.script[min(self.calls, len(self.script) - 1)]
        self.calls += 1

        async def answer():
            await asyncio.sleep(0.01)
            if step == "hang":
                await asyncio.sleep(3600)
            if isinstance(step, BaseException):
                raise step
            return step

        return answer()


def _ingress(run: list, ping: list, **kwargs):
    from serve.framework import Ingress

    handle = SimpleNamespace(run=_Method(run), ping=_Method(ping))
    plain = Ingress.func_or_class.__mro__[1]  # the class under @serve.ingress's ASGI wrapper
    return plain({"toy": handle}, {"toy": ["go"]}, **{"request_timeout_s": 10.0, "replica_wait_s": 0.5, **kwargs}), \
        handle


def _outcome(ingress, n: int = 1) -> list:
    from serve.framework import _Answered

    async def one():
        try:
            return await ingress._remote("toy", "run", "go", {})
        except _Answered as answered:
            return answered.response

    async def many():
        return await asyncio.gather(*[one() for _ in range(n)])

    return asyncio.run(many())


def test_ingress_retries_replica_deaths_once_and_answers_503_when_no_replica_is_ready():
    from ray.exceptions import ActorDiedError, ActorUnavailableError
    from ray.serve.exceptions import BackPressureError

    ok = Reply.json({"y": 1})
    died = ActorDiedError()
    # Died, a live replica answers the ping, the retry succeeds; concurrent victims share one probe.
    ingress, handle = _ingress([died] * 4 + [ok], ["ok"])
    assert _outcome(ingress, 4) == [ok] * 4
    assert handle.run.calls == 8 and handle.ping.calls == 1
    # Unreachable replica, no replica answers within replica_wait_s: 503 + Retry-After, reason named.
    ingress, handle = _ingress([ActorUnavailableError("gone", None)], ["hang"])
    (reply,) = _outcome(ingress)
    body = json.loads(reply.body)
    assert reply.status_code == 503 and int(reply.headers["retry-after"]) >= 1
    assert body["reason"] == "no_ready_replica" and "'toy' has no ready replica" in body["error"]
    assert handle.run.calls == 1
    # The retry dies too: 503, not a third try.
    ingress, handle = _ingress([died, died, ok], ["ok"])
    (reply,) = _outcome(ingress)
    assert reply.status_code == 503 and json.loads(reply.body)["reason"] == "replica_failed"
    assert handle.run.calls == 2
    # The student itself raised: 500 naming the cause, not retried. A full queue: 503, not retried.
    ingress, handle = _ingress([RuntimeError("negative input")], ["ok"])
    (reply,) = _outcome(ingress)
    assert reply.status_code == 500 and "negative input" in json.loads(reply.body)["error"]
    assert handle.run.calls == 1 and handle.ping.calls == 0
    ingress, handle = _ingress([BackPressureError(num_queued_requests=8, max_queued_requests=8)], ["ok"])
    (reply,) = _outcome(ingress)
    assert reply.status_code == 503 and json.loads(reply.body)["reason"] == "overloaded"
    assert reply.headers["retry-after"] == "1" and handle.run.calls == 1
