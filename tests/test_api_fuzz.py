"""The API fuzz run of CI: schemathesis against a real server (uvicorn, the engine in its own process).

Every operation gets generated requests, valid and invalid; then a stateful run follows the schema's links from
`POST /v1/sessions` to GET, PATCH and DELETE with the session's real id and token. Every answer must be one the
OpenAPI document declares (status, content type, body) and none may be a 5xx. Bounded to well under a minute of
requests on two busy cores; the engine's start (~10 s) is most of the rest."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
import schemathesis
from aiortc import RTCConfiguration, RTCPeerConnection, VideoStreamTrack
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import Case, GenerationMode, HookContext
from schemathesis.schemas import BaseSchema

from server.app import create_app
from server.settings import Settings
from tests.conftest import running_server

#: Hypothesis' budgets: cases per operation, and stateful scenarios of at most so many steps
EXAMPLES_PER_OPERATION = 100
SCENARIOS, STEPS = 60, 10
#: Requests take milliseconds, more on a loaded machine: no per-case deadline, nor a health check for slow generation.
HYPOTHESIS: dict[str, Any] = {"deadline": None, "suppress_health_check": [HealthCheck.too_slow]}
#: The fuzz closes its sessions after each case and scenario, so it holds at most one scenario's worth, none of them
#: connected: with room to spare under this and under any limit on offers awaiting their peers, no POST meets a full
#: server (its 503 would count as a 5xx).
MAX_SESSIONS = 2 * STEPS
#: real offers the fuzz samples its SDPs from (a few: their ICE credentials and ports differ)
OFFERS = 3

# What each answer is checked for. Left out, and why:
# - positive_data_acceptance ("schema-valid requests get a 2xx"): the schema cannot say which text is an SDP offer
#   with one video track, or that a prompt has no control characters; generated text gets a documented 400 or 422.
# - unsupported_method: it judges only schemathesis' coverage phase, which this Python API run has not; the test
#   of 405s below does its work.
CHECKS = {
    "enabled": False,
    **{
        name: {"enabled": True}
        for name in (
            "not_a_server_error",  # no 5xx at all: a 503 would mean the engine was lost or the server full
            "status_code_conformance",  # every status is documented for its operation
            "content_type_conformance",
            "negative_data_rejection",  # schema-invalid input gets a 4xx (EditParams is strict: false is not 0.0)
            "response_schema_conformance",
            "use_after_free",  # a deleted session is gone (stateful)
            "ensure_resource_availability",  # a created session can be read (stateful)
        )
    },
}


@dataclass(frozen=True)
class LiveApi:
    url: str
    offers: tuple[str, ...]


@dataclass
class FuzzLog:
    """What the fuzz did: each answer as "METHOD /path status", and the sessions it opened and has not closed."""

    calls: Counter[str] = field(default_factory=Counter)
    opened: dict[str, str] = field(default_factory=dict)  # session id -> token

    def close_sessions(self, url: str) -> None:
        """Close what the fuzz opened, as a client would; else sessions pile up until the reaper's timeout."""
        if not self.opened:
            return
        with httpx.Client(base_url=url, timeout=20) as http:
            while self.opened:
                session_id, token = self.opened.popitem()
                response = http.delete(f"/v1/sessions/{session_id}", headers={"Authorization": f"Bearer {token}"})
                assert response.status_code in (204, 404), response.text  # 404: the fuzz's own DELETE came first


async def real_offer() -> str:
    """A complete SDP offer with one video track, as a browser sends it. Its peer connection closes at once: a
    session opened from it never connects, and so never sends the engine a frame."""
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    pc.addTrack(VideoStreamTrack())
    await pc.setLocalDescription(await pc.createOffer())
    sdp = pc.localDescription.sdp
    await pc.close()
    return sdp


@contextlib.contextmanager
def serve_in_a_thread(**overrides: Any) -> Iterator[LiveApi]:
    """`running_server` on an event loop of its own thread: schemathesis calls the API with blocking requests, so
    the server cannot share the test's thread."""
    started = threading.Event()
    failures: list[BaseException] = []
    handles: dict[str, Any] = {}

    async def serve() -> None:
        stop = asyncio.Event()
        async with running_server(**overrides) as srv:
            offers = tuple([await real_offer() for _ in range(OFFERS)])
            handles.update(loop=asyncio.get_running_loop(), stop=stop, api=LiveApi(srv.url, offers))
            started.set()
            await stop.wait()

    def run() -> None:
        try:
            asyncio.run(serve())
        except BaseException as exc:  # raised in the test's thread, at the start or at the end
            failures.append(exc)
        finally:
            started.set()

    thread = threading.Thread(target=run, name="api-under-fuzz", daemon=True)
    thread.start()
    started.wait(180)
    if "api" not in handles:
        raise RuntimeError("the server under fuzz did not start") from (failures[0] if failures else None)
    try:
        yield handles["api"]
    finally:
        handles["loop"].call_soon_threadsafe(handles["stop"].set)
        thread.join(60)
    if failures:
        raise failures[0]


@pytest.fixture(scope="module")
def live_api() -> Iterator[LiveApi]:
    with serve_in_a_thread(max_sessions=MAX_SESSIONS) as api:
        yield api


@pytest.fixture(scope="module")
def fuzz_log() -> FuzzLog:
    return FuzzLog()


@pytest.fixture(scope="module")
def api_schema(live_api: LiveApi, fuzz_log: FuzzLog) -> BaseSchema:
    """The schema the server serves, with the hooks that give the fuzz real offers and log what it did."""
    config = schemathesis.Config.from_dict({"checks": CHECKS})
    schema = schemathesis.openapi.from_url(f"{live_api.url}/openapi.json", config=config)
    offers = st.sampled_from(live_api.offers)

    @schema.hook("flatmap_case").apply_to(method="POST", path="/v1/sessions")
    def with_real_offers(context: HookContext, case: Case) -> st.SearchStrategy[Case]:
        # Generated text is never an offer the server can answer: with it alone every POST is a 400, and no session
        # is opened for the links to reach. Valid cases get a real offer half the time; invalid ones stay invalid.
        meta = case.meta
        if meta is None or meta.generation.mode is not GenerationMode.POSITIVE or not isinstance(case.body, dict):
            return st.just(case)

        def offering(sdp: str) -> Case:
            case.body = {**case.body, "sdp": sdp}
            return case

        return st.one_of(st.just(case), offers.map(offering))

    @schema.hook
    def after_call(context: HookContext, case: Case, response: schemathesis.Response) -> None:
        operation = case.operation
        fuzz_log.calls[f"{operation.method.upper()} {operation.path} {response.status_code}"] += 1
        if operation.method.upper() == "POST" and response.status_code == 201:
            answer = response.json()
            fuzz_log.opened[answer["session_id"]] = answer["token"]

    return schema


def documented_methods() -> dict[str, set[str]]:
    """Each path of the schema with its methods, read from the app itself (no server needed at collection), so a
    new route is fuzzed without a change here."""
    paths = create_app(Settings()).openapi()["paths"]
    return {path: {method.upper() for method in methods} for path, methods in paths.items()}


# One test per operation, parametrized here rather than by schemathesis' loader for pytest fixtures
# (schemathesis.pytest.from_fixture): that loader sets pytest's private Node._nodeid, which pytest 9.2 no longer
# has, and fails with AttributeError before it runs a case.
@pytest.mark.parametrize(
    "operation", [f"{method} {path}" for path, methods in documented_methods().items() for method in sorted(methods)]
)
def test_every_operation(api_schema: BaseSchema, live_api: LiveApi, fuzz_log: FuzzLog, operation: str) -> None:
    method, path = operation.split(" ", 1)
    target = api_schema[path][method]
    cases = st.one_of(target.as_strategy(GenerationMode.POSITIVE), target.as_strategy(GenerationMode.NEGATIVE))

    @settings(**HYPOTHESIS, max_examples=EXAMPLES_PER_OPERATION)
    @given(case=cases)
    def fuzz(case: Case) -> None:
        try:
            case.call_and_validate()
        finally:
            fuzz_log.close_sessions(live_api.url)

    fuzz()


def test_session_lifecycle_with_real_tokens(api_schema: BaseSchema, live_api: LiveApi, fuzz_log: FuzzLog) -> None:
    class Lifecycle(api_schema.as_state_machine()):  # type: ignore[misc]
        def teardown(self) -> None:
            fuzz_log.close_sessions(live_api.url)

    before = fuzz_log.calls.copy()
    Lifecycle.run(settings=settings(**HYPOTHESIS, max_examples=SCENARIOS, stateful_step_count=STEPS))
    stateful = fuzz_log.calls - before
    # The links carried real ids and tokens: each operation on a session succeeded at least once.
    session = "/v1/sessions/{session_id}"
    assert {f"GET {session} 200", f"PATCH {session} 200", f"DELETE {session} 204"} <= set(stateful), stateful


async def test_a_body_that_is_not_utf8_gets_422_like_malformed_json(live_api: LiveApi) -> None:
    """Found by the fuzz: FastAPI answered such a body with an undocumented 400."""
    async with httpx.AsyncClient(base_url=live_api.url, timeout=20) as http:
        for method, path in (("PATCH", "/v1/sessions/nope"), ("POST", "/v1/sessions")):
            body = b'{"prompt": "caf\xe9"}'  # Latin-1, not UTF-8
            response = await http.request(method, path, content=body, headers={"Content-Type": "application/json"})
            assert response.status_code == 422, response.text
            assert response.json()["detail"][0]["type"] == "json_invalid"


async def test_a_method_a_path_lacks_gets_405_naming_all_its_methods(live_api: LiveApi) -> None:
    """Found by schemathesis' coverage phase (run with its CLI; this Python API run has none): the page's static
    files answered API paths, so OPTIONS /v1/sessions got "Allow: GET, HEAD" and GET /v1/sessions a 404."""
    async with httpx.AsyncClient(base_url=live_api.url, timeout=20) as http:
        for path, documented in documented_methods().items():
            target = path.replace("{session_id}", "not-a-session")
            for method in {"GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"} - documented:
                response = await http.request(method, target)
                assert response.status_code == 405, (method, path, response.status_code)
                assert set(response.headers["Allow"].split(", ")) == documented, (method, path, response.headers)
