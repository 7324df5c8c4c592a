"""`policyc run --bundle URL`: the URL polled while enforcing; a newer signed bundle hot-reloaded.

`BundlePoller(source, trusted, store, active, ...)` has two halves, so that the answering loop
never waits on the network:

* a daemon thread fetches the URL every `every` seconds, each wait drawn between 0.75 and 1.25
  times that (a fleet restarted at once does not poll in step), with ``If-None-Match`` (the
  server's 304 costs no download), and verifies what it gets (`verify_bundle`: the signature,
  every member's digest, not-after, and a revision newer than the active one). A bundle that
  passes waits in one slot (a newer one replaces it); anything else is counted (`polls`) and kept
  as `last_error`. Nothing the network or a server does can raise out of the thread: a server that
  is down is one more `unreachable` poll, tried again at the next turn.
* `poll(enforcer)`, called by the answering loop once per turn (a lock-free test when nothing
  waits), unpacks the waiting bundle beside the active one and reloads it through
  `reload_from_file` (runtime/reload.py: bound and built beside the running plan, switched with no
  gap, the old plan kept on any failure). Only a bundle that took is saved as the host's last good
  bundle (`BundleStore`) and unpacked where a SIGHUP re-reads the plan; the next restart enforces
  it before the network is up.

A bundle whose activation failed on the host (a fault mid-install, rolled back, or no room on disk
to unpack it) is fetched again and retried at the next poll; one that cannot run here (it does not
bind to this guest, or needs what the host lacks) waits for new bytes.

`polls` counts fetch outcomes by result: ``new`` (verified, handed to the loop), ``not_modified``
(a 304), ``unchanged`` (the active bundle's very bytes, e.g. from a server without ETags),
``refused`` (did not verify) and ``unreachable`` (no answer, or an HTTP error). The ETag of every
body fetched is kept, refused ones included: the same bad bytes are not downloaded again.
"""

from __future__ import annotations

import hashlib
import random
import shutil
import threading
import time
from collections import Counter
from typing import Any, Callable

from ..bundle import Bundle, BundleError, BundleStore, fetch_bundle, verify_bundle
from .reload import ReloadResult, failed, reload_from_file

__all__ = ["BundlePoller", "JITTER", "POLL_RESULTS", "RETRIED_STAGES"]

JITTER = 0.25               # each wait is `every` times a factor drawn from [1 - JITTER, 1 + JITTER]
POLL_RESULTS = ("new", "not_modified", "unchanged", "refused", "unreachable")
FETCH_TIMEOUT = 30.0
# A bundle that failed to activate at these stages failed on the host, not on what it holds (a fault
# mid-install, rolled back): it is fetched and tried again at the next poll, as is one that could not
# be unpacked to disk. One whose plan does not load, bind or fit the host would fail the same way.
RETRIED_STAGES = frozenset({"install"})


class BundlePoller:
    """The URL of one `policyc run --bundle`, polled (module docstring). `report(bundle, result)` is
    called on the loop's thread after each activation tried."""

    def __init__(self, source: str, trusted_pem: bytes, store: BundleStore, active: Bundle, *,
                 every: float, etag: str | None = None, target: str | None = None, audit: bool = False,
                 first_now: bool = False, fetch: Callable[..., tuple[bytes | None, str | None]] = fetch_bundle,
                 report: Callable[[Bundle, ReloadResult], None] | None = None,
                 rand: Callable[[], float] = random.random) -> None:
        if every <= 0:
            raise ValueError("a bundle poll interval is a positive number of seconds")
        self.source = source
        self.trusted = trusted_pem
        self.store = store
        self.active = active
        self.every = every
        self.etag = etag
        self.target = target
        self.audit = audit
        self.first_now = first_now
        self.fetch = fetch
        self.report = report
        self.rand = rand
        self.polls: Counter[str] = Counter()
        self.last_error: str | None = None
        self.last_poll: float | None = None
        self._active_digest = hashlib.sha256(active.raw).digest()
        self._pending: Bundle | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ life cycle
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="policyc-bundle-poll", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop polling (a fetch under way is left to its timeout: the thread is a daemon)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(1.0)

    # ------------------------------------------------------------------ the loop's side
    def poll(self, enforcer: Any) -> ReloadResult | None:
        """Activate the bundle that waits, if one does (the answering loop, between batches)."""
        if self._pending is None:
            return None
        with self._lock:
            bundle, self._pending = self._pending, None
        if bundle is None:
            return None
        incoming = self.store.directory / "incoming"
        host_fault = False
        try:
            shutil.rmtree(incoming, ignore_errors=True)
            plan = bundle.unpack(incoming)
        except OSError as exc:
            result = failed(enforcer.plan.get("content_hash", ""), bundle.manifest.get("plan_hash", ""), "source",
                            f"cannot unpack bundle revision {bundle.revision} into {incoming}: {exc}")
            enforcer.note_reload(result)
            host_fault = True
        else:
            result = reload_from_file(enforcer, str(plan), self.target, symbols_dir=str(incoming), audit=self.audit)
        if result.ok:
            self._adopt(bundle)
        else:
            self._note_error(f"bundle revision {bundle.revision} did not activate ({result.stage}): {result.error}")
            if host_fault or result.stage in RETRIED_STAGES:
                with self._lock:
                    self.etag = None        # a 304 would keep it from us until its bytes change
        if self.report is not None:
            self.report(bundle, result)
        return result

    def status(self) -> dict[str, Any]:
        """For /status (any thread)."""
        with self._lock:
            pending = self._pending.revision if self._pending is not None else None
            return {"source": self.source, "revision": self.active.revision,
                    "not_after": self.active.manifest.get("not_after"), "etag": self.etag,
                    "poll_every": self.every, "polls": dict(self.polls), "pending_revision": pending,
                    "last_poll": _iso(self.last_poll) if self.last_poll is not None else None,
                    "last_error": self.last_error}

    def poll_counts(self) -> dict[str, int]:
        with self._lock:
            return dict(self.polls)

    # ------------------------------------------------------------------ the thread's side
    def check_once(self) -> str:
        """One fetch and verification; returns the result counted. Never raises (a poller that dies
        would leave the host on its bundle silently)."""
        try:
            result = self._check()
        except BundleError as exc:          # fetching: no answer, or an HTTP error
            result = "unreachable"
            self._note_error(str(exc))
        except Exception as exc:  # noqa: BLE001 - a bug or an odd server must not stop the polling
            result = "unreachable"
            self._note_error(f"{type(exc).__name__}: {exc}")
        with self._lock:
            self.polls[result] += 1
            self.last_poll = time.time()
        return result

    def _run(self) -> None:
        delay = 0.0 if self.first_now else self.next_wait()
        while not self._stop.wait(delay):
            self.check_once()
            delay = self.next_wait()

    def next_wait(self) -> float:
        """Seconds until the next poll: `every`, jittered (module docstring)."""
        return self.every * (1.0 - JITTER + 2 * JITTER * self.rand())

    def _check(self) -> str:
        raw, etag = self.fetch(self.source, etag=self.etag, timeout=min(FETCH_TIMEOUT, max(self.every, 1.0)))
        if raw is None:
            return "not_modified"
        self.etag = etag                    # refused bytes too: the same bad body is not fetched again
        if hashlib.sha256(raw).digest() == self._active_digest:
            return "unchanged"
        with self._lock:
            pending = self._pending
        newest = max(self.active.revision, pending.revision if pending is not None else 0)
        try:
            bundle = verify_bundle(raw, trusted_pem=self.trusted, active_revision=newest)
        except BundleError as exc:
            self._note_error(f"{self.source}: refused: {exc}")
            return "refused"
        with self._lock:
            self._pending = bundle
        return "new"

    # ------------------------------------------------------------------ helpers
    def _adopt(self, bundle: Bundle) -> None:
        """A bundle that took: it is the last good one from now on (on disk for the next restart)."""
        self.active = bundle
        self._active_digest = hashlib.sha256(bundle.raw).digest()
        try:
            self.store.save(bundle)
            bundle.unpack(self.store.directory / "active")
        except OSError as exc:
            self._note_error(f"bundle revision {bundle.revision} enforces but could not be kept in "
                             f"{self.store.directory} (a restart runs the previous one): {exc}")

    def _note_error(self, text: str) -> None:
        with self._lock:
            self.last_error = text


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))
