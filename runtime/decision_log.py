"""The decision log, the alert stream, counters and latency histograms.

`DecisionLog(log, alerts, plan_hash)` writes JSON Lines: one record per
decision (`runtime.decide.Decision`) to `log`, and one record per alert
message to `alerts` as well. Each argument is a path (opened for appending) or
an open text file.

A record: ``decision_id``, ``time`` (UTC, ISO 8601, microseconds),
``plan_hash``, ``kind`` (the dispatch table), ``vcpu``, ``rule`` (the rule
whose verdict won) and ``rules`` (every match, strongest first), ``verdict``
(what the policy decided), ``would_deny`` (audit mode), ``response`` (the plan
response used) and ``response_flags`` (names), ``collateral``,
``conservative``, ``event`` (the request's fields; numbers that can be
addresses as hex strings), ``messages`` (rendered log/alert templates),
``effects``, ``errors``, ``limited``, ``note`` and ``latency_ns``. Keys with
nothing to say (empty lists, false flags, null) are left out, except the
fixed ones.

Guest-controlled values. Numbers from the request are formatted as the
template says (``{gla:#x}``); any other value (strings or bytes read from the
guest) is escaped before it goes into a message: backslash, every control
character (C0, DEL, C1) and the Unicode line and paragraph separators become
``\\xNN`` / ``\\uNNNN``, so a value such as ``\\n{"verdict":"allow"}`` stays
inside its record's one line and cannot pass for a record of its own (JSON
encoding escapes them once more in the file; the rendered message is safe to
print too).

Durability. `write(decisions)` writes a batch and flushes it (and fsyncs with
``fsync=True``). The enforcer writes the batch *before* it pushes the batch's
responses, so a crash never loses a decision that was answered.

Statistics. Per rule: matches, denies, would-denies, limited, errors, messages;
overall: decisions by kind and verdict, collateral, conservative claims,
errors; latency histograms with log2 buckets in ns (overall and per rule).
`summary()` is the table printed at exit; `Progress` keeps one live line on a
terminal (``\\r`` updates, only when the stream is a TTY).
"""

from __future__ import annotations

import datetime as _dt
import functools
import io
import json
import os
import string
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Callable, Iterable, Mapping, TextIO

from .decide import Decision
from .vm_event_layout import flag_names

__all__ = ["DecisionLog", "Histogram", "Progress", "Stats", "escape_guest", "render_template"]

# Event fields that are small numbers, kept as JSON integers; every other integer field is
# written as a hex string (addresses, register values, MSR values exceed 2^53).
_DECIMAL_FIELDS = frozenset({"vcpu", "access", "insn_length", "is_write", "descriptor", "gla_valid", "in_gpt",
                             "register"})


# --------------------------------------------------------------------------- escaping and templates

def _escape_table() -> dict[int, str]:
    table = {c: f"\\x{c:02x}" for c in range(0x20)}
    table[0x7F] = "\\x7f"
    table.update({c: f"\\x{c:02x}" for c in range(0x80, 0xA0)})
    table[0x5C] = "\\\\"
    for c in (0x2028, 0x2029, 0x200E, 0x200F, 0x202A, 0x202B, 0x202C, 0x202D, 0x202E, 0x2066, 0x2067,
              0x2068, 0x2069, 0xFEFF):
        table[c] = f"\\u{c:04x}"      # line separators and bidi controls: no reordering of a line
    return table


_ESCAPES = _escape_table()
_CONTROLS = {c: e for c, e in _ESCAPES.items() if c != 0x5C}   # for whole messages: no double escaping


def escape_guest(value: Any) -> str:
    """A guest-controlled value as one safe line of text (see the module docstring)."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return "".join(chr(b) if 0x20 <= b < 0x7F and b != 0x5C else ("\\\\" if b == 0x5C else f"\\x{b:02x}")
                       for b in bytes(value))
    return str(value).translate(_ESCAPES)


@functools.lru_cache(maxsize=1024)
def _parse_template(template: str) -> tuple[tuple[str, str | None, str, str | None], ...]:
    try:
        return tuple((lit, name, spec or "", conv) for lit, name, spec, conv in string.Formatter().parse(template))
    except ValueError:
        return ((template, None, "", None),)


def render_template(template: str, event: Mapping[str, Any]) -> str:
    """Fill `{field}` / `{field:#x}` from the event. Integers take the format spec; anything else
    is guest data and is escaped. A missing field renders as `<field?>`; the result is one line."""
    out = []
    for literal, name, spec, _conv in _parse_template(template):
        if literal:
            out.append(literal)
        if name is None:
            continue
        try:
            value = event[name]
        except (KeyError, TypeError):
            out.append(f"<{escape_guest(name)}?>")
            continue
        if isinstance(value, bool):
            value = int(value)
        if isinstance(value, int):
            try:
                out.append(format(value, spec))
            except (ValueError, TypeError):
                out.append(hex(value))
        else:
            out.append(escape_guest(value))
    return "".join(out).translate(_CONTROLS)


# --------------------------------------------------------------------------- statistics

class Histogram:
    """Latencies in log2 buckets: bucket b counts values v with v.bit_length() == b (v in [2^(b-1), 2^b))."""

    __slots__ = ("buckets", "count", "total", "max")

    def __init__(self) -> None:
        self.buckets = [0] * 65
        self.count = 0
        self.total = 0
        self.max = 0

    def add(self, ns: int) -> None:
        ns = max(0, int(ns))
        self.buckets[min(ns.bit_length(), 64)] += 1
        self.count += 1
        self.total += ns
        if ns > self.max:
            self.max = ns

    def percentile(self, p: float) -> int:
        """An upper bound of the p-th percentile (the top of its bucket), in ns; 0 when empty."""
        if not self.count:
            return 0
        rank = max(1, int(p / 100.0 * self.count + 0.999999))
        seen = 0
        for b, n in enumerate(self.buckets):
            seen += n
            if seen >= rank:
                return (1 << b) - 1 if b else 0
        return self.max

    def mean(self) -> float:
        return self.total / self.count if self.count else 0.0


@dataclass
class RuleStats:
    matches: int = 0
    decided: int = 0          # times its verdict won
    deny: int = 0
    would_deny: int = 0
    limited: int = 0
    errors: int = 0
    alerts: int = 0
    logs: int = 0
    latency: Histogram = field(default_factory=Histogram)


class Stats:
    """Counters over every decision seen."""

    def __init__(self) -> None:
        self.decisions = 0
        self.by_kind: Counter[str] = Counter()
        self.verdicts: Counter[str] = Counter()     # allow / deny / would_deny
        self.collateral = 0
        self.conservative = 0
        self.errors = 0
        self.unmatched = 0
        self.alerts = 0
        self.rules: dict[str, RuleStats] = {}
        self.latency = Histogram()
        self.events: Counter[str] = Counter()      # records that are not decisions (rebind, ...)
        self.started = time.monotonic()

    def add(self, d: Decision) -> None:
        self.decisions += 1
        self.by_kind[d.kind] += 1
        if d.would_deny:
            self.verdicts["would_deny"] += 1
        elif d.verdict == "deny":
            self.verdicts["deny"] += 1
        else:
            self.verdicts["allow"] += 1
        if d.collateral:
            self.collateral += 1
        if d.conservative:
            self.conservative += 1
        if d.errors:
            self.errors += 1
        if not d.rules and not d.collateral:
            self.unmatched += 1
        self.latency.add(d.latency_ns)
        rules = self.rules
        for name in d.rules:
            rs = rules.get(name)
            if rs is None:
                rs = rules[name] = RuleStats()
            rs.matches += 1
            rs.latency.add(d.latency_ns)
        if d.rule is not None and d.rules:
            rs = rules[d.rule]
            rs.decided += 1
            if d.would_deny:
                rs.would_deny += 1
            elif d.verdict == "deny":
                rs.deny += 1
        for name in d.limited:
            rules[name].limited += 1
        for m in d.messages:
            rs = rules.get(m.rule)
            if rs is None:
                rs = rules[m.rule] = RuleStats()
            if m.kind == "alert":
                rs.alerts += 1
                self.alerts += 1
            else:
                rs.logs += 1
        for err in d.errors:
            if err.startswith("rule "):
                name = err[5:].split(":", 1)[0]
                rs = rules.get(name)
                if rs is None:
                    rs = rules[name] = RuleStats()
                rs.errors += 1

    def rate(self) -> float:
        elapsed = time.monotonic() - self.started
        return self.decisions / elapsed if elapsed > 0 else 0.0


def _us(ns: int) -> str:
    if ns < 1000:
        return f"{ns}ns"
    if ns < 1_000_000:
        return f"{ns / 1000:.1f}µs"
    return f"{ns / 1e6:.1f}ms"


# --------------------------------------------------------------------------- the log

def _open(target: str | os.PathLike | IO[str] | None) -> tuple[TextIO | None, bool]:
    if target is None:
        return None, False
    if isinstance(target, (str, os.PathLike)):
        path = Path(target)
        path.parent.mkdir(parents=True, exist_ok=True)
        return open(path, "a", encoding="utf-8", buffering=1 << 16), True
    return target, False  # type: ignore[return-value]


class DecisionLog:
    """JSON Lines decision log plus alert stream (see the module docstring)."""

    def __init__(self, log: str | os.PathLike | IO[str] | None, alerts: str | os.PathLike | IO[str] | None = None,
                 plan_hash: str = "", *, fsync: bool = False) -> None:
        self._log, self._own_log = _open(log)
        self._alerts, self._own_alerts = _open(alerts)
        self.plan_hash = plan_hash
        self.fsync = fsync
        self._stats = Stats()
        self._folds: list[Callable[[Stats], None]] = []
        self._close_after: list[Any] = []
        self.closed = False

    @property
    def stats(self) -> "Stats":
        """Counters over every decision written (native engines' counts folded in first)."""
        for fold in self._folds:
            fold(self._stats)
        return self._stats

    def add_counter_source(self, fold: Callable[[Stats], None]) -> None:
        """`fold(stats)` adds decisions counted elsewhere (the native engine) whenever stats are read."""
        self._folds.append(fold)

    def retire_counter_source(self, fold: Callable[[Stats], None]) -> None:
        """Fold what `fold` counted one last time, then stop asking it (a native engine a reload
        replaced: kept here, it kept its whole plan alive)."""
        if fold in self._folds:
            fold(self._stats)
            self._folds.remove(fold)

    def close_after(self, follower: Any) -> None:
        """`follower.close()` once this log's files are flushed and closed (a log shipper reading them:
        runtime/log_shipping.py)."""
        self._close_after.append(follower)

    @property
    def renders(self) -> bool:
        """Whether records are rendered (False: a log that only counts)."""
        return self._log is not None or self._alerts is not None

    @property
    def has_alerts(self) -> bool:
        return self._alerts is not None

    def native_fd(self) -> int:
        """The file descriptor native code may write whole batches of records to (the log's file,
        whose Python buffer this log always flushes), or -1 when the log is not a file of its own
        (standard output is shared with other writers) or wants fsync: then the batch's text comes
        back here, to `write_text`."""
        if self._log is None or self.fsync or self._log in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
            return -1
        try:
            fd = self._log.fileno()
        except (OSError, AttributeError, ValueError, io.UnsupportedOperation):
            return -1
        self._log.flush()
        return fd

    # -- records
    def record(self, d: Decision) -> dict[str, Any]:
        """The JSON object for one decision (messages rendered and escaped)."""
        rec: dict[str, Any] = {
            "decision_id": d.id,
            "time": _iso(d.time_ns),
            "plan_hash": self.plan_hash,
            "kind": d.kind,
            "vcpu": d.vcpu,
            "rule": d.rule,
            "rules": list(d.rules),
            "verdict": d.verdict,
            "would_deny": d.would_deny,
            "response": d.response,
            "response_flags": flag_names(d.response_flags),
            "collateral": d.collateral,
            "event": _fields(d.summary()),
            "latency_ns": d.latency_ns,
        }
        if d.conservative:
            rec["conservative"] = True
        if d.regions:
            rec["regions"] = list(d.regions)
        if not d.paused:
            rec["async"] = True
        if d.messages:
            rec["messages"] = [{"kind": m.kind, "severity": m.severity, "rule": m.rule,
                                "message": render_template(m.template, d.event)} for m in d.messages]
        if d.effects:
            rec["effects"] = [e.as_dict() for e in d.effects]
        if d.limited:
            rec["limited"] = list(d.limited)
        if d.errors:
            rec["errors"] = [escape_guest(e) for e in d.errors]
        if d.note:
            rec["note"] = d.note
        return rec

    def _alert_records(self, d: Decision | None, rec: Mapping[str, Any]) -> list[dict[str, Any]]:
        out = []
        for m in rec.get("messages", ()):
            if m["kind"] != "alert":
                continue
            out.append({"decision_id": rec["decision_id"], "time": rec["time"], "plan_hash": self.plan_hash,
                        "rule": m["rule"], "severity": m["severity"], "message": m["message"],
                        "verdict": rec["verdict"], "would_deny": rec["would_deny"], "kind": rec["kind"],
                        "vcpu": rec["vcpu"], "event": rec["event"]})
        return out

    def write(self, decisions: Iterable[Decision]) -> int:
        """Write one batch (a record per decision, alerts to the alert stream too) and flush.
        Returns how many records were written. Call it before pushing the batch's responses."""
        lines: list[str] = []
        alerts: list[str] = []
        dumps = _ENCODE
        n = 0
        if self._log is None and self._alerts is None:      # counting only: no record to render
            for d in decisions:
                self._stats.add(d)
                n += 1
            return n
        for d in decisions:
            rec = self.record(d)
            self._stats.add(d)
            lines.append(dumps(rec))
            if d.messages and self._alerts is not None:
                alerts.extend(dumps(a) for a in self._alert_records(d, rec))
            n += 1
        self.write_text("\n".join(lines) + "\n" if lines else "", [a + "\n" for a in alerts])
        return n

    def render(self, d: Decision) -> tuple[str, list[str]]:
        """One decision's record line and alert lines (each ending in a newline), counted in the
        stats; nothing is written (`write_text` does, for a whole batch)."""
        self._stats.add(d)
        if self._log is None and self._alerts is None:
            return "", []
        rec = self.record(d)
        alerts = []
        if d.messages and self._alerts is not None:
            alerts = [_ENCODE(a) + "\n" for a in self._alert_records(d, rec)]
        return _ENCODE(rec) + "\n", alerts

    def alert_lines(self, line: str) -> list[str]:
        """The alert stream lines for a record rendered elsewhere (the native engine's)."""
        return [_ENCODE(a) + "\n" for a in self._alert_records(None, json.loads(line))]

    def write_text(self, text: str | None, alerts: Iterable[str] = ()) -> None:
        """Write a batch's rendered records (JSON Lines, each ending in a newline) with one write and
        one flush, and its alert lines likewise. Call it before pushing the batch's responses."""
        if self._log is not None and text:
            self._log.write(text)
            self._flush(self._log)
        alerts = "".join(alerts)
        if self._alerts is not None and alerts:
            self._alerts.write(alerts)
            self._flush(self._alerts)

    def event(self, kind: str, data: Mapping[str, Any], *, alert: str | None = None) -> None:
        """A record that is not a decision (``"record": kind``), e.g. the binding following a remapped
        page; with ``alert`` (a message) it goes to the alert stream too. Flushed."""
        rec = {"record": kind, "time": _iso(time.time_ns()), "plan_hash": self.plan_hash, **data}
        if self._log is not None:
            self._log.write(_ENCODE(rec) + "\n")
            self._flush(self._log)
        if alert is not None and self._alerts is not None:
            self._alerts.write(_ENCODE({**rec, "severity": "high", "message": escape_guest(alert)}) + "\n")
            self._flush(self._alerts)
        self._stats.events[kind] += 1

    def flush(self) -> None:
        for f in (self._log, self._alerts):
            if f is not None and not getattr(f, "closed", False):
                f.flush()

    def write_batch(self, pairs: Iterable[tuple[bytes, Decision]]) -> int:
        """`write` for the output of `DecisionEngine.decide_batch`."""
        return self.write(d for _r, d in pairs)

    def _flush(self, f: TextIO) -> None:
        f.flush()
        if self.fsync:
            try:
                os.fsync(f.fileno())
            except (OSError, io.UnsupportedOperation, AttributeError):
                pass

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            for f, own in ((self._log, self._own_log), (self._alerts, self._own_alerts)):
                if f is not None:
                    try:
                        f.flush()
                    finally:
                        if own:
                            f.close()
        finally:
            for follower in self._close_after:
                follower.close()

    def __enter__(self) -> "DecisionLog":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- summaries
    def summary(self) -> str:
        return format_summary(self.stats, self.plan_hash)

    def progress_line(self) -> str:
        return progress_line(self.stats)


_last_second: list = [None, ""]


def _iso(ns: int) -> str:
    """UTC, ISO 8601 with microseconds (the date part is formatted once per second)."""
    sec = ns // 1_000_000_000
    if _last_second[0] != sec:
        _last_second[0] = sec
        _last_second[1] = _dt.datetime.fromtimestamp(sec, _dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S")
    return f"{_last_second[1]}.{(ns // 1000) % 1_000_000:06d}Z"


_ENCODE = json.JSONEncoder(ensure_ascii=True, separators=(",", ":")).encode


def _fields(summary: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, value in summary.items():
        if isinstance(value, bool):
            out[name] = value
        elif isinstance(value, int):
            out[name] = value if name in _DECIMAL_FIELDS else hex(value)
        else:
            out[name] = escape_guest(value)
    return out


def format_summary(stats: Stats, plan_hash: str = "") -> str:
    """The end-of-run table: totals, latency percentiles, per-rule counters, the histogram."""
    elapsed = time.monotonic() - stats.started
    lat = stats.latency
    lines = [f"decisions: {stats.decisions} in {elapsed:.1f} s"
             + (f" (plan {plan_hash[:19]}…)" if plan_hash else ""),
             f"  verdicts: allow {stats.verdicts['allow']}, deny {stats.verdicts['deny']}, "
             f"would deny {stats.verdicts['would_deny']}; collateral {stats.collateral} "
             f"(claimed by the unknown-size rule: {stats.conservative}); unmatched {stats.unmatched}; "
             f"errors {stats.errors}; alerts {stats.alerts}"]
    if stats.events:
        lines.append("  other records: " + ", ".join(f"{k} {n}" for k, n in sorted(stats.events.items())))
    if stats.by_kind:
        lines.append("  by kind: " + ", ".join(f"{k} {n}" for k, n in sorted(stats.by_kind.items())))
    if lat.count:
        lines.append(f"  latency: mean {_us(int(lat.mean()))}, p50 <{_us(lat.percentile(50) + 1)}, "
                     f"p90 <{_us(lat.percentile(90) + 1)}, p99 <{_us(lat.percentile(99) + 1)}, max {_us(lat.max)}")
    if stats.rules:
        width = max(4, *(len(n) for n in stats.rules))
        lines.append(f"  {'rule':<{width}}  {'matches':>7} {'deny':>6} {'would':>6} {'limited':>7} "
                     f"{'alerts':>6} {'logs':>6} {'errors':>6} {'p50':>9} {'p99':>9}")
        for name in sorted(stats.rules):
            r = stats.rules[name]
            lines.append(f"  {name:<{width}}  {r.matches:>7} {r.deny:>6} {r.would_deny:>6} {r.limited:>7} "
                         f"{r.alerts:>6} {r.logs:>6} {r.errors:>6} "
                         f"{'<' + _us(r.latency.percentile(50) + 1):>9} {'<' + _us(r.latency.percentile(99) + 1):>9}")
    if lat.count:
        lines.append("  latency histogram (all decisions):")
        top = max(lat.buckets)
        for b, n in enumerate(lat.buckets):
            if n:
                lo = 0 if b == 0 else 1 << (b - 1)
                bar = "#" * max(1, round(40 * n / top))
                lines.append(f"    [{_us(lo):>8}, {_us(1 << b):>8})  {n:>8}  {bar}")
    return "\n".join(lines)


def progress_line(stats: Stats) -> str:
    v = stats.verdicts
    return (f"{stats.decisions} decisions ({stats.rate():.0f}/s): deny {v['deny']}, would deny {v['would_deny']}, "
            f"collateral {stats.collateral}, alerts {stats.alerts}, errors {stats.errors}, "
            f"p99 <{_us(stats.latency.percentile(99) + 1)}")


class Progress:
    """A live progress line on a terminal: rewritten in place with `\\r`, at most every
    `interval` seconds; does nothing when the stream is not a TTY."""

    def __init__(self, stream: TextIO | None = None, interval: float = 0.5) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.interval = interval
        try:
            self.enabled = bool(self.stream.isatty())
        except (AttributeError, ValueError):
            self.enabled = False
        # None, not 0.0: time.monotonic() counts from boot, so on a host up for less than
        # `interval` a zero start would hold back the first line.
        self._last: float | None = None
        self._shown = False

    def update(self, source: DecisionLog | Stats, *, force: bool = False) -> bool:
        """Redraw if due; True when something was written."""
        if not self.enabled:
            return False
        now = time.monotonic()
        if not force and self._last is not None and now - self._last < self.interval:
            return False
        self._last = now
        stats = source.stats if isinstance(source, DecisionLog) else source
        self.stream.write("\r" + progress_line(stats) + "\x1b[K")
        self.stream.flush()
        self._shown = True
        return True

    def finish(self) -> None:
        """End the live line (before printing the summary)."""
        if self.enabled and self._shown:
            self.stream.write("\n")
            self.stream.flush()
            self._shown = False
