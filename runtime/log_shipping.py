"""Decision records shipped in other forms (OCSF, syslog), off the answering path.

`DecisionLog.add_sink(sink)` hands a sink each batch's records as JSON Lines text, the text the
native engine (or the Python engine) rendered for the decision log; `Shipper` is that sink: the
answering loop only queues the text (one `put` a batch, no per-record work), and a thread of the
shipper's own converts and delivers it, in order. So an OCSF file or a syslog daemon never slows
the answers down by its conversion; its records follow the answers, in the order answered.

A full queue (the destination slower than the guest's events): a `blocking` shipper (a file: the
same back-pressure as a slow disk under the JSON Lines log) makes the loop wait; a non-blocking one
(a network destination, which may be down for minutes) drops the batch and counts its records in
`failures["<name>_queue_full"]`. A delivery that fails counts its records in
`failures["<name>_<reason>"]`; the run goes on either way (metrics: decision_log_failures_total).
`close()` delivers what is queued and stops the thread.
"""

from __future__ import annotations

import queue
import threading
from collections import Counter
from typing import Any, Callable

from .ocsf import OcsfContext, ocsf_lines

__all__ = ["OcsfFile", "Shipper"]

QUEUE_BATCHES = 4096


class Shipper:
    """A thread delivering batches of JSON Lines records (see the module docstring).
    A failure of `deliver(text)` is counted under its exception's `reason` attribute, else "write"
    for an OSError, "error" otherwise."""

    def __init__(self, name: str, deliver: Callable[[str], None], *, blocking: bool,
                 max_batches: int = QUEUE_BATCHES) -> None:
        self.name = name
        self.deliver = deliver
        self.blocking = blocking
        self.failures: Counter[str] = Counter()
        self.delivered = 0
        self.last_error: str | None = None
        self._queue: queue.Queue[str | None] = queue.Queue(max_batches)
        self._thread = threading.Thread(target=self._run, name=f"policyc-{name}", daemon=True)
        self._thread.start()

    def ship(self, text: str) -> None:
        """Queue one batch of records (called by the answering loop)."""
        if not text:
            return
        try:
            self._queue.put(text, block=self.blocking)
        except queue.Full:
            self.failures[f"{self.name}_queue_full"] += text.count("\n")

    def close(self, timeout: float = 30.0) -> None:
        """Deliver what is queued, then stop."""
        if not self._thread.is_alive():
            return
        self._queue.put(None)
        self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            text = self._queue.get()
            if text is None:
                return
            try:
                self.deliver(text)
                self.delivered += text.count("\n")
            except Exception as exc:  # noqa: BLE001 - counted and said; shipping must not stop the run
                reason = getattr(exc, "reason", None) or ("write" if isinstance(exc, OSError) else "error")
                self.failures[f"{self.name}_{reason}"] += text.count("\n")
                self.last_error = f"{self.name}: {exc}"


class OcsfFile:
    """`--log FILE --log-format ocsf`: OCSF events written to an `OutputFile` by a `Shipper`,
    rotated (when given a `Rotation`) between its batches; `own`: closed with it (not standard output)."""

    def __init__(self, out: Any, context: OcsfContext, rotation: Any = None, *, own: bool = True) -> None:
        self.out = out
        self.own = own
        self.context = context
        self.rotation = rotation
        self.shipper = Shipper("ocsf", self._write, blocking=True)

    @property
    def failures(self) -> Counter[str]:
        return self.shipper.failures

    def ship(self, text: str) -> None:
        self.shipper.ship(text)

    def close(self) -> None:
        self.shipper.close()
        if self.own:
            self.out.close()
        else:
            self.out.flush()

    def _write(self, text: str) -> None:
        self.out.write(ocsf_lines(text.splitlines(), self.context))
        self.out.flush()
        if self.rotation is not None:
            self.rotation.check()
