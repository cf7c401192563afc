"""The coordinator's HTTP API: FastAPI on uvicorn, with an exact OpenAPI schema at /openapi.json.

    GET /healthz       {"ok": true}, or 503 {"ok": false, "problem": ...} once the broker has been
                       out of reach past broker.unhealthy_after_seconds; never behind the token
    GET /status        the service's status snapshot (`CoordinatorService.status`)
    GET /devices       every registered device: profile, plan, state, rounds taken part in, ε
    GET /rounds        every round: selected, accepted, straggled, refused by reason, bytes, ...
    GET /rounds/{n}    one round and its tasks (404 for a round that does not exist)
    GET /events        the newest registrations, rounds opened, committed and aborted, and
                       tasks refused, rejected or straggled, newest first (?limit=, at most 500)
    GET /metrics       Prometheus text (`metrics.build_registry`)
    GET /, /assets/*   the dashboard's static files (coordinator/service/dashboard/)
    GET /docs          these endpoints as a page (api_docs.py), generated from the OpenAPI schema

Reads never touch the round engine: each request runs in the server's worker threads and reads the
database through the store's own sessions (committed rows only), or calls the snapshot function it
was given, which does the same. The engine's thread holds no lock that a request could wait on.

Bound to a loopback address (the default) the API answers anyone on the machine. Bound to any
other address it will not start without a token (`ServiceSettings.http_token`); with a token every
endpoint but /healthz, /docs and the dashboard's static files (which hold no data: the page reads
the token from its URL fragment and sends it with each request) requires `Authorization: Bearer
<token>`, compared in constant time, and answers 401 with `WWW-Authenticate: Bearer` otherwise.

Whatever the address, the API answers only requests whose `Host` is a name it is reached by: the
loopback names, `http_host` and `http_allowed_hosts` (Starlette's TrustedHostMiddleware decides;
anything else gets 400 saying which key to set). A web page can point a DNS name of its own at
127.0.0.1 and read any server there (DNS rebinding), but the browser then sends that name as
Host. Every response carries a Content-Security-Policy that lets the dashboard load only its
own files and call only this API, and `X-Frame-Options: DENY` (no page may frame it).
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal

import uvicorn
from fastapi import Depends, FastAPI, HTTPException, Query, Request, Response
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field, SecretStr
from sqlalchemy import func, select
from starlette.datastructures import Headers, MutableHeaders
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.types import ASGIApp, Receive, Scope, Send

from ..config import ConfigError
from . import api_docs
from .config import HTTP_TOKEN_VARIABLE, ServiceSettings, is_loopback
from .states import RoundState, TaskState
from .store import DeviceRow, RoundRow, Store, TaskRow, UpdateRow

log = logging.getLogger("fedprune.coordinator")

DASHBOARD = Path(__file__).resolve().parent / "dashboard"
# Round numbers are INTEGER columns: anything outside is a round that cannot exist (404), and is
# never handed to the database (SQLite refuses integers past 2**63 with an OverflowError).
_ROUND_NUMBERS = range(1, 2**31)
LOOPBACK_NAMES = ("127.0.0.1", "localhost", "[::1]")
# The dashboard (dashboard/index.html) loads its script, styles and vendored chart library from
# /assets/ and reads this API with fetch; its favicon is a data: URL. Nothing else may load.
CONTENT_SECURITY_POLICY = ("default-src 'none'; script-src 'self'; style-src 'self'; "
                           "img-src 'self' data:; connect-src 'self'; form-action 'self'; "
                           "base-uri 'none'; frame-ancestors 'none'")
SECURITY_HEADERS = {"content-security-policy": CONTENT_SECURITY_POLICY,
                    "x-frame-options": "DENY", "x-content-type-options": "nosniff"}


# --- response models: the OpenAPI schema is generated from these ---------------------------------
class _View(BaseModel):
    model_config = ConfigDict(extra="ignore")


class ErrorView(_View):
    detail: str


class HealthView(_View):
    ok: bool
    problem: str | None = None  # why not ok (the broker unreachable for too long)


class BrokerView(_View):
    """The MQTT connection (edge_sdk/protocol/transport.py `broker_state`)."""
    url: str
    client_id: str
    # connecting: the first attempt; refused: the broker answered no (last_error says why);
    # retrying: no answer, or the connection was lost
    state: Literal["connecting", "connected", "refused", "retrying", "stopped"]
    since: float                       # unix time the state began
    last_error: str | None             # why not connected
    attempts: int                      # failed attempts since the last connection
    retry_in: float | None = None      # seconds until the next attempt (refused, retrying)
    reconnects: int                    # connections after the first
    # connections in a row the broker closed within seconds of accepting them: 2 or more means
    # another client is connecting with this client id (MQTT 3.1.1 tells no reason)
    short_connections: int = 0


class ProcessView(_View):
    peak_rss_bytes: int | None
    devices_registered: int


class MessagesView(_View):
    refused: int
    failed: int


class ProgressView(_View):
    """The round in progress."""
    round: int
    state: RoundState
    deadline_in: float
    selected: int
    quorum: int
    answered: dict[str, int] = Field(description="tasks per state: sent, accepted, refused, rejected")


class StatusDeviceView(_View):
    id: str
    online: bool
    width_ratio: float
    fits: bool
    epsilon: float | None
    exhausted: bool
    device_class: str | None


class StatusRoundView(_View):
    """A round as the status lists it: its number and state, then its stored summary (a committed
    round's counts; an aborted round's reason)."""
    # The summary is the engine's; keys it gains later are passed through, not dropped.
    model_config = ConfigDict(extra="allow")
    number: int
    state: RoundState
    selected: int | None = None
    accepted: int | None = None
    refused: int | None = None
    rejected: int | None = None
    missing: int | None = None
    straggled: int | None = None
    refused_by_reason: dict[str, int] | None = None
    bytes_up: int | None = None
    bytes_down: int | None = None
    artifact_bytes: int | None = None
    duplicates: int | None = None
    artifact_refusals: int | None = None
    epsilon_max: float | None = None
    personalized_accuracy: float | None = None
    global_accuracy: float | None = None
    seconds: float | None = None
    contributions: list[str] | None = None
    reason: str | None = None


class InboxView(_View):
    queued: int
    limit: int
    bytes: int
    max_bytes: int
    dropped_qos0: int
    full_waits: int   # deliveries that waited for room (the link stopped reading meanwhile)
    over_limit: int   # queued past the limits: the engine made no room in time


class HandlingView(_View):
    transient_failures: int
    dead_lettered: int


class ClusterView(_View):
    """Cluster mode ([cluster]): this process's node name and role; updates it stored itself."""
    node: str
    role: str                             # leader | follower
    leader_since: float | None            # unix time this process took the lead
    leader_epoch: int | None = None       # the fencing epoch it leads in (docs/PROTOCOL.md)
    updates_accepted: int


class StatusView(_View):
    fleet: str
    process: ProcessView
    messages: MessagesView
    rounds_committed: int
    rounds_total: int
    current: ProgressView | None
    devices: list[StatusDeviceView]
    rounds: list[StatusRoundView]
    inbox: InboxView | None = None        # the service's; absent from the engine's own status
    handling: HandlingView | None = None
    cluster: ClusterView | None = None    # cluster mode only
    broker: BrokerView | None = None      # the service's MQTT connection


class PlanView(_View):
    """The memory planner's plan for the device (edge_sdk/sizing.py `DevicePlan`)."""
    width_ratio: float
    physical_batch_size: int
    local_samples: int
    download_dtype: str
    download_keep: float
    upload_dtype: str
    upload_keep: float
    predicted_peak_bytes: int
    memory_limit_bytes: int
    download_bytes: int = Field(description="the planned size of a task's tensors (keep ratios "
                                "alone do not say it: FedP3 uploads only its layer group)")
    upload_bytes: int = Field(description="the planned size of an update's tensors")
    fits: bool
    reasons: list[str]
    decisions: dict[str, str]


DeviceState = Literal["online", "offline", "exhausted", "unfit"]
TaskOutcome = Literal["pending", "accepted", "straggled", "refused", "rejected"]


class LastTaskView(_View):
    """The device's task in the newest round it was selected for."""
    round: int
    outcome: TaskOutcome = Field(description="straggled: missing at the deadline, or its update "
                                 "came late; rejected: its update was refused for another reason")
    reason: str | None = Field(description="the refusal's code and message, or the rejection's")
    bytes_down: int
    bytes_up: int | None = Field(description="its stored update's size; null without one")
    local_accuracy: float | None = Field(description="its own model on its own test split")


class DeviceView(_View):
    device_id: str
    device_class: str = Field(description="the profile's name (a catalogue class or the device's own)")
    memory_available_bytes: int
    download_bytes_per_second: float
    upload_bytes_per_second: float
    state: DeviceState = Field(description="exhausted (refused for its privacy budget or policy, "
                               "or its ε within 0.01 of its budget) before unfit (no plan fits "
                               "its memory) before offline/online")
    plan: PlanView
    last_seen: float = Field(description="unix seconds")
    rounds_participated: int = Field(description="tasks of the device that were accepted")
    epsilon_spent: float | None
    epsilon_budget: float | None
    bytes_down: int = Field(description="its tasks over every round, as they crossed the broker")
    bytes_up: int = Field(description="its stored updates over every round, as they crossed "
                          "the broker")
    last_task: LastTaskView | None = None


class DevicesView(_View):
    devices: list[DeviceView]


class RoundView(_View):
    number: int
    state: RoundState
    started_at: float
    finished_at: float | None
    duration_seconds: float | None = Field(description="to the commit; so far for an open round")
    selected: int
    accepted: int
    straggled: int = Field(description="missing tasks and updates rejected as late")
    refused: int
    rejected: int
    missing: int
    refused_by_reason: dict[str, int] = Field(description="refused tasks per refusal code")
    bytes_up: int
    bytes_down: int
    global_accuracy: float | None
    personalized_accuracy: float | None
    epsilon_max: float | None


class RoundsView(_View):
    rounds: list[RoundView]


class TaskView(_View):
    device_id: str
    state: TaskState
    reason: str | None
    width_ratio: float
    bytes_down: int
    bytes_up: int | None = Field(description="the stored update's size; null without one")
    epsilon: float | None
    local_accuracy: float | None


class RoundDetailView(RoundView):
    tasks: list[TaskView]


EventKind = Literal["registered", "round_opened", "round_committed", "round_aborted", "refused",
                    "rejected", "straggled"]


class EventView(_View):
    at: float = Field(description="unix seconds")
    kind: EventKind
    round: int | None
    device: str | None
    text: str


class EventsView(_View):
    events: list[EventView] = Field(description="newest first")


# --- reading the store ----------------------------------------------------------------------------
# Opacus calibrates the noise of a run to spend its target ε to within this (get_noise_multiplier's
# epsilon_tolerance): a device whose budget is the target ends the run this close below it, spent.
EPSILON_TOLERANCE = 0.01


def budget_spent(epsilon: float | None, budget: float | None) -> bool:
    return epsilon is not None and budget is not None and epsilon >= budget - EPSILON_TOLERANCE


def device_state(row: DeviceRow) -> DeviceState:
    """The engine marks a device exhausted when it refuses a task for its budget; one that spent
    its budget in the run's last round is never asked again, so its ε says it."""
    if row.exhausted or budget_spent(row.epsilon, row.epsilon_budget):
        return "exhausted"
    if not row.fits:
        return "unfit"
    return "online" if row.online else "offline"


def task_outcome(state: TaskState, reason: str | None) -> TaskOutcome:
    """What a task came to, as the round counts it: missing at the deadline and rejected as late
    are both a straggler."""
    if state == TaskState.MISSING or (state == TaskState.REJECTED and reason == "late"):
        return "straggled"
    return "pending" if state == TaskState.SENT else state.value


def _last_tasks(s) -> dict[str, LastTaskView]:
    """Each device's task of the newest round it was selected for, with its update's size and
    accuracy (the update's payload is not read)."""
    newest = (select(TaskRow.device, func.max(TaskRow.round).label("round"))
              .group_by(TaskRow.device).subquery())
    rows = s.execute(
        select(TaskRow, UpdateRow.bytes, UpdateRow.local_accuracy)
        .join(newest, (TaskRow.device == newest.c.device) & (TaskRow.round == newest.c.round))
        .outerjoin(UpdateRow, (UpdateRow.round == TaskRow.round) & (UpdateRow.device == TaskRow.device)
                   & (UpdateRow.task == TaskRow.task))).all()
    return {t.device: LastTaskView(round=t.round, outcome=task_outcome(t.state, t.reason),
                                   reason=t.reason, bytes_down=t.bytes_down, bytes_up=up,
                                   local_accuracy=accuracy)
            for t, up, accuracy in rows}


def device_views(store: Store) -> list[DeviceView]:
    with store.session() as s:
        rows = list(s.scalars(select(DeviceRow).order_by(DeviceRow.index)))
        accepted = dict(s.execute(select(TaskRow.device, func.count())
                                  .where(TaskRow.state == TaskState.ACCEPTED)
                                  .group_by(TaskRow.device)).all())
        last = _last_tasks(s)
        down = dict(s.execute(select(TaskRow.device, func.sum(TaskRow.bytes_down))
                              .group_by(TaskRow.device)).all())
        up = dict(s.execute(select(UpdateRow.device, func.sum(UpdateRow.bytes))
                            .group_by(UpdateRow.device)).all())
    views = []
    for row in rows:
        profile, network = row.profile or {}, (row.profile or {}).get("network") or {}
        views.append(DeviceView(
            device_id=row.id, device_class=profile.get("name", ""),
            memory_available_bytes=profile.get("memory_available_bytes", 0),
            download_bytes_per_second=network.get("downlink_bytes_per_s", 0.0),
            upload_bytes_per_second=network.get("uplink_bytes_per_s", 0.0),
            state=device_state(row), plan=PlanView.model_validate(row.plan),
            last_seen=row.last_seen, rounds_participated=accepted.get(row.id, 0),
            epsilon_spent=row.epsilon, epsilon_budget=row.epsilon_budget,
            bytes_down=down.get(row.id) or 0, bytes_up=up.get(row.id) or 0,
            last_task=last.get(row.id)))
    return views


def _tasks_and_updates(s, number: int) -> list[tuple[TaskRow, UpdateRow | None]]:
    tasks = list(s.scalars(select(TaskRow).where(TaskRow.round == number).order_by(TaskRow.device)))
    updates = {(u.device, u.task): u for u in s.scalars(select(UpdateRow).where(UpdateRow.round == number))}
    return [(t, updates.get((t.device, t.task))) for t in tasks]


def _round_view(row: RoundRow, pairs: list[tuple[TaskRow, UpdateRow | None]] | None,
                now: float) -> RoundView:
    """A committed round from its stored summary (`pairs` unused), any other from its tasks and
    stored updates, counted as the engine's commit counts them."""
    summary = row.summary or {}
    end = row.finished_at if row.finished_at is not None else now
    common = dict(number=row.number, state=row.state, started_at=row.started_at,
                  finished_at=row.finished_at)
    if row.state == RoundState.COMMITTED and "accepted" in summary:
        return RoundView(**common, duration_seconds=summary.get("seconds", end - row.started_at),
                         **{key: summary.get(key, 0) for key in (
                             "selected", "accepted", "straggled", "refused", "rejected", "missing",
                             "bytes_up", "bytes_down")},
                         refused_by_reason=summary.get("refused_by_reason") or {},
                         **{key: summary.get(key) for key in (
                             "global_accuracy", "personalized_accuracy", "epsilon_max")})
    states = Counter(t.state for t, _ in pairs)
    updates = [u for _, u in pairs if u is not None]
    epsilons = [u.epsilon for u in updates if u.epsilon is not None]
    local = [u.local_accuracy for u in updates if u.local_accuracy is not None]
    missing = states[TaskState.MISSING]
    return RoundView(
        **common, duration_seconds=end - row.started_at, selected=len(pairs),
        accepted=states[TaskState.ACCEPTED], refused=states[TaskState.REFUSED],
        rejected=states[TaskState.REJECTED], missing=missing,
        straggled=sum(task_outcome(t.state, t.reason) == "straggled" for t, _ in pairs),
        refused_by_reason=dict(Counter((t.reason or "").split(":")[0] for t, _ in pairs
                                       if t.state == TaskState.REFUSED)),
        bytes_up=sum(u.bytes for u in updates), bytes_down=sum(t.bytes_down for t, _ in pairs),
        global_accuracy=summary.get("global_accuracy"),
        personalized_accuracy=sum(local) / len(local) if local else None,
        epsilon_max=max(epsilons) if epsilons else None)


def round_views(store: Store) -> list[RoundView]:
    now = time.time()
    with store.session() as s:
        rows = list(s.scalars(select(RoundRow).order_by(RoundRow.number)))
        return [_round_view(row, None if row.state == RoundState.COMMITTED and "accepted" in
                            (row.summary or {}) else _tasks_and_updates(s, row.number), now)
                for row in rows]


def round_detail(store: Store, number: int) -> RoundDetailView | None:
    if number not in _ROUND_NUMBERS:
        return None
    with store.session() as s:
        row = s.get(RoundRow, number)
        if row is None:
            return None
        pairs = _tasks_and_updates(s, number)
    view = _round_view(row, pairs, time.time())
    return RoundDetailView(**view.model_dump(), tasks=[TaskView(
        device_id=t.device, state=t.state, reason=t.reason, width_ratio=t.width_ratio,
        bytes_down=t.bytes_down, bytes_up=u.bytes if u else None, epsilon=u.epsilon if u else None,
        local_accuracy=u.local_accuracy if u else None) for t, u in pairs])


def _event_text(task: TaskRow, outcome: TaskOutcome) -> str:
    if outcome == "refused":
        return f"{task.device} refused its task of round {task.round}: {task.reason}"
    if outcome == "rejected":
        return f"{task.device}'s update for round {task.round} was rejected: {task.reason}"
    if task.state == TaskState.MISSING:
        return f"{task.device} had not answered round {task.round} at its deadline"
    return f"{task.device}'s update for round {task.round} came after the deadline"


def event_views(store: Store, limit: int) -> list[EventView]:
    """The newest `limit` events, read from the rows that record them (no log of its own, so a
    restarted coordinator, or another of the cluster, shows the same ones)."""
    events: list[EventView] = []
    with store.session() as s:
        for row in s.scalars(select(DeviceRow).order_by(DeviceRow.registered_at.desc()).limit(limit)):
            fit = f"width {row.width_ratio:g}" if row.fits else "no plan fits its memory"
            events.append(EventView(at=row.registered_at, kind="registered", round=None,
                                    device=row.id, text=f"{row.id} registered "
                                    f"({(row.profile or {}).get('name', 'no profile name')}): {fit}"))
        for row in s.scalars(select(RoundRow).order_by(RoundRow.number.desc()).limit(limit)):
            events.append(EventView(at=row.started_at, kind="round_opened", round=row.number,
                                    device=None, text=f"round {row.number} opened: "
                                    f"{len(row.selected)} devices selected, quorum {row.quorum}"))
            if row.state == RoundState.COMMITTED:
                summary = row.summary or {}
                lost = ", ".join(f"{summary[key]} {key}" for key in ("straggled", "refused", "rejected")
                                 if summary.get(key))
                events.append(EventView(
                    at=row.finished_at, kind="round_committed", round=row.number, device=None,
                    text=f"round {row.number} committed: {summary.get('accepted', '?')} of "
                         f"{summary.get('selected', len(row.selected))} accepted"
                         + (f" ({lost})" if lost else "")))
            elif row.state == RoundState.ABORTED:
                events.append(EventView(at=row.finished_at, kind="round_aborted", round=row.number,
                                        device=None, text=f"round {row.number} aborted: "
                                        f"{(row.summary or {}).get('reason', 'no reason stored')}"))
        answered = (select(TaskRow, RoundRow.finished_at).join(RoundRow, RoundRow.number == TaskRow.round)
                    .where(TaskRow.state.in_([TaskState.REFUSED, TaskState.REJECTED, TaskState.MISSING]))
                    .order_by(TaskRow.round.desc()).limit(limit))
        for task, finished_at in s.execute(answered).all():
            outcome = task_outcome(task.state, task.reason)
            events.append(EventView(at=task.answered_at or finished_at or task.sent_at, kind=outcome,
                                    round=task.round, device=task.device,
                                    text=_event_text(task, outcome)))
    events.sort(key=lambda event: event.at, reverse=True)
    return events[:limit]


# --- what every request and response passes through ------------------------------------------------
def _host_name(host: str) -> str:
    """`host` as a Host header names it: lower case, an IPv6 address in brackets."""
    host = host.strip().lower()
    try:
        return f"[{host.strip('[]')}]" if ipaddress.ip_address(host.strip("[]")).version == 6 else host
    except ValueError:
        return host


def allowed_hosts(config: ServiceSettings) -> list[str]:
    """The Host names the API answers to: the loopback ones, `http_host` unless it is a wildcard
    address (0.0.0.0, ::), and `http_allowed_hosts`."""
    names = [*LOOPBACK_NAMES, *config.http_allowed_hosts]
    if config.http_host.strip("[] ") not in ("", "0.0.0.0", "::"):
        names.append(config.http_host)
    return list(dict.fromkeys(_host_name(name) for name in names))


class HostCheck:
    """Starlette's TrustedHostMiddleware decides whether a request's Host is allowed; a refusal
    is answered here, as JSON like every other error, saying what to set (its own answer is a
    bare "Invalid host header")."""

    def __init__(self, app: ASGIApp, allowed: list[str]):
        self.app, self.allowed = app, allowed
        self.check = TrustedHostMiddleware(self._passed, allowed, www_redirect=False)

    @staticmethod
    async def _passed(scope: Scope, receive: Receive, send: Send) -> None:
        scope["fedprune.host_allowed"] = True

    @staticmethod
    async def _discard(message) -> None:
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        await self.check(scope, receive, self._discard)
        if scope.pop("fedprune.host_allowed", False):
            await self.app(scope, receive, send)
            return
        host = Headers(scope=scope).get("host", "")
        await JSONResponse({"detail": (
            f"this API does not answer to the Host {host[:100]!r}: it answers to "
            f"{', '.join(self.allowed)}. Reach it by one of those names, or add the name to "
            "http_allowed_hosts in coordinator.toml")}, status_code=400)(scope, receive, send)


class SecurityHeaders:
    """SECURITY_HEADERS on every response, refusals and static files included (two fixed
    headers: not worth a dependency)."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for name, value in SECURITY_HEADERS.items():
                    headers[name] = value
            await send(message)

        await self.app(scope, receive, send_with_headers)


# --- the application ------------------------------------------------------------------------------
def build_app(store: Store, config: ServiceSettings,
              snapshot: Callable[[], Mapping[str, Any]], *,
              health: Callable[[], str | None] = lambda: None,
              dashboard: Path = DASHBOARD) -> FastAPI:
    """The API over `store`, with `snapshot` (the service's status) behind /status and /metrics;
    `config.http_token`, when set, guards every endpoint but /healthz and the static files.
    `health`: why the service is unhealthy (/healthz answers 503 saying so), None when healthy;
    it reads no database, so a probe stays cheap."""
    guarded: dict[str, Any] = {"dependencies": [], "responses": {}}
    if config.http_token is not None:  # the schema declares the token only where it is required
        secret = config.http_token.get_secret_value().encode()
        bearer = HTTPBearer(auto_error=False, description=f"coordinator.toml http_token (or "
                            f"{HTTP_TOKEN_VARIABLE})")

        def authorized(credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
            given = credentials.credentials.encode() if credentials is not None else b""
            if not hmac.compare_digest(given, secret):
                raise HTTPException(401, "a bearer token is required (Authorization: Bearer "
                                    "<token>)", headers={"WWW-Authenticate": "Bearer"})

        guarded = {"dependencies": [Depends(authorized)],
                   "responses": {401: {"model": ErrorView, "description": "no or a wrong token"}}}
    app = FastAPI(title="fedprune coordinator", version="1",
                  description=__doc__.split("\n\n")[0], openapi_url=None, docs_url=None,
                  redoc_url=None)

    @app.get("/openapi.json", include_in_schema=False, dependencies=guarded["dependencies"])
    def openapi() -> JSONResponse:
        return JSONResponse(app.openapi())

    @app.get("/healthz", response_model=HealthView, summary="liveness, without a token",
             response_model_exclude_none=True, responses={503: {"model": HealthView, "description": "unhealthy, and why"}})
    def healthz() -> Any:
        problem = health()
        if problem is None:
            return HealthView(ok=True)
        return JSONResponse(HealthView(ok=False, problem=problem).model_dump(), status_code=503)

    @app.get("/status", response_model=StatusView, summary="the service's status snapshot", **guarded)
    def status() -> StatusView:
        return StatusView.model_validate(snapshot())

    @app.get("/devices", response_model=DevicesView, summary="registered devices", **guarded)
    def devices() -> DevicesView:
        return DevicesView(devices=device_views(store))

    @app.get("/rounds", response_model=RoundsView, summary="every round, oldest first", **guarded)
    def rounds() -> RoundsView:
        return RoundsView(rounds=round_views(store))

    @app.get("/rounds/{number}", response_model=RoundDetailView, summary="one round and its tasks",
             dependencies=guarded["dependencies"],
             responses={**guarded["responses"],
                        404: {"model": ErrorView, "description": "no such round"}})
    def round_(number: int) -> RoundDetailView:
        view = round_detail(store, number)
        if view is None:
            raise HTTPException(404, f"round {number} does not exist")
        return view

    @app.get("/events", response_model=EventsView, summary="recent events, newest first",
             dependencies=guarded["dependencies"],
             responses={**guarded["responses"],
                        400: {"model": ErrorView, "description": "a query parameter it does not take"}})
    def events(request: Request, limit: int = Query(50, ge=1, le=500)) -> EventsView:
        unknown = sorted(set(request.query_params) - {"limit"})
        if unknown:  # a misspelt ?limt= would otherwise be ignored without a word
            raise HTTPException(400, f"unknown query parameter {unknown[0][:40]!r}: /events takes "
                                "limit (1 to 500)")
        return EventsView(events=event_views(store, limit))

    registry = []  # built on the first scrape, once

    @app.get("/metrics", response_class=Response, summary="Prometheus metrics",
             dependencies=guarded["dependencies"],
             responses={**guarded["responses"],
                        200: {"content": {"text/plain": {"schema": {"type": "string"}}},
                              "description": "Prometheus text exposition format"}})
    def metrics() -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        from .metrics import build_registry

        if not registry:
            registry.append(build_registry(store, config, snapshot))
        return Response(generate_latest(registry[0]), media_type=CONTENT_TYPE_LATEST)

    @app.get("/", include_in_schema=False)
    def index() -> FileResponse:
        page = dashboard / "index.html"
        if not page.is_file():
            raise HTTPException(404, f"no dashboard in {dashboard}")
        return FileResponse(page)

    @app.get("/docs", include_in_schema=False, response_class=HTMLResponse)
    def docs() -> HTMLResponse:
        # The schema says what the dashboard's own source already tells anyone: no data, no token.
        return HTMLResponse(api_docs.render(app.openapi()))

    app.mount("/assets", StaticFiles(directory=dashboard, check_dir=False), name="assets")
    app.add_middleware(HostCheck, allowed=allowed_hosts(config))
    app.add_middleware(SecurityHeaders)  # added last: outermost, so refusals carry them too
    return app


# --- the server -----------------------------------------------------------------------------------
class ApiServer:
    """uvicorn serving `app` from its own thread on (host, port); port 0 takes a free one, which
    `port` then tells. A host that is not loopback is refused without a token."""

    def __init__(self, app: FastAPI, host: str, port: int, token: SecretStr | str | None = None):
        if not is_loopback(host) and not token:
            raise ConfigError(f"the HTTP API will not listen on {host!r} (not a loopback address) "
                              f"without a token: set http_token or {HTTP_TOKEN_VARIABLE}")
        self.app, self.host, self.requested_port = app, host, port
        self.server: uvicorn.Server | None = None
        self.thread: threading.Thread | None = None
        self.socket: socket.socket | None = None

    def start(self, timeout: float = 10.0) -> ApiServer:
        self.socket = self._bind()
        self._port = self.socket.getsockname()[1]
        config = uvicorn.Config(self.app, log_config=None, access_log=False, lifespan="off",
                                timeout_graceful_shutdown=2)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.socket]},
                                       name="http-api", daemon=True)
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the HTTP API did not start on {self.host}:{self.requested_port}")
            time.sleep(0.01)
        log.info("HTTP API on %s", self.url)
        return self

    def _bind(self) -> socket.socket:
        try:
            family, kind, proto, _, address = socket.getaddrinfo(
                self.host.strip("[]"), self.requested_port, type=socket.SOCK_STREAM)[0]
            sock = socket.socket(family, kind, proto)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(address)
        except OSError as exc:
            raise ConfigError(f"the HTTP API cannot listen on {self.host}:{self.requested_port} "
                              f"({exc}); change http_host or http_port") from None
        return sock

    @property
    def port(self) -> int:
        """The port listened on (the one the OS picked for port 0)."""
        return self._port

    @property
    def url(self) -> str:
        """The base URL to reach the API from this machine."""
        host = self.host.strip("[]")
        if host in ("0.0.0.0", ""):
            host = "127.0.0.1"
        elif host == "::":
            host = "::1"
        return f"http://{f'[{host}]' if ':' in host else host}:{self.port}"

    def stop(self) -> None:
        if self.server is not None:
            self.server.should_exit = True
        if self.thread is not None:
            self.thread.join(timeout=5)
        if self.socket is not None:
            self.socket.close()
        self.server = self.thread = self.socket = None
