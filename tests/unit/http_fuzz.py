"""What the HTTP API fuzz tests share: an aiohttp app served by a process of its own (so that
the fuzzing client's generation never blocks its loop, and a crash is seen as one), raw
requests over loopback, a health prober running beside the fuzz, and the figures per
endpoint.

TK_FUZZ_EXAMPLES (cases per endpoint) and TK_FUZZ_SEED ("random" for a new one, printed)
set the size: `make test` runs a fixed seed at a bounded size, `make reliability` a random
seed at the full size.
"""

from __future__ import annotations

import asyncio
import contextlib
import faulthandler
import http.client
import logging
import multiprocessing
import os
import random
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.sharedctypes import Synchronized
from multiprocessing.synchronize import Event
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from bench.common import Table
from hypothesis import HealthCheck, settings

from tracekeeper_agent.service.http_api import ListenerLimits, start_listener

EXAMPLES = int(os.environ.get("TK_FUZZ_EXAMPLES", "60"))
"""Cases per endpoint."""
FIXED_SEED = 20261203
_seed = os.environ.get("TK_FUZZ_SEED", str(FIXED_SEED))
SEED = int(_seed) if _seed != "random" else random.randrange(2**32)

HEALTH_BOUND = 10.0
"""Seconds a health request may take before it counts as unanswered. Generous on purpose:
the figure (max, p99) is recorded, the goal (100 ms) is reported, not asserted."""
HEALTH_GOAL = 0.100
HEALTH_INTERVAL = 0.005
REQUEST_TIMEOUT = 30.0
FORK = multiprocessing.get_context("fork")
"""The served app and the prober are forked: built from this process's objects (fakes,
closures), measured apart from its GIL."""


def fuzz_settings(examples: int = EXAMPLES) -> settings:
    return settings(
        max_examples=examples,
        deadline=None,
        database=None,  # the seed alone decides the cases: CI repeats the same ones
        suppress_health_check=[
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
            HealthCheck.large_base_example,
            HealthCheck.function_scoped_fixture,
        ],
    )


# --- requests -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Request:
    endpoint: str
    """The route it is aimed at, as the figures name it ("PUT /v1/state")."""
    kind: str
    """What was generated ("valid", "near-valid", "malformed JSON", ...)."""
    method: str
    target: str
    """Path and query string, as sent (and signed)."""
    headers: tuple[tuple[str, str | bytes], ...] = ()
    body: bytes = b""

    def describe(self) -> str:
        body = self.body[:300]
        more = f" (+{len(self.body) - 300} bytes)" if len(self.body) > 300 else ""
        shown = [(k, v if isinstance(v, str) else v.decode("latin-1")) for k, v in self.headers]
        return f"{self.kind}: {self.method} {self.target[:300]} headers={shown} body={body!r}{more}"


@dataclass(frozen=True)
class Answer:
    status: int
    """0: no answer (the connection failed or closed before a status line)."""
    headers: Mapping[str, str]
    body: bytes
    error: str = ""
    streamed: bool = False
    """An NDJSON stream: its head was read, then the connection closed."""


STREAM_TYPES = ("application/x-ndjson",)


def send(port: int, request: Request, timeout: float = REQUEST_TIMEOUT) -> Answer:
    """One request on a fresh connection. A server that answers before the whole body is in
    (401, 413) and closes may reset the upload: the answer is still read."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.putrequest(request.method, request.target, skip_accept_encoding=True)
        for name, value in request.headers:
            conn.putheader(name, value)
        if request.body or request.method in ("PUT", "POST", "PATCH"):
            conn.putheader("Content-Length", str(len(request.body)))
        conn.endheaders()
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            conn.send(request.body)
        resp = conn.getresponse()
        headers = {k.lower(): v for k, v in resp.getheaders()}
        if headers.get("content-type", "").startswith(STREAM_TYPES) and resp.status == 200:
            return Answer(resp.status, headers, b"", streamed=True)
        return Answer(resp.status, headers, resp.read())
    except (OSError, http.client.HTTPException) as exc:
        return Answer(0, {}, b"", error=repr(exc))
    finally:
        conn.close()


# --- the served app -------------------------------------------------------------------------


class ErrorLog(logging.Handler):
    """ERROR records of any logger while installed: aiohttp logs a handler's unhandled
    exception ("Error handling request") there before answering 500. Not counted: the
    request lines and heads aiohttp's parser refuses (answered 400), which it logs the same
    way (with a traceback, at ERROR)."""

    def __init__(self) -> None:
        super().__init__(level=logging.ERROR)
        self.records: list[str] = []
        self.bad_requests = 0

    def emit(self, record: logging.LogRecord) -> None:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError) and 400 <= (exc.code or 0) < 500:
            self.bad_requests += 1
            return
        self.records.append(f"{record.name}: {record.getMessage()} {exc!r}")


Inspect = Callable[[], dict[str, Any]]
AppFactory = Callable[[], Awaitable[tuple[web.Application, Callable[[], Awaitable[None]], Inspect]]]
"""Builds the app on the serving loop; returns it, what closes its parts, and what reads
their state (run on the loop between requests, its answer pickled back)."""


Serving = tuple[int, Callable[[], Awaitable[None]], Callable[[], int]]
"""The port, what stops serving, and how many connections are open."""
Serve = Callable[[web.Application], Awaitable[Serving]]
"""Serves the app on a loopback port."""


def listener_of(limits: ListenerLimits) -> Serve:
    """The agent's way: start_listener with `limits`."""

    async def serve(app: web.Application) -> Serving:
        listener = await start_listener(app, "127.0.0.1", 0, limits)
        return listener.port, listener.close, lambda: listener.open_connections

    return serve


def _serve(build: AppFactory, serve: Serve, control: Connection) -> None:
    """The child process: serve until told to stop, answering "inspect" on `control`."""
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    loop_errors: list[str] = []
    errors = ErrorLog()
    logging.getLogger().addHandler(errors)
    loop.set_exception_handler(
        lambda _, ctx: loop_errors.append(str(ctx.get("exception") or ctx.get("message")))
    )
    app, close_parts, inspect = loop.run_until_complete(build())
    port, stop_serving, connections = loop.run_until_complete(serve(app))

    def command() -> None:
        what = control.recv()
        if what == "stop":
            # Where it hangs, if stopping takes long (printed to stderr).
            faulthandler.dump_traceback_later(20, exit=False)
            loop.stop()
            return
        state = inspect()
        state["errors"] = [*errors.records, *(f"event loop: {e}" for e in loop_errors)]
        state["bad requests logged"] = errors.bad_requests
        state["open connections"] = connections()
        errors.records.clear()
        loop_errors.clear()
        control.send(state)

    loop.add_reader(control.fileno(), command)
    control.send(port)
    loop.run_forever()
    loop.remove_reader(control.fileno())
    loop.run_until_complete(stop_serving())
    loop.run_until_complete(close_parts())
    loop.close()
    control.send("stopped")


class ServedApp:
    """An app served on a loopback port by a process of its own (forked: the app is built
    there, with the fakes), as the product serves it (`serve`: the agent's start_listener,
    the output API's runner). A crash, even of the interpreter, ends only the child:
    `alive()` says so."""

    def __init__(self, build: AppFactory, serve: Serve) -> None:
        self._control, child = FORK.Pipe()
        self._process = FORK.Process(
            target=_serve, args=(build, serve, child), name="fuzzed-app", daemon=True
        )
        self.port = 0

    def start(self) -> None:
        self._process.start()
        assert self._control.poll(30), "the app did not start"
        self.port = self._control.recv()

    def alive(self) -> bool:
        return self._process.is_alive()

    def inspect(self) -> dict[str, Any]:
        """The app's inspect() and the errors logged since the last call."""
        assert self.alive(), f"the app's process ended ({self._process.exitcode})"
        self._control.send("inspect")
        assert self._control.poll(REQUEST_TIMEOUT), "the app does not answer"
        state: dict[str, Any] = self._control.recv()
        return state

    def settles(self, at_most: int, within: float = REQUEST_TIMEOUT) -> int:
        """Open connections once they are `at_most` (the clients left; bounded wait, not a
        timing): a connection that outlives its client, as a stream that never saw it go
        would, keeps this above."""
        deadline = time.monotonic() + within
        while (n := int(self.inspect()["open connections"])) > at_most:
            if time.monotonic() > deadline:
                break
            time.sleep(0.05)
        return n

    def stop(self) -> int | None:
        """Stop the app (its parts closed); its exit code."""
        if self._process.is_alive():
            self._control.send("stop")
            if self._control.poll(60):
                self._control.recv()
        self._process.join(60)
        if self._process.is_alive():
            self._process.kill()
            self._process.join()
        return self._process.exitcode


# --- health while the fuzz runs -------------------------------------------------------------


def _probe_health(
    port: int,
    path: str,
    endpoint: Synchronized[int],
    failed: Synchronized[int],
    stop: Event,
    out: Connection,
) -> None:
    """The prober's process: GET `path` until `stop`; then send what it measured."""
    latencies: list[tuple[int, float]] = []
    unanswered: list[tuple[int, str]] = []
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=HEALTH_BOUND)
    while not stop.is_set():
        booked = endpoint.value
        started = time.monotonic()
        try:
            conn.request("GET", path)
            resp = conn.getresponse()
            resp.read()
        except (OSError, http.client.HTTPException) as exc:
            unanswered.append((booked, repr(exc)))
            failed.value += 1
            conn.close()
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=HEALTH_BOUND)
            continue
        latencies.append((booked, time.monotonic() - started))
        if resp.status != 200:
            unanswered.append((booked, f"{path} answered {resp.status}"))
            failed.value += 1
        stop.wait(HEALTH_INTERVAL)
    conn.close()
    out.send((latencies, unanswered))


class HealthProber:
    """GETs `path` over one keep-alive connection every few milliseconds while the fuzz
    runs, from a process of its own (the fuzzing client's generation never delays it), each
    latency booked to the endpoint being fuzzed when it was sent."""

    def __init__(self, port: int, path: str = "/healthz") -> None:
        self._endpoints: list[str] = ["(idle)"]
        self._endpoint = FORK.Value("i", 0)
        self._failed = FORK.Value("i", 0)
        self._stop = FORK.Event()
        self._results, child = FORK.Pipe(duplex=False)
        self._process = FORK.Process(
            target=_probe_health,
            args=(port, path, self._endpoint, self._failed, self._stop, child),
            name="health-prober",
            daemon=True,
        )
        self.latencies: dict[str, list[float]] = {}
        self.unanswered: list[str] = []

    def start(self) -> None:
        self._process.start()

    @property
    def failures(self) -> int:
        """Health requests not answered (or not 200) so far."""
        return int(self._failed.value)

    def stop(self) -> None:
        """Stop probing and collect the figures."""
        self._stop.set()
        assert self._results.poll(HEALTH_BOUND + 10), "the health prober did not finish"
        latencies, unanswered = self._results.recv()
        self._process.join(10)
        for booked, latency in latencies:
            self.latencies.setdefault(self._endpoints[booked], []).append(latency)
        self.unanswered = [f"{self._endpoints[b]}: {why}" for b, why in unanswered]

    @contextlib.contextmanager
    def booked_to(self, key: str) -> Iterator[None]:
        """Book the latencies measured meanwhile to `key`: an endpoint, or an endpoint and
        the kind of request in flight ("PUT /v1/state|huge; signed")."""
        if key not in self._endpoints:
            self._endpoints.append(key)
        previous = self._endpoint.value
        self._endpoint.value = self._endpoints.index(key)
        try:
            yield
        finally:
            self._endpoint.value = previous

    def of(self, endpoint: str) -> dict[str, list[float]]:
        """The latencies booked to `endpoint` and to its kinds of request, by key."""
        return {k: v for k, v in self.latencies.items() if k.split("|", 1)[0] == endpoint and v}


# --- figures ---------------------------------------------------------------------------------


@dataclass
class EndpointFigures:
    cases: int = 0
    failures: list[str] = field(default_factory=list)
    statuses: dict[int, int] = field(default_factory=dict)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


@dataclass
class Figures:
    title: str
    by_endpoint: dict[str, EndpointFigures] = field(default_factory=dict)

    def of(self, endpoint: str) -> EndpointFigures:
        return self.by_endpoint.setdefault(endpoint, EndpointFigures())

    def table(self, prober: HealthProber) -> Table:
        table = Table(
            f"{self.title} (seed {SEED})",
            ["endpoint", "cases", "failures", "statuses", "health n", "max ms", "p99 ms"],
        )
        latencies: list[float] = []
        worst_of: list[tuple[float, str]] = []
        for endpoint, figures in self.by_endpoint.items():
            booked = prober.of(endpoint)
            seen = [x for v in booked.values() for x in v]
            latencies += seen
            worst_of += [(max(v), k) for k, v in booked.items()]
            statuses = " ".join(f"{s}:{n}" for s, n in sorted(figures.statuses.items()))
            table.add(
                endpoint,
                figures.cases,
                len(figures.failures),
                statuses,
                len(seen),
                f"{max(seen) * 1000:.1f}" if seen else "-",
                f"{percentile(seen, 0.99) * 1000:.1f}" if seen else "-",
            )
        cases = sum(f.cases for f in self.by_endpoint.values())
        failures = sum(len(f.failures) for f in self.by_endpoint.values())
        worst = max(latencies, default=0.0)
        table.add(
            "all",
            cases,
            failures,
            "",
            len(latencies),
            f"{worst * 1000:.1f}",
            f"{percentile(latencies, 0.99) * 1000:.1f}" if latencies else "-",
        )
        met = "met" if latencies and worst <= HEALTH_GOAL else "NOT met"
        table.notes.append(
            f"health answered within {HEALTH_BOUND:.0f} s every time: "
            f"{'yes' if not prober.unanswered else 'NO: ' + '; '.join(prober.unanswered[:3])}; "
            f"goal max <= {HEALTH_GOAL * 1000:.0f} ms: {met}"
        )
        for latency, key in sorted(worst_of, reverse=True)[:3]:
            during = key.replace("|", " while sending ", 1) if "|" in key else f"{key}, between"
            table.notes.append(f"slowest health answers: {latency * 1000:.1f} ms during {during}")
        table.notes.append("statuses: HTTP status:count; 0 = no answer (upload reset)")
        return table
