"""Decision records shipped in other forms (OCSF, syslog), by a process of their own.

The answering path does not change when records are shipped: the native engine writes each
batch's records (JSON Lines) to one file descriptor, as it always does, and a child process
(``python -m policyc.runtime.log_shipping CONFIG``) reads them from there, converts and delivers
them, in order:

* **follow** (`--log FILE` with `--syslog`): the child follows the decision log file as a
  collector does, from where it ended when the run started, across rotations (a rotated file is
  read to its end before the new one);
* **pipe** (`--log-format ocsf`, or `--syslog` without `--log`): the decision log's descriptor is a
  pipe (1 MiB) to the child. A record is in the pipe before its answer, as it would be in a file;
  a child that is gone makes the pipe fail like a full disk (`--on-log-failure`).

A thread of the child reads; each output has a thread and a bounded queue of its own. A file
output (OCSF) waits when its queue is full, so in pipe mode the pipe fills and the enforcer waits
as for a slow disk; a network output (syslog) never waits: its batches are dropped and their
records counted (``syslog_queue_full``), because a syslog daemon that is down must not hold the
guest's vCPUs. What an output could not deliver is counted by reason (``<output>_<reason>``).
The child reports its counters on its standard output (read here by a thread that wakes only
then: metrics' policyc_decision_log_failures_total, and a line at exit). It ignores SIGINT and
SIGTERM (the enforcer acts on them: it tears down, closes the log, then `close()` tells the child
the log is complete); an enforcer killed outright ends the pipe or the control channel, and the
child delivers what it has and exits.
"""

from __future__ import annotations

import fcntl
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from typing import Any, Callable, Iterator

from ..errors import PolicycError

__all__ = ["ShipperError", "ShipperProcess", "main", "pipe_for_log"]

PIPE_BYTES = 1 << 20
READ_BYTES = 1 << 16
QUEUE_BATCHES = 512            # of at most READ_BYTES each: 32 MiB per output at most
_FOLLOW_POLL = 0.02
_REPORT_EVERY = 0.2


class ShipperError(PolicycError):
    """The shipper could not start (its destination cannot be opened or reached): one line."""


def pipe_for_log() -> tuple[int, Any]:
    """A pipe for pipe mode: (read end for the child, the write end as a text stream for the
    `DecisionLog`, whose descriptor the native engine writes to)."""
    r, w = os.pipe()
    try:
        fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, PIPE_BYTES)
    except OSError:
        pass                           # the system's limit is lower: the default size
    return r, os.fdopen(w, "w", encoding="utf-8")


class ShipperProcess:
    """The enforcer's side of the shipper (see the module docstring). `config` is
    {"input": {"fd": N} | {"follow": PATH, "offset": BYTES}, "outputs": [...]}; `pass_fds` the
    descriptors the child gets (the pipe's read end, a standard output for OCSF); `writer` the
    pipe's write end, closed by `close()` before the child is told to finish."""

    def __init__(self, config: dict[str, Any], *, pass_fds: tuple[int, ...] = (), writer: Any = None) -> None:
        self.writer = writer
        self.delivered = 0
        self.last_error: str | None = None
        self.failures: Counter[str] = Counter()      # replaced whole by the reports' reader
        self._proc = subprocess.Popen([sys.executable, "-m", "policyc.runtime.log_shipping", json.dumps(config)],
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, pass_fds=pass_fds)
        assert self._proc.stdin is not None and self._proc.stdout is not None
        first = json.loads(self._proc.stdout.readline() or '{"error": "the shipper process ended at start"}')
        if "error" in first:
            self._proc.stdin.close()
            self._proc.wait()
            raise ShipperError(first["error"])
        self._reader = threading.Thread(target=self._read_reports, name="policyc-shipper-reports", daemon=True)
        self._reader.start()

    def close(self, timeout: float = 120.0) -> None:
        """The log is complete: the child delivers what it has and exits."""
        if self.writer is not None and not self.writer.closed:
            try:
                self.writer.close()
            except OSError:
                pass                    # the child is gone: the run counted it as a log failure
        assert self._proc.stdin is not None
        if not self._proc.stdin.closed:
            self._proc.stdin.close()
        try:
            self._proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
            self.last_error = f"the shipper did not finish in {timeout:.0f} s"
        self._reader.join(5)

    def _read_reports(self) -> None:
        assert self._proc.stdout is not None
        for line in self._proc.stdout:
            try:
                report = json.loads(line)
            except ValueError:
                continue
            self.failures = Counter(report.get("failures", {}))
            self.delivered = int(report.get("delivered", 0))
            if report.get("last_error"):
                self.last_error = report["last_error"]


# --------------------------------------------------------------------------- the child

def main(argv: list[str] | None = None) -> int:
    """The shipper process: reads the decision log's records, delivers them to its outputs."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    config = json.loads((sys.argv[1:] if argv is None else argv)[0])
    try:
        outputs = [_Output(o["kind"], *_open_output(o)) for o in config["outputs"]]
        source = _source(config["input"])
    except (OSError, ValueError) as exc:
        _report({"error": str(exc)})
        return 2
    _report({"ready": True})
    done = threading.Event()
    threading.Thread(target=lambda: (sys.stdin.buffer.read(), done.set()), daemon=True).start()
    last = 0.0
    for lines in source(done):
        for out in outputs:
            out.put(lines)
        if time.monotonic() - last >= _REPORT_EVERY:
            last = time.monotonic()
            _report(_counters(outputs))
    for out in outputs:
        out.close()
    _report(_counters(outputs))
    return 0


class _Output:
    """One output: a thread delivering batches from a bounded queue (see the module docstring)."""

    def __init__(self, name: str, deliver: Callable[[list[str]], None], close: Callable[[], None],
                 blocking: bool) -> None:
        self.name, self.deliver, self._close, self.blocking = name, deliver, close, blocking
        self.failures: Counter[str] = Counter()
        self.delivered = 0
        self.last_error: str | None = None
        self._queue: queue.Queue[list[str] | None] = queue.Queue(QUEUE_BATCHES)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def put(self, lines: list[str]) -> None:
        try:
            self._queue.put(lines, block=self.blocking)
        except queue.Full:
            self.failures[f"{self.name}_queue_full"] += len(lines)

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join()
        self._close()

    def _run(self) -> None:
        while (lines := self._queue.get()) is not None:
            try:
                self.deliver(lines)
                self.delivered += len(lines)
            except Exception as exc:  # noqa: BLE001 - counted and reported; shipping goes on
                reason = getattr(exc, "reason", None) or ("write" if isinstance(exc, OSError) else "error")
                self.failures[f"{self.name}_{reason}"] += len(lines)
                self.last_error = f"{self.name}: {exc}"


def _counters(outputs: list[_Output]) -> dict[str, Any]:
    failures: Counter[str] = Counter()
    for out in outputs:
        failures.update(out.failures)
    errors = [o.last_error for o in outputs if o.last_error]
    return {"delivered": min((o.delivered for o in outputs), default=0), "failures": failures,
            "last_error": errors[-1] if errors else None}


def _open_output(config: dict[str, Any]) -> tuple[Callable[[list[str]], None], Callable[[], None], bool]:
    """(deliver, close, blocking) for one output's configuration."""
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
        return write, out.close, True
    if config["kind"] == "syslog":
        from .syslog_sink import SyslogSender

        sender = SyslogSender(config["address"], policy=config["policy"], guest=config["guest"], pid=config["pid"])
        return sender.send, sender.close, False
    raise ValueError(f"unknown output '{config['kind']}'")


def _source(config: dict[str, Any]) -> Callable[[threading.Event], Iterator[list[str]]]:
    """The records' source: a pipe (read to its end) or a followed file (until `done`, then to its end)."""
    if "fd" in config:
        fd = config["fd"]
        return lambda _done: _lines(fd)
    path = config["follow"]
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    os.lseek(fd, int(config.get("offset", 0)), os.SEEK_SET)
    return lambda done: _follow(path, fd, done)


def _follow(path: str, fd: int, done: threading.Event) -> Iterator[list[str]]:
    """Lines appended to `path`, across rotations (FILE renamed, a fresh FILE: the old one is read to
    its end, then the new one from its start), until `done` is set and the file is read to its end."""
    rest = b""
    while True:
        finished = done.is_set()            # before the read: every write came before `done`
        chunk = os.read(fd, READ_BYTES)
        if chunk:
            rest, lines = _split(rest + chunk)
            if lines:
                yield lines
            continue
        try:
            rotated = os.stat(path).st_ino != os.fstat(fd).st_ino
        except FileNotFoundError:
            rotated = False                 # between the rename and the new file: look again
        if rotated:
            # the writer moved to the new file before it was there to see: the old one is complete
            while chunk := os.read(fd, READ_BYTES):
                rest, lines = _split(rest + chunk)
                if lines:
                    yield lines
            os.close(fd)
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            continue
        if finished:
            os.close(fd)
            return
        done.wait(_FOLLOW_POLL)


def _lines(fd: int) -> Iterator[list[str]]:
    rest = b""
    while chunk := os.read(fd, READ_BYTES):
        rest, lines = _split(rest + chunk)
        if lines:
            yield lines


def _split(data: bytes) -> tuple[bytes, list[str]]:
    cut = data.rfind(b"\n") + 1
    return data[cut:], data[:cut].decode("utf-8").splitlines()


def _report(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    raise SystemExit(main())
