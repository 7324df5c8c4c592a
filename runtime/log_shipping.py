"""Decision records shipped in other forms (OCSF, syslog), by a process of their own.

`DecisionLog.add_sink(sink)` hands a sink each batch's records as JSON Lines text, the text the
native engine (or the Python engine) rendered for the decision log. `ShipperProcess` is that sink:
the answering loop writes the text to a pipe (one `write` a batch, no per-record work) and a child
process (``python -m policyc.runtime.log_shipping CONFIG``) converts and delivers it, in order.
A process, not a thread: a thread converting records would hold the interpreter lock the loop
needs after every native call (up to the 5 ms switch interval each time), so a busy shipper
would slow the answers down; a process only shares the CPUs.

A full pipe (1 MiB; the destination slower than the guest's events): a `blocking` shipper (a file:
the same back-pressure as a slow disk under the JSON Lines log) makes the loop wait; a non-blocking
one (a network destination, which may be down for minutes) never waits: what the pipe did not take
of a batch is kept (one batch at most) and written first next time, and while it waits the new
batches are dropped and their records counted in `failures["<name>_queue_full"]`. The child counts what it could not deliver by reason
(`<name>_send`, `<name>_write`, ...) and reports its counters on its standard output, read by a
thread here that wakes only then; the run goes on either way (metrics:
policyc_decision_log_failures_total). `close()` ends the pipe: the child delivers what is queued
and exits. The child ignores SIGINT and SIGTERM (they are the enforcer's to act on: it tears down,
then closes the pipe); when the enforcer is killed outright the child sees the pipe end and exits.
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from typing import Any, Callable

__all__ = ["ShipperError", "ShipperProcess", "main"]

PIPE_BYTES = 1 << 20
_REPORT_EVERY = 0.2


class ShipperError(Exception):
    """The shipper could not start (its destination cannot be opened or reached): one line."""


class ShipperProcess:
    """The enforcer's side of a shipper (see the module docstring). `config` says what the child
    does (`_open_sink`); `pass_fd` is a descriptor the child may write to (standard output)."""

    def __init__(self, name: str, config: dict[str, Any], *, blocking: bool, pass_fd: int | None = None) -> None:
        self.name = name
        self.blocking = blocking
        self.delivered = 0
        self.last_error: str | None = None
        self._dropped: Counter[str] = Counter()          # the loop's thread writes it
        self._reported: dict[str, int] = {}               # the reader's thread replaces it whole
        self._proc = subprocess.Popen([sys.executable, "-m", "policyc.runtime.log_shipping", json.dumps(config)],
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                      pass_fds=(pass_fd,) if pass_fd is not None else ())
        assert self._proc.stdin is not None and self._proc.stdout is not None
        first = json.loads(self._proc.stdout.readline() or '{"error": "the shipper process ended at start"}')
        if "error" in first:
            self._proc.stdin.close()
            self._proc.wait()
            raise ShipperError(first["error"])
        self._fd = self._proc.stdin.fileno()
        self._carry = b""
        try:
            fcntl.fcntl(self._fd, fcntl.F_SETPIPE_SZ, PIPE_BYTES)
        except OSError:
            pass                      # the system's limit is lower: the default pipe size
        if not blocking:
            os.set_blocking(self._fd, False)
        self._gone = False
        self._reader = threading.Thread(target=self._read_reports, name=f"policyc-{name}-reports", daemon=True)
        self._reader.start()

    @property
    def failures(self) -> Counter[str]:
        """Records not delivered, by reason: dropped here, or failed in the child."""
        return Counter(self._reported) + self._dropped

    def ship(self, text: str) -> None:
        """Queue one batch of records (called by the answering loop): one write, or a counted drop."""
        if not text:
            return
        if self._gone:
            self._drop(text, "gone")
            return
        try:
            if self.blocking:
                self._write_all(text.encode("utf-8"))
                return
            # Never wait: what a full pipe did not take of the previous batch goes first (a record is
            # never torn in the pipe); while some is still waiting, this batch is dropped.
            if self._carry:
                self._carry = self._write_some(self._carry)
            if self._carry:
                self._drop(text, "queue_full")
                return
            self._carry = self._write_some(text.encode("utf-8"))
        except OSError as exc:          # the child is gone (EPIPE)
            self._gone = True
            self.last_error = f"{self.name}: the shipper process ended ({exc.strerror or exc})"
            self._drop(text, "gone")

    def _write_some(self, data: bytes) -> bytes:
        try:
            return data[os.write(self._fd, data):]
        except BlockingIOError:
            return data

    def _write_all(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(self._fd, view):]

    def close(self, timeout: float = 60.0) -> None:
        """Let the child deliver what is queued and exit."""
        if self._proc.stdin is not None and not self._proc.stdin.closed:
            try:
                os.set_blocking(self._fd, True)
                if self._carry and not self._gone:
                    self._write_all(self._carry)
                self._proc.stdin.close()
            except OSError:
                pass
        try:
            self._proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
            self.last_error = f"{self.name}: the shipper did not finish in {timeout:.0f} s"
        self._reader.join(5)

    def _drop(self, text: str, reason: str) -> None:
        self._dropped[f"{self.name}_{reason}"] += text.count("\n")

    def _read_reports(self) -> None:
        assert self._proc.stdout is not None
        for line in self._proc.stdout:
            try:
                report = json.loads(line)
            except ValueError:
                continue
            self._reported = dict(report.get("failures", {}))
            self.delivered = int(report.get("delivered", 0))
            if report.get("last_error"):
                self.last_error = report["last_error"]


# --------------------------------------------------------------------------- the child

def main(argv: list[str] | None = None) -> int:
    """The shipper process: JSON Lines records on standard input, reports on standard output."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    args = sys.argv[1:] if argv is None else argv
    config = json.loads(args[0])
    name = config["kind"]
    try:
        deliver, close = _open_sink(config)
    except (OSError, ValueError) as exc:
        _report({"error": str(exc)})
        return 2
    _report({"ready": True})
    failures: Counter[str] = Counter()
    delivered, last_error, last_report = 0, None, 0.0
    for lines in _batches(sys.stdin.fileno()):
        try:
            deliver(lines)
            delivered += len(lines)
        except Exception as exc:  # noqa: BLE001 - counted and reported; shipping goes on
            reason = getattr(exc, "reason", None) or ("write" if isinstance(exc, OSError) else "error")
            failures[f"{name}_{reason}"] += len(lines)
            last_error = f"{name}: {exc}"
        if failures and time.monotonic() - last_report >= _REPORT_EVERY:
            last_report = time.monotonic()
            _report({"delivered": delivered, "failures": failures, "last_error": last_error})
    close()
    _report({"delivered": delivered, "failures": failures, "last_error": last_error})
    return 0


def _open_sink(config: dict[str, Any]) -> tuple[Callable[[list[str]], None], Callable[[], None]]:
    if config["kind"] == "ocsf":
        from .log_rotation import Rotation
        from .ocsf import OcsfContext, ocsf_lines
        from .output_file import OutputFile

        out: Any = OutputFile(config["path"], "the OCSF log") if "path" in config else os.fdopen(config["fd"], "w")
        context = OcsfContext(**config["context"])
        rotation = Rotation(out, **config["rotation"]) if config.get("rotation") else None

        def write(lines: list[str]) -> None:
            out.write(ocsf_lines(lines, context))
            out.flush()
            if rotation is not None:
                rotation.check()
        return write, out.close
    if config["kind"] == "syslog":
        from .syslog_sink import SyslogSender

        sender = SyslogSender(config["address"], policy=config["policy"], guest=config["guest"],
                              pid=config["pid"])
        return sender.send, sender.close
    raise ValueError(f"unknown shipper '{config['kind']}'")


def _batches(fd: int) -> Any:
    """Whole lines as they arrive, a read's worth at a time (a natural batch)."""
    rest = b""
    while True:
        chunk = os.read(fd, PIPE_BYTES)
        if not chunk:
            return
        data = rest + chunk
        cut = data.rfind(b"\n") + 1
        rest = data[cut:]
        if cut:
            yield data[:cut].decode("utf-8").splitlines()


def _report(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    raise SystemExit(main())
