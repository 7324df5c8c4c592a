"""`policyc run --metrics ADDR:PORT`: Prometheus metrics, health and status over HTTP.

`MetricsServer(address)` serves, from a thread of its own (prometheus-client's threading WSGI
server):

* ``/metrics``: the Prometheus text format (families below);
* ``/health``: 503 until protection is in place (the plan bound and installed), 200 while it is,
  503 again once the run has torn down (or stopped on an error).
* ``/status``: JSON: the active plan (policy, hash, target, since when), the run's counters
  (requests, responses, records, decisions, unrecorded decisions) and the last error.

Families: ``policyc_decisions_total{policy,rule,verdict}`` (verdict allow, deny or would_deny;
rule ``(none)`` for a decision no rule won), ``policyc_events_total{reason}`` (vm_event requests
by reason: mem_access, write_ctrlreg, ...), ``policyc_events_lost_total{reason}``,
``policyc_decision_log_failures_total{reason}``, ``policyc_plan_info{policy,plan_hash,target}``,
``policyc_plan_activations_total{result}``, ``policyc_decision_seconds`` (histogram, log2 buckets
from 256 ns to 1 s) and ``policyc_paused_vcpus``. Every label value comes from the plan or from
policyc itself (rule names, kinds, reasons): nothing the guest controls, so the series are
bounded by the policy.

Cost. Nothing here runs per event. Decisions are counted where they are made (natively, in C)
and folded into `DecisionLog.stats` when that is read; only the answering loop reads it. A scrape
asks the loop for a fresh `Snapshot` and waits for it (the loop turns at least every wait
interval, 50 ms when idle); `refresh()` is called by the loop once per turn and does nothing but
test an event unless a scrape asked. When the loop does not answer in time (a long batch), the
scrape gets the previous snapshot.

Activations: the initial install counts as one (`activated(plan, "success")`); a reload (SIGHUP,
`policyc reload`, a polled bundle) reports its outcome through the module's
`record_activation(plan, result)` (`Enforcer.note_reload` calls it). With a polled `--bundle URL`
(`bundle`, set by the run), ``policyc_bundle_polls_total{result}`` counts the fetches and /status
says which bundle revision is active.
"""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping
from wsgiref.simple_server import make_server

__all__ = ["MetricsServer", "Snapshot", "parse_address", "record_activation", "take_snapshot"]

NO_RULE = "(none)"
# Decision latency buckets (seconds): the log2 buckets of decision_log.Histogram, 2^8 ns .. 2^30 ns.
_BUCKET_BITS = range(8, 31)
_SCRAPE_WAIT = 0.5

_current: "MetricsServer | None" = None


def parse_address(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT`` for IPv6; port 0 picks a free one) or a ValueError saying why."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"expected ADDR:PORT (e.g. 127.0.0.1:9464), not '{text}'")
    return host.strip("[]"), int(port)


def record_activation(plan: Mapping[str, Any] | None, result: str) -> None:
    """Count a plan activation (`result` "success" or "failure") on the running metrics server, if
    any; with a plan and success, that plan becomes the one `policyc_plan_info` names."""
    if _current is not None:
        _current.activated(plan, result)


@dataclass
class Snapshot:
    """What one scrape shows, taken on the answering loop's thread."""

    taken: float = 0.0
    decisions: dict[tuple[str, str], int] = field(default_factory=dict)    # (rule, verdict) -> n
    events: dict[str, int] = field(default_factory=dict)
    events_lost: dict[str, int] = field(default_factory=dict)
    log_failures: dict[str, int] = field(default_factory=dict)
    latency_buckets: list[int] = field(default_factory=lambda: [0] * 65)   # log2 ns buckets
    latency_sum_ns: int = 0
    latency_count: int = 0
    paused_vcpus: int = 0
    counters: dict[str, int] = field(default_factory=dict)


def take_snapshot(enforcer: Any, backend: Any = None, failures: Iterable[Mapping[str, int]] = ()) -> Snapshot:
    """The counters of an enforcer and its decision log, read on the loop's thread. `failures` are
    the other outputs' failure counts by reason (log shippers)."""
    stats = enforcer.log.stats
    decisions: Counter[tuple[str, str]] = Counter()
    by_rule = Counter()
    for name, rs in stats.rules.items():
        allow = rs.decided - rs.deny - rs.would_deny
        for verdict, n in (("allow", allow), ("deny", rs.deny), ("would_deny", rs.would_deny)):
            if n:
                decisions[(name, verdict)] += n
                by_rule[verdict] += n
    for verdict in ("allow", "deny", "would_deny"):
        rest = stats.verdicts[verdict] - by_rule[verdict]
        if rest:
            decisions[(NO_RULE, verdict)] += rest
    log_failures: Counter[str] = Counter()
    if enforcer.unlogged:
        log_failures["log_write"] += enforcer.unlogged
    for source in failures:
        log_failures.update({k: v for k, v in source.items() if v})
    paused = 0
    if backend is not None and hasattr(backend, "paused_vcpus"):
        try:
            paused = len(backend.paused_vcpus())
        except Exception:  # noqa: BLE001 - a gauge that cannot be read keeps its last value
            paused = -1
    lat = stats.latency
    counters = {**enforcer.counters(), "decisions": stats.decisions, "alerts": stats.alerts}
    return Snapshot(taken=time.time(), decisions=dict(decisions), events=dict(stats.by_kind),
                    events_lost=dict(getattr(enforcer, "events_lost", None) or {}),
                    log_failures=dict(log_failures), latency_buckets=list(lat.buckets),
                    latency_sum_ns=lat.total, latency_count=lat.count, paused_vcpus=paused, counters=counters)


class MetricsServer:
    """The `--metrics` HTTP server (see the module docstring). `start()` binds and returns the port."""

    def __init__(self, address: tuple[str, int], clock: Callable[[], float] = time.time) -> None:
        self.address = address
        self.clock = clock
        self.protected = False
        self.plan: dict[str, str] | None = None      # policy, plan_hash, target
        self.since: float | None = None
        self.activations: Counter[str] = Counter()
        self.last_error: str | None = None
        self.bundle: Any = None                      # a --bundle URL's poller (runtime/bundle_poll.py)
        self.snapshot = Snapshot()
        self._source: Callable[[], Snapshot] | None = None
        self._wanted = threading.Event()
        self._fresh = threading.Condition()
        self._server: Any = None
        self._thread: threading.Thread | None = None

    # -- life cycle
    def start(self) -> int:
        """Bind and serve from a daemon thread; returns the bound port (OSError when it cannot bind)."""
        from prometheus_client.exposition import ThreadingWSGIServer, _SilentHandler

        global _current
        self._server = make_server(self.address[0], self.address[1], self._app, ThreadingWSGIServer,
                                   handler_class=_SilentHandler)
        self._thread = threading.Thread(target=self._server.serve_forever, name="policyc-metrics", daemon=True)
        self._thread.start()
        _current = self
        return self._server.server_port

    def close(self) -> None:
        global _current
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if _current is self:
            _current = None

    # -- what the run reports (the loop's thread)
    def serve_snapshots(self, source: Callable[[], Snapshot]) -> None:
        """`source()` makes a snapshot; the loop calls `refresh()` each turn to run it when wanted."""
        self._source = source
        self._publish(source())

    def refresh(self, *, now: bool = False) -> None:
        """Once per loop turn: take a snapshot when a scrape asked for one (else only a flag test);
        `now`: take one anyway (the run's last, after teardown: what teardown released counts too)."""
        if (now or self._wanted.is_set()) and self._source is not None:
            self._wanted.clear()
            self._publish(self._source())

    def activated(self, plan: Mapping[str, Any] | None, result: str) -> None:
        self.activations[result] += 1
        if plan is not None and result == "success":
            self.plan = {"policy": str(plan["policy"]["name"]), "plan_hash": str(plan.get("content_hash", "")),
                         "target": str(plan["target"]["arch"])}
            self.since = self.clock()

    def set_protected(self, protected: bool, error: str | None = None) -> None:
        self.protected = protected
        if error:
            self.last_error = error

    # -- the HTTP side (server threads)
    def _current_snapshot(self) -> Snapshot:
        if self._source is None:
            return self.snapshot
        with self._fresh:
            before = self.snapshot
            self._wanted.set()
            self._fresh.wait_for(lambda: self.snapshot is not before, timeout=_SCRAPE_WAIT)
            return self.snapshot

    def _publish(self, snap: Snapshot) -> None:
        with self._fresh:
            self.snapshot = snap
            self._fresh.notify_all()

    def _app(self, environ: dict, start_response: Callable) -> list[bytes]:
        path = environ.get("PATH_INFO", "/")
        if path == "/metrics":
            from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

            body = generate_latest(_Registry(self, self._current_snapshot()))
            start_response("200 OK", [("Content-Type", CONTENT_TYPE_LATEST)])
            return [body]
        if path == "/health":
            ok = self.protected
            start_response("200 OK" if ok else "503 Service Unavailable", [("Content-Type", "text/plain")])
            return [b"protected\n" if ok else b"not protected\n"]
        if path == "/status":
            body = json.dumps(self.status(self._current_snapshot()), indent=2).encode() + b"\n"
            start_response("200 OK", [("Content-Type", "application/json")])
            return [body]
        start_response("404 Not Found", [("Content-Type", "text/plain")])
        return [b"not found: /metrics, /health, /status\n"]

    def status(self, snap: Snapshot) -> dict[str, Any]:
        return {"protected": self.protected, "plan": self.plan,
                "since": _iso(self.since) if self.since is not None else None,
                "counters": snap.counters, "activations": dict(self.activations),
                "decision_log_failures": snap.log_failures, "events_lost": snap.events_lost,
                "paused_vcpus": snap.paused_vcpus, "last_error": self.last_error,
                "bundle": self.bundle.status() if self.bundle is not None else None,
                "snapshot_time": _iso(snap.taken) if snap.taken else None}


class _Registry:
    """A one-scrape registry (what generate_latest reads): the families of one snapshot."""

    def __init__(self, server: MetricsServer, snap: Snapshot) -> None:
        self.server, self.snap = server, snap

    def collect(self) -> Iterable[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

        server, snap = self.server, self.snap
        policy = server.plan["policy"] if server.plan else ""
        fam = CounterMetricFamily("policyc_decisions", "Decisions by the rule whose verdict won and the verdict",
                                  labels=["policy", "rule", "verdict"])
        for (rule, verdict), n in sorted(snap.decisions.items()):
            fam.add_metric([policy, rule, verdict], n)
        yield fam
        yield _counter("policyc_events", "vm_event requests decided, by reason", snap.events)
        yield _counter("policyc_events_lost", "Events lost before they could be decided, by reason",
                       snap.events_lost)
        yield _counter("policyc_decision_log_failures", "Decisions or records that could not be written or "
                       "sent, by output and reason", snap.log_failures)
        info = GaugeMetricFamily("policyc_plan_info", "The active plan (1)", labels=["policy", "plan_hash", "target"])
        if server.plan:
            info.add_metric([server.plan["policy"], server.plan["plan_hash"], server.plan["target"]], 1)
        yield info
        acts = CounterMetricFamily("policyc_plan_activations", "Plan activations (install, reload) by result",
                                   labels=["result"])
        for result in sorted(set(server.activations) | {"success", "failure"}):
            acts.add_metric([result], server.activations[result])
        yield acts
        if server.bundle is not None:
            yield _counter("policyc_bundle_polls", "Fetches of the --bundle URL by result: new, not_modified, "
                           "unchanged, refused, unreachable", server.bundle.poll_counts(), label="result")
        cumulative, buckets = 0, []
        for b, n in enumerate(snap.latency_buckets):
            cumulative += n
            if b in _BUCKET_BITS:
                buckets.append((repr((1 << b) / 1e9), cumulative))
        buckets.append(("+Inf", snap.latency_count))
        yield HistogramMetricFamily("policyc_decision_seconds", "Time from taking a request to its decision",
                                    buckets=buckets, sum_value=snap.latency_sum_ns / 1e9)
        yield GaugeMetricFamily("policyc_paused_vcpus", "vCPUs of the guest paused now (an unanswered event or a "
                                "domain pause); -1 when it cannot be read", value=snap.paused_vcpus)


def _counter(name: str, doc: str, values: Mapping[str, int], label: str = "reason") -> Any:
    from prometheus_client.core import CounterMetricFamily

    fam = CounterMetricFamily(name, doc, labels=[label])
    for reason, n in sorted(values.items()):
        fam.add_metric([reason], n)
    return fam


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))
