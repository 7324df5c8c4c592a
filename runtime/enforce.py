"""The enforcer: a trap plan bound to one guest, every event answered, the guest left as it was.

`Enforcer(plan, backend, symbols, guest=...)` is the product's main loop:

* `start()` binds the plan to the guest (runtime/bind.py: the slide found from
  the guest itself, regions translated through its page tables) and installs
  it (runtime/install.py: one journalled transaction that leaves the guest as
  it was on any failure). The decision engine is built once, from the
  installed plan (view ids as the backend handed them out).
* `service()` answers everything on the ring now, in batches. Per batch, in
  this order (runtime/decide.py says why): take the requests; record them
  (`--record`); decide; write the decision log, flushed; perform the
  before-response effects (exception injection, arm64 relax, breakpoint
  restore); put the responses and notify; perform the after-response effects
  (domain pause, disarm). Deciding is native (`runtime/native_engine.py`)
  for every event the C engine can express and by the Python engine for the
  rest (the events with side effects among them). On a backend that keeps no
  books on the ring (`native_ring()`: the simulator) and without `--record`,
  a batch the C engine decides whole is drained, decided, logged (one write)
  and answered in one native call. An `observer` (policy tests) keeps the
  Python engine alone. Then follow page-table writes: a write to a
  page-table frame that maps a protected page was allowed (the guest's own
  page tables change all the time) and, once it has landed, the binding is
  re-walked (`Installation.rebind_after_pt_write`): a protected region whose
  page was remapped to a fresh frame is watched on the new frame before the
  old one is released, and the engine's tables are rebuilt.
* `run(stop)` waits on the event channel and services until `stop()` is true
  or SIGINT/SIGTERM arrives; teardown happens on every exit
  (`run_with_teardown`).
* `stop()` tears down: answers whatever is pending, removes every trap,
  view, breakpoint and monitor, unpauses.

Counters: `requests` taken, `responses` put, `records` written, `rebinds`.
The invariant the tests hold the enforcer to: requests == responses ==
records, and no vCPU left paused.

Where the plan steps accesses over with FAST_SINGLESTEP (x86_64, MTF), such
a write is stepped with an event instead (runtime/pt_step.py): the re-walk
happens while that event holds the vCPU, after the store and before the
guest's next instruction. Elsewhere (no MTF) the guest's store completes
when the vCPU resumes after the response, asynchronously to us: the rebind
re-walks right after the notify and once more at the next batch, so a store
that had not landed yet is still followed, one batch later, and in between
the guest may write through the remapped address unwatched.
"""

from __future__ import annotations

import errno
import os
import sys
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

from .backend import BackendError
from .bind import BoundPlan, bind_plan
from .decide import AFTER, BEFORE, Decision, DecisionEngine, SideEffect
from .decision_log import DecisionLog, Progress
from .install import Installation, install, run_with_teardown
from .native_engine import NativeEngine, NativeLogError, native_available, native_clock_request
from .pt_step import STEP_RESPONSE
from ..errors import PolicycError
from ..gc_pause import freeze_long_lived, refreeze_long_lived, release_long_lived

# How long one `service()` call from the run loop goes on answering a ring that never empties before
# it returns (the loop then sees signals and stop requests, and calls it again).
SERVICE_SLICE_S = 0.05

if TYPE_CHECKING:
    from .budget import Budget
    from .reload import ReloadResult

__all__ = ["Enforcer", "EnforcerError", "BATCH"]

BATCH = 64              # requests taken per ring read (the ring has 8 slots; more arrive while we decide)


class EnforcerError(PolicycError, RuntimeError):
    """The enforcer could not start (binding or install failed); the guest is as it was."""


_LOG_FAILURE_WORDS = {
    "fail-closed": "enforcing goes on, decisions are counted but not recorded",
    "allow-and-count": "from now on every request is allowed and counted (--on-log-failure allow-and-count)",
    "stop": "stopping: the guest is torn down to its state before install (--on-log-failure stop)",
}


@dataclass
class _PendingRebind:
    gfn: int
    offset: int
    retries: int = 1


LOG_FAILURE_MODES = ("fail-closed", "allow-and-count", "stop")


class Enforcer:
    """One plan enforced on one guest. Use as a context manager, or `start()` ... `stop()`.

    `on_log_failure` (set before `start`) says what happens once the decision log cannot be written;
    every request is answered in each mode and the decisions not recorded are counted (`unlogged`):
    "fail-closed" (the default: protection over records) goes on deciding by the policy, denies
    included; "allow-and-count" answers allow from then on (audit mode: a deny is logged nowhere,
    counted as would-deny); "stop" sets `stop_requested`: the run loop ends and tears down."""

    on_log_failure: str = "fail-closed"
    stop_requested: bool = False

    def __init__(self, plan: Mapping[str, Any], backend: Any, symbols: Any, *, guest: str,
                 log: DecisionLog | None = None, recorder: Any = None, state_dir: Any = None,
                 slide: int | None = None, batch: int = BATCH,
                 observer: Callable[[Sequence[tuple[bytes, Decision]], Sequence[bytes]], None] | None = None,
                 clock: Callable[[], float] = time.monotonic, native: bool = True) -> None:
        self.plan = plan
        self.backend = backend
        self.symbols = symbols
        self.guest = guest
        self.log = log if log is not None else DecisionLog(None)
        self.recorder = recorder
        self.state_dir = state_dir
        self.slide = slide
        self.batch = batch
        self.clock = clock
        self.observer = observer              # sees each batch's decisions with its requests (policy tests)
        self.bound: BoundPlan | None = None
        self.installation: Installation | None = None
        self.engine: DecisionEngine | None = None
        # The native engine answers what it can express; an observer (policy tests) needs every
        # decision as an object, so it keeps the Python engine alone.
        self.use_native = native and observer is None and native_available()
        # a bad $POLICYC_NATIVE_CLOCK is refused here, before anything is installed
        self.native_clock = native_clock_request() if self.use_native else None
        self.native: NativeEngine | None = None
        self.startup_seconds: dict[str, float] = {}   # bind, install, engine: set by start()
        self.requests = 0
        self.responses = 0
        self.records = 0
        self.rebinds: list[dict[str, Any]] = []
        self.effect_errors: list[str] = []
        self.pauses = 0                       # domain pauses the policy's `pause` action asked for
        self.unlogged = 0                     # decisions answered while the log could not be written
        self.log_error: str | None = None
        self._pending_rebinds: list[_PendingRebind] = []
        self._native_path: tuple[Any, Any, Any] | None = None    # (ring, kick, wait) for native service, once known
        self.reloads: list[ReloadResult] = []  # every reload tried, in order (runtime/reload.py)
        self.budget: Budget | None = None       # the global event budget (runtime/budget.py), set before start
        self.ring_slots = 8                     # the ring's request slots (from the backend at start)
        self.ring_full_seen = 0                 # ring reads that found every slot taken
        self._frozen = False                    # our graph is frozen from the collector (start to teardown)

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> Installation:
        """Bind and install. Raises `EnforcerError` (the guest untouched) when either fails."""
        from .bind import BindError
        from .install import InstallError

        backend = self.recorder.wrap(self.backend) if self.recorder is not None else self.backend
        t0 = time.monotonic()
        try:
            self.ring_slots = getattr(self.backend.capabilities(), "ring_slots", 8)
            self.bound = bind_plan(self.plan, backend, self.symbols, slide=self.slide)
        except (BindError, BackendError) as exc:      # binding only reads the guest: nothing to undo
            raise EnforcerError(f"cannot bind the plan to guest '{self.guest}': {exc}") from None
        t1 = time.monotonic()
        try:
            self.installation = install(self.bound, backend, guest=self.guest, state_dir=self.state_dir)
        except InstallError as exc:
            raise EnforcerError(f"cannot install on guest '{self.guest}': {exc} (nothing was left behind)") \
                from None
        t2 = time.monotonic()
        self.engine, self.native = self.build_engines(self.installation, self.log.plan_hash)
        # The plan, binding and tables live as long as the enforcer: keep the cyclic GC from scanning
        # them on every full collection (with 100,000 regions that scan dominated decision time).
        # Given back at a reload and at teardown (policyc/gc_pause.py).
        freeze_long_lived()
        self._frozen = True
        if self.recorder is not None:
            self.recorder.installed(self.installation)
        # How long the guest ran unprotected after the plan was ready: what an operator sizing a
        # start-up window needs, per phase (the page walks, the hypercalls, the lookup tables).
        self.startup_seconds = {"bind": round(t1 - t0, 3), "install": round(t2 - t1, 3),
                                "engine": round(time.monotonic() - t2, 3)}
        return self.installation

    def reload(self, plan: Mapping[str, Any], symbols: Any) -> "ReloadResult":
        """Replace the running plan by `plan` without a moment unenforced; on any failure the running
        plan keeps enforcing (runtime/reload.py). Every result is kept in `reloads`."""
        from .reload import reload_plan

        result = reload_plan(self, plan, symbols)
        self.note_reload(result)
        if self._frozen and result.ok and not result.unchanged:
            refreeze_long_lived()              # the old plan's graph was frozen: now it is garbage
        return result

    def note_reload(self, result: "ReloadResult") -> None:
        """Count a reload's result, say it in the decision log and count it as a plan activation on the
        metrics server, if one runs (also for a reload that failed before it reached the enforcer: a
        policy that does not compile)."""
        from .metrics import record_activation

        self.reloads.append(result)
        self.log.event("reload", result.as_dict(), alert=None if result.ok else result.describe())
        if not result.unchanged:             # a reload to the running plan activates nothing
            record_activation(self.plan if result.ok else None, "success" if result.ok else "failure")

    def build_engines(self, installation: Installation, plan_hash: str) -> tuple[DecisionEngine, NativeEngine | None]:
        """The decision engines for an installation's plan (view ids as the backend handed them out)."""
        engine = DecisionEngine(installation.engine_plan(), installation.bound, clock=self.clock)
        engine.budget = self.budget
        if self.engine is not None:
            engine.audit = engine.audit or self.engine.audit     # allow-and-count after a log failure stays
        native = None
        if self.use_native:
            inst = self.installation if self.installation is not None else installation
            native = NativeEngine(engine, plan_hash=plan_hash, pt_frames=lambda: inst.bound.pt_frames,
                                  python_denies=getattr(self.backend, "python_denies", ()), clock=self.native_clock)
        return engine, native

    def adopt_plan(self, plan: Mapping[str, Any], bound: BoundPlan, engine: DecisionEngine,
                   native: NativeEngine | None) -> None:
        """Switch to a reloaded plan's engines: every later decision is the new plan's, and its
        records name its hash."""
        if self.native is not None and self.native is not native:
            self.native.detach()
        self.plan, self.bound, self.engine, self.native = plan, bound, engine, native
        self.log.plan_hash = plan.get("content_hash", "")
        self._pending_rebinds = []

    def stop(self) -> list[str]:
        """Tear down (idempotent). Returns teardown errors (empty when the guest is as it was)."""
        if self.installation is None:
            return []
        from .install import TeardownError

        try:
            self.service(slice_s=SERVICE_SLICE_S)    # teardown answers whatever arrives after
        finally:
            try:
                errors = self.installation.teardown()
            except TeardownError as exc:        # the state record stays for `policyc recover`
                errors = exc.errors + [f"state record kept at {exc.state_path} for 'policyc recover'"]
            self.log.flush()
            if self.recorder is not None:
                self.recorder.close()
            self._thaw()
        return errors

    def _thaw(self) -> None:
        if self._frozen:
            self._frozen = False
            release_long_lived()

    def __enter__(self) -> "Enforcer":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ the loop
    def run(self, stop: Callable[[], bool] | None = None, *, wait: float = 0.1,
            progress: Progress | None = None) -> None:
        """Service until `stop()` is true or a signal arrives; tears down on every way out."""
        assert self.installation is not None, "start() first"
        backend = self.backend

        def step() -> bool:
            if self.stop_requested or (stop is not None and stop()):
                return False
            if self._native_waits():
                if not self.service(wait=wait, slice_s=SERVICE_SLICE_S):   # waits in C while the ring is empty
                    self.idle()
            elif backend.wait(wait):
                self.service(slice_s=SERVICE_SLICE_S)
            else:
                self.idle()
            if progress is not None:
                progress.update(self.log)
            return True

        try:
            run_with_teardown(self.installation, step)
        finally:
            self.log.flush()
            if self.recorder is not None:
                self.recorder.close()
            if progress is not None:
                progress.finish()
            self._thaw()

    def service(self, wait: float = 0.0, *, slice_s: float | None = None) -> int:
        """Answer every request on the ring now; returns how many were answered. With `wait`, when
        the backend's wait is native (`native_wait()`), go on answering what arrives for up to that
        long in one native call (`run` does; the ring's wait is then never a Python call). With
        `slice_s`, return after about that long (or `wait`) even if the ring never empties."""
        inst, engine = self.installation, self.engine
        assert inst is not None and engine is not None, "start() first"
        answered = 0
        self._retry_rebinds()
        if inst.notify_owed:                   # responses on the ring that Xen was never told of
            inst.notify()
        ring, notify, native_wait = self._native_path or self._find_native_path()
        # Bounded: a guest that traps as fast as it is answered keeps the ring busy for ever, and
        # the run loop must still see SIGTERM and stop requests (a signal handler only sets a flag).
        deadline = None if slice_s is None else time.monotonic() + max(wait, slice_s)
        while deadline is None or not answered or time.monotonic() < deadline:
            pt_writes: list[tuple[int, int]] = []
            landed: list[tuple[int, int]] = []       # stepped page-table writes, their vCPU still held
            watch = self._page_table_watch(pt_writes, landed)
            if ring is not None:
                # Native calls drain, decide, log and answer; they hand back what needs Python.
                try:
                    taken, served, batch = self.native.service_ring(ring, self.log, self.batch, on_python=watch,
                                                                    notify=notify, wait=native_wait, wait_s=wait)
                except NativeLogError as exc:
                    self._count_served(exc.served, notify)
                    self._after_native_kick()
                    answered += exc.served
                    inst.adopt_requests(exc.requests)
                    self.requests += len(exc.requests)
                    self._log_lost(len(exc.requests), exc)
                    inst.put_responses(exc.responses)
                    self.responses += len(exc.responses)
                    answered += len(exc.responses)
                    continue
                self._count_served(served, notify)
                if self._after_native_kick() or not taken:
                    break
                self._note_taken(taken)
                answered += served
                if batch is None:
                    if notify is not None or served < self.batch:
                        break             # the ring was drained: a later request wakes wait()
                    continue
                self.requests += taken - served
                reqs = batch.requests
                inst.adopt_requests(reqs)
            else:
                reqs = inst.take_requests(self.batch)
                if not reqs:
                    break
                self._note_taken(len(reqs))
                self.requests += len(reqs)
                if self.recorder is not None:
                    self.recorder.requests(reqs)
                batch = self.native.decide_batch(reqs, self.log, on_python=watch) if self.native else None
            if batch is not None:
                # Native where it could; the Python engine's decisions are the ones with side effects.
                responses = batch.responses
                pairs = [(rsp, d) for _i, rsp, d in batch.decisions]
                self._write_log(len(reqs), lambda: self.log.write_text(batch.text, batch.alerts))
            else:
                pairs = engine.decide_batch(reqs)
                responses = [rsp for rsp, _ in pairs]
                for _rsp, d in pairs:
                    watch(d)
                if self.observer is not None:
                    self.observer(pairs, reqs)
                self._write_log(len(reqs), lambda: self.log.write_batch(pairs))
            self._effects(pairs, BEFORE)
            for gfn, offset in landed:              # before the response lets that vCPU run on
                self._rebind(gfn, offset)
            inst.put_responses(responses)
            self.responses += len(responses)
            answered += len(responses)
            self._effects(pairs, AFTER)
            for gfn, offset in pt_writes:
                self._rebind(gfn, offset)
                self._pending_rebinds.append(_PendingRebind(gfn, offset))
        return answered

    def _note_taken(self, taken: int) -> None:
        """A read that found the ring full: vCPUs were (or were about to be) stalled for a slot."""
        if taken >= self.ring_slots:
            self.ring_full_seen += 1

    def _after_log_failure(self) -> None:
        if self.on_log_failure == "allow-and-count":
            engine = self.engine
            assert engine is not None
            engine.audit = True          # every later deny is answered allow (counted as would-deny)
            if self.native is not None:
                self.native.set_audit(True)
        elif self.on_log_failure == "stop":
            self.stop_requested = True

    def idle(self) -> None:
        """The guest is quiet: re-arm pages relaxed for the last event (arm64), and re-check
        page-table writes whose store may have landed late."""
        inst, engine = self.installation, self.engine
        assert inst is not None and engine is not None
        for gfn in engine.take_pending_rearm():
            try:
                inst.rearm_access(gfn)
            except Exception as exc:  # noqa: BLE001 - reported, the loop goes on
                self.effect_errors.append(f"re-arm of {gfn:#x} failed: {exc}")
        self._retry_rebinds()

    def _count_served(self, served: int, native_notify: Any) -> None:
        """Requests the native calls answered whole (the other side kicked already with a native
        notify, else now)."""
        if not served:
            return
        self.requests += served
        self.records += served
        self.responses += served
        if native_notify is None:
            assert self.installation is not None
            self.installation.notify()        # a failed kick is owed and retried, not fatal

    def _native_waits(self) -> bool:
        return (self._native_path or self._find_native_path())[2] is not None

    def _find_native_path(self) -> tuple[Any, Any, Any]:
        """Once: the ring the native calls drain and answer, the backend's kick and its wait as C
        functions (`native_ring()`, `native_notify()`, `native_wait()`), each None where missing:
        then Python takes, notifies or waits instead. They do not change while enforcing."""
        ring = self._native_ring()
        notify = self._native_function("native_notify") if ring is not None else None
        wait = self._native_function("native_wait") if notify is not None else None
        self._native_path = (ring, notify, wait)
        return self._native_path

    def _native_function(self, name: str) -> Any:
        get = getattr(self.backend, name, None)
        return get() if get is not None else None

    def _after_native_kick(self) -> bool:
        """After a native service call: a failed kick is owed (retried as a Python notify is), and a
        failed wait stops the call's loop (a signal: the run loop looks at it; else the backend's
        error, as its `wait` raises). True when the loop must stop."""
        native, inst = self.native, self.installation
        assert native is not None and inst is not None
        if native.notify_failed:
            inst.notify_owed = True
            inst.notify_failures += 1
        err = native.wait_errno
        if not err:
            return False
        if err == errno.EINTR:
            return True
        raise BackendError("wait", f"the event channel's wait failed: {os.strerror(err)}", err)

    def _native_ring(self) -> Any:
        """The ring when the native engine may drain and answer it in one call: a backend that keeps
        no books on requests and responses (`native_ring`), and no recorder (it keeps every request)."""
        if self.native is None or self.recorder is not None:
            return None
        get = getattr(self.backend, "native_ring", None)
        return get() if get is not None else None

    def _write_log(self, count: int, write: Callable[[], object]) -> None:
        """Write a batch's `count` records (before its responses are pushed)."""
        try:
            write()
            self.records += count
        except (OSError, ValueError) as exc:
            self._log_lost(count, exc)

    def _log_lost(self, count: int, exc: Exception) -> None:
        # A log that cannot be written must not leave vCPUs paused nor lift the protection:
        # the batch is answered, the loss is counted and said once, and `on_log_failure` says
        # what enforcing does from then on.
        self.unlogged += count
        if self.log_error is None:
            self.log_error = str(exc)
            what = exc if getattr(exc, "stream", None) else f"the decision log cannot be written ({exc})"
            print(f"policyc: {what}; {_LOG_FAILURE_WORDS[self.on_log_failure]}", file=sys.stderr, flush=True)
            self._after_log_failure()

    # ------------------------------------------------------------------ page-table watch
    def _page_table_watch(self, out: list[tuple[int, int]], landed: list[tuple[int, int]]
                          ) -> Callable[[Decision], None]:
        """A function that notes, for each decision it is given, a write to a watched page-table entry
        (the binding follows it after the response, into `out`; or, when the engine steps it
        (runtime/pt_step.py), once it has landed, into `landed`) and says so in the decision."""
        inst = self.installation
        assert inst is not None

        def watch(d: Decision) -> None:
            if d.pt_write is not None:
                landed.append(d.pt_write)
                return
            if d.kind != "mem_access":
                return
            gfn = d.event.get("gfn")
            if gfn is None or not inst.is_pt_frame(gfn):
                return
            offset = d.event.get("offset", 0)
            users = sorted(inst.bound.pt_entry_users(gfn, offset))
            if not users:
                return
            if (d.verdict == "allow" or d.would_deny) and d.response != STEP_RESPONSE:
                out.append((gfn, offset))
            d.collateral = False               # the engine's "no rule traps this frame" is not the story
            d.note = f"page-table write to an entry that maps {', '.join(users)}: the binding follows it"
        return watch

    def _rebind(self, gfn: int, offset: int) -> bool:
        inst, engine = self.installation, self.engine
        assert inst is not None and engine is not None
        delta = inst.rebind_after_pt_write(gfn, offset)
        if not delta:
            return False
        engine.refresh_binding()
        if self.native is not None:
            self.native.rebuild()
        moved = {}
        for name, (old, new) in delta.regions.items():
            before, after = {g for g, _f, _l in old}, {g for g, _f, _l in new}
            moved[name] = {"from": [hex(g) for g in sorted(before - after)],
                           "to": [hex(g) for g in sorted(after - before)]}
        entry = {"time_ns": time.time_ns(), "gfn": hex(gfn), "offset": offset, "regions": moved,
                 "breakpoints": sorted(delta.breakpoints), "pt_added": [hex(g) for g in sorted(delta.pt_added)]}
        self.rebinds.append(entry)
        where = "; ".join(f"{name}: frame(s) {', '.join(m['from'])} -> {', '.join(m['to'])}"
                          for name, m in sorted(moved.items()))
        self.log.event("rebind", entry, alert=f"a page-table write moved protected memory: {where or 'breakpoints'}; "
                                             "the traps moved with it")
        if self.recorder is not None:
            self.recorder.rebind(gfn, offset)
        return True

    def _retry_rebinds(self) -> None:
        """A page-table store that had not landed when we re-walked is followed one batch later."""
        if not self._pending_rebinds:
            return
        pending, self._pending_rebinds = self._pending_rebinds, []
        for p in pending:
            if not self._rebind(p.gfn, p.offset) and p.retries > 1:
                self._pending_rebinds.append(_PendingRebind(p.gfn, p.offset, p.retries - 1))

    # ------------------------------------------------------------------ side effects
    def _effects(self, pairs: Sequence[tuple[bytes, Decision]], when: str) -> None:
        for _rsp, d in pairs:
            for effect in d.effects:
                if effect.when != when:
                    continue
                try:
                    self._apply(effect, d)
                except Exception as exc:  # noqa: BLE001 - an effect that fails must not cost a response
                    msg = f"decision {d.id}: {effect.kind} failed: {exc}"
                    self.effect_errors.append(msg)
                    self.log.event("effect_error", {"decision": d.id, "effect": effect.as_dict(),
                                                    "error": str(exc)})

    def _apply(self, effect: SideEffect, d: Decision) -> None:
        inst = self.installation
        assert inst is not None
        if effect.apply(self.backend):            # inject, pause
            if effect.kind == "pause":
                self.pauses += 1
                inst.note_policy_pause()
            return
        if effect.kind == "relax_access":
            inst.relax_access(effect.gfn, effect.access)
        elif effect.kind == "rearm":
            inst.rearm_access(effect.gfn)
        elif effect.kind in ("restore_breakpoint",) or (effect.kind == "disarm" and effect.site):
            inst.remove_breakpoint(effect.site)
        elif effect.kind == "disarm":
            pass        # the engine stops matching the rule at once; its trap stays until teardown
        else:
            raise ValueError(f"unknown side effect '{effect.kind}'")

    # ------------------------------------------------------------------ figures
    @property
    def stats(self) -> Any:
        return self.log.stats

    @property
    def events_lost(self) -> dict[str, int]:
        """Events no policy decided, by reason (`policyc_events_lost_total`): ``teardown``, requests
        that came after the last batch and were released undecided by teardown. (A full ring loses no
        event a guest vCPU causes: the vCPU waits for a slot, which `ring_full_seen` and
        `ring_full_stalls` count; Xen drops only events raised from another domain's context, and
        tells nobody. Events past --budget are decided, by their rules' `then` or as would-deny.)"""
        inst = self.installation
        lost = {"teardown": inst.released_undecided if inst is not None else 0}
        return {reason: n for reason, n in lost.items() if n}

    def counters(self) -> dict[str, int]:
        return {"requests": self.requests, "responses": self.responses, "records": self.records,
                "rebinds": len(self.rebinds), "effect_errors": len(self.effect_errors), "unlogged": self.unlogged,
                "over_budget": self.budget.over if self.budget is not None else 0,
                "ring_full_seen": self.ring_full_seen,
                "ring_full_stalls": int(getattr(self.backend, "ring_full_stalls", 0) or 0),
                "events_lost": sum(self.events_lost.values()),
                "reloads": sum(1 for r in self.reloads if r.result == "ok"),
                "reload_failures": sum(1 for r in self.reloads if r.result == "failed")}
