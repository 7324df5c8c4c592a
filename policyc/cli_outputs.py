"""What `policyc run` serves and ships besides answering: metrics, log format, rotation, syslog.

`add_output_arguments(parser)` adds ``--metrics``, ``--log-format``, ``--log-rotate-size``,
``--log-rotate-every``, ``--log-keep`` and ``--syslog`` to `run`; `RunOutputs(args, ...)` checks
them (one usage error, before the guest is touched), starts the metrics server (its port printed
at once, so /health answers 503 while the guest is attached and the plan installed), builds the
decision log with its sinks, and is called by the answering loop once per turn (`on_turn`:
metrics snapshot when a scrape asked, rotation when due) — never per event.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, Callable

__all__ = ["RunOutputs", "add_output_arguments"]


def add_output_arguments(run: argparse.ArgumentParser) -> None:
    run.add_argument("--log-format", choices=("jsonl", "ocsf"), default="jsonl",
                     help="the decision log's records: jsonl (default), or ocsf: OCSF 1.8.0 events (Memory "
                          "Activity for memory accesses, Base Event for other traps, a Detection Finding per alert), "
                          "written by a process of their own from the records the answering loop writes")
    run.add_argument("--log-rotate-size", metavar="SIZE", help="rotate the log (and --alerts) file at this size "
                     "(e.g. 100M): FILE becomes FILE.1, between two batches, no record lost or torn")
    run.add_argument("--log-rotate-every", metavar="DURATION", help="rotate them this often (e.g. 1h, 1d)")
    run.add_argument("--log-keep", type=int, default=10, metavar="N", help="rotated files kept (default 10)")
    run.add_argument("--syslog", metavar="ADDR", help="send every record to a syslog daemon as RFC 5424: "
                     "udp://HOST:PORT (default scheme) or tcp://HOST:PORT")
    run.add_argument("--metrics", metavar="ADDR:PORT", help="serve Prometheus /metrics, /health (200 once "
                     "protection is in place) and /status (JSON) here; port 0 picks one (printed)")


class RunOutputs:
    """The run's metrics server, log sinks and rotations (see the module docstring). `usage` is the
    exception class a usage error is raised as; `open_out(target, stream, role)` opens an output."""

    def __init__(self, args: argparse.Namespace, guest_scheme: str, usage: type[Exception],
                 open_out: Callable[..., Any]) -> None:
        from .runtime.log_rotation import parse_duration, parse_size
        from .runtime.metrics import parse_address
        from .runtime.syslog_sink import parse_syslog_address

        self.args, self.usage, self.open_out = args, usage, open_out
        self.metrics: Any = None
        self.rotations: list[Any] = []
        self.sinks: list[Any] = []
        self.max_bytes = self.every = None
        try:
            if args.log_rotate_size:
                self.max_bytes = parse_size(args.log_rotate_size)
            if args.log_rotate_every:
                self.every = parse_duration(args.log_rotate_every)
            address = parse_address(args.metrics) if args.metrics else None
            if args.syslog:
                parse_syslog_address(args.syslog)
        except ValueError as exc:
            raise usage(str(exc)) from None
        rotating = self.max_bytes is not None or self.every is not None
        if rotating and args.log_keep < 1:
            raise usage("--log-keep must be at least 1")
        if rotating and (args.log in (None, "-")):
            raise usage("--log-rotate-size/--log-rotate-every rotate a --log FILE: give one")
        if guest_scheme == "sim" and (rotating or address):
            raise usage("--metrics and log rotation are for a guest that keeps running (simhost: or xen:); "
                        "a sim: scenario ends with its steps")
        if args.log_format == "ocsf" and args.log is None:
            raise usage("--log-format ocsf formats the --log FILE: give one")
        if args.syslog and args.log == "-" and args.log_format == "jsonl":
            raise usage("--syslog ships the records of a --log FILE (or of no --log), not of standard output")
        if address is not None:
            from .runtime.metrics import MetricsServer

            self.metrics = MetricsServer(address)
            try:
                port = self.metrics.start()
            except ImportError:
                raise usage("--metrics needs prometheus-client: pip install 'policyc[metrics]'") from None
            except OSError as exc:
                raise usage(f"cannot serve metrics on {args.metrics}: {exc.strerror or exc}") from None
            print(f"policyc run: metrics on http://{address[0]}:{port}/metrics (/health, /status)",
                  file=sys.stderr, flush=True)

    def decision_log(self, plan: dict, guest: str, identity: dict | None = None) -> Any:
        """The run's `DecisionLog` (JSON Lines to --log, --alerts) and the shipper that makes OCSF
        events and syslog messages of its records (runtime/log_shipping.py: it follows the --log file,
        or reads a pipe that stands in for it)."""
        import os

        from . import __version__
        from .runtime.decision_log import DecisionLog
        from .runtime.log_rotation import Rotation

        args = self.args
        rotate = {"max_bytes": self.max_bytes, "every": self.every, "keep": args.log_keep}
        rotating = self.max_bytes is not None or self.every is not None
        shipped: list[dict[str, Any]] = []
        pass_fds: list[int] = []
        if args.log_format == "ocsf":
            context = {"policy": plan["policy"]["name"], "guest_name": guest,
                       "guest_uuid": (identity or {}).get("uuid"), "version": __version__}
            ocsf: dict[str, Any] = {"kind": "ocsf", "context": context, "rotation": rotate if rotating else None}
            if args.log == "-":
                sys.stdout.flush()
                ocsf["fd"] = os.dup(sys.stdout.fileno())
                pass_fds.append(ocsf["fd"])
            else:
                ocsf["path"] = os.path.abspath(args.log)
            shipped.append(ocsf)
        if args.syslog:
            shipped.append({"kind": "syslog", "address": args.syslog, "policy": plan["policy"]["name"],
                            "guest": guest, "pid": os.getpid()})
        alerts = self.open_out(args.alerts, sys.stderr, "the alert stream")
        if rotating and args.alerts not in (None, "-"):
            self.rotations.append(Rotation(alerts, **rotate))
        if not shipped or (args.log not in (None, "-") and args.log_format == "jsonl"):
            out = self.open_out(args.log, sys.stdout)
            log = DecisionLog(out, alerts, plan.get("content_hash", ""))
            if rotating:
                self.rotations.append(Rotation(out, **rotate))
            if shipped:         # the shipper follows the log file from where it ends now
                source = {"follow": os.path.abspath(args.log), "offset": os.fstat(out.fileno()).st_size}
                self._start_shipper(log, {"input": source, "outputs": shipped}, pass_fds)
            return log
        # The native engine writes the records to a pipe to the shipper, as it would to a file.
        from .runtime.log_shipping import pipe_for_log

        read_end, writer = pipe_for_log()
        log = DecisionLog(writer, alerts, plan.get("content_hash", ""))
        try:
            self._start_shipper(log, {"input": {"fd": read_end}, "outputs": shipped}, [*pass_fds, read_end], writer)
        finally:
            for fd in (*pass_fds, read_end):
                os.close(fd)
        return log

    def on_turn(self) -> None:
        """Once per turn of the answering loop, between batches."""
        if self.metrics is not None:
            self.metrics.refresh()
        for rotation in self.rotations:
            rotation.check()

    def protected(self, enforcer: Any, backend: Any, plan: dict) -> None:
        """Protection is in place: the install counts as an activation; snapshots come from the loop."""
        from .runtime.metrics import take_snapshot

        if self.metrics is None:
            return
        self.metrics.activated(plan, "success")
        sinks = self.sinks
        self.metrics.serve_snapshots(lambda: take_snapshot(enforcer, backend, [s.failures for s in sinks]))
        self.metrics.set_protected(True)

    def watch_bundle(self, poller: Any) -> None:
        """A polled --bundle URL: its fetches are counted on /metrics, its revision shown on /status."""
        if self.metrics is not None:
            self.metrics.bundle = poller

    def failed(self, error: str) -> None:
        if self.metrics is not None:
            self.metrics.activated(None, "failure")
            self.metrics.set_protected(False, error)

    def unprotected(self, why: str | None = None) -> None:
        """Teardown begins, or is done (or the run stopped on an error): /health answers 503 from now
        on; the figures are taken once more (the loop may not turn again)."""
        if self.metrics is not None:
            self.metrics.refresh(now=True)
            self.metrics.set_protected(False, why)

    def close(self) -> None:
        if self.metrics is not None:
            self.metrics.close()

    def report(self) -> list[str]:
        """What the sinks and rotations could not do, one line each (printed at exit; the run exits 1:
        records were not where the operator asked for them)."""
        out = []
        for sink in self.sinks:
            lost = sum(sink.failures.values())
            if lost:
                out.append(f"{lost} record(s) not shipped ({', '.join(f'{k} {n}' for k, n in sorted(sink.failures.items()))}"
                           f"){': ' + sink.last_error if sink.last_error else ''}")
        out += [r.last_error for r in self.rotations if r.last_error]
        return out

    def _start_shipper(self, log: Any, config: dict, pass_fds: list[int], writer: Any = None) -> None:
        from .runtime.log_shipping import ShipperError, ShipperProcess

        try:
            shipper = ShipperProcess(config, pass_fds=tuple(pass_fds), writer=writer)
        except ShipperError as exc:
            log.close()
            if writer is not None:
                writer.close()
            raise self.usage(str(exc)) from None
        log.close_after(shipper)
        self.sinks.append(shipper)
