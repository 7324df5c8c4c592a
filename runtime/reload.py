"""Hot reload: a new trap plan takes over from the running one with no moment unenforced.

`reload_plan(enforcer, plan, symbols) -> ReloadResult` (also `Enforcer.reload`) is the one entry
point; `policyc run` calls it on SIGHUP and on `policyc reload`, and `policyc test` for a scenario's
`{op: reload}` step. Keep last good: every failure before the switch leaves the running plan as it
was, enforcing, and says where it failed (`stage`: bind, capability, install).

The change is one transaction, the domain paused throughout (as install does):

1. bind the new plan to the guest (reads only) and check that the host can hold it *beside* the
   running one (its views as well as the running plan's);
2. pause; answer every request already on the ring with the running plan (a vCPU in the middle of
   single-stepping over an allowed access, or over a page-table write the running plan follows, is
   let finish its step first), so each event in flight is decided by exactly one plan, the one its
   decision record names; then re-walk the new plan's binding, since the guest's page tables may
   have changed since step 1 (a remap that landed in between, or one just stepped);
3. build the new plan beside the old (`Installation._arm`): new views, their access, shadow-frame
   breakpoints, monitors the old plan lacked. What both plans need stays as it is: the host view's
   access is changed in place frame by frame (never relaxed before the switch), monitors enabled
   with the same settings and inline breakpoints at the same address are not touched;
4. build the new decision engine, then switch every vCPU to the new default view and the enforcer
   to the new engine and plan hash;
5. release what only the old plan needed (its views, shadow frames, inline breakpoints, monitors,
   host-view restrictions), then unpause.

A failure in steps 1-4 undoes what step 3 built (the beside installation's own journal) and
unpauses: the old plan enforces as before. A failure in step 5 comes after the switch: the new plan
enforces, the piece that could not be released stays in the journal (teardown and `recover` undo
it) and the result lists it in `released_late`.

The journal on disk holds both plans' entries while the transaction runs (`Installation.pending`),
and the pre-install view switch is moved last before the switch, so `recover` after a kill at any
point switches the vCPUs back before it destroys a view.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

from .backend import BackendError
from .bind import BindError, bind_plan
from .install import Installation, InstallError
from .journal import describe_entry, undo_entry

__all__ = ["ReloadResult", "reload_plan", "reload_from_file", "scenario_reloader"]

STEP_ROUNDS = 64          # unpause/answer rounds to let single-stepping vCPUs finish before a switch


@dataclass
class ReloadResult:
    """What one reload did. `ok`: the new plan enforces (or it was the running plan already:
    `unchanged`); otherwise the old plan still does and `stage`/`error` say why."""

    ok: bool
    old_hash: str
    new_hash: str
    stage: str = ""                     # where it failed: source, bind, capability, install
    error: str = ""
    unchanged: bool = False
    answered_before_switch: int = 0     # requests in flight, answered by the old plan
    released_late: list[str] = field(default_factory=list)     # old-only pieces teardown will remove
    seconds: float = 0.0

    @property
    def result(self) -> str:
        """The label a metrics counter uses: ok, unchanged, failed."""
        return "unchanged" if self.unchanged else "ok" if self.ok else "failed"

    def as_dict(self) -> dict[str, Any]:
        return {"result": self.result, "old_plan": self.old_hash, "new_plan": self.new_hash,
                "stage": self.stage, "error": self.error,
                "answered_before_switch": self.answered_before_switch,
                "released_late": list(self.released_late), "seconds": round(self.seconds, 4)}

    def describe(self) -> str:
        if self.unchanged:
            return f"reload: plan {self.new_hash[:19]}… is the one running; nothing changed"
        if self.ok:
            late = (f"; {len(self.released_late)} old piece(s) could not be released yet (teardown removes "
                    f"them): {self.released_late[0]}") if self.released_late else ""
            return (f"reloaded: plan {self.old_hash[:19]}… -> {self.new_hash[:19]}… in {self.seconds:.3f} s, "
                    f"{self.answered_before_switch} request(s) in flight answered by the old plan{late}")
        return f"reload FAILED ({self.stage}): {self.error}; still enforcing plan {self.old_hash[:19]}…"


def failed(old_hash: str, new_hash: str, stage: str, error: str) -> ReloadResult:
    """A reload that did not happen (the old plan enforces): for callers that fail before the enforcer
    is reached, e.g. a policy that does not compile."""
    return ReloadResult(False, old_hash, new_hash, stage=stage, error=error)


def reload_plan(enforcer: Any, plan: Mapping[str, Any], symbols: Any) -> ReloadResult:
    """Replace the enforcer's running plan by `plan` as one transaction (module docstring)."""
    t0 = time.monotonic()
    old_hash, new_hash = enforcer.plan.get("content_hash", ""), plan.get("content_hash", "")
    inst: Installation | None = enforcer.installation
    if inst is None or inst.torn_down:
        return failed(old_hash, new_hash, "install", "the enforcer is not enforcing")
    if new_hash and new_hash == old_hash:
        return ReloadResult(True, old_hash, new_hash, unchanged=True)
    if enforcer.recorder is not None:
        return failed(old_hash, new_hash, "install", "a recorded run (--record) cannot reload: a trace replays "
                                                     "under one plan")
    backend = enforcer.backend
    try:
        bound = bind_plan(plan, backend, symbols, slide=enforcer.slide)
    except (BindError, BackendError) as exc:
        return failed(old_hash, new_hash, "bind", f"cannot bind the plan to the guest: {exc}")
    beside = Installation(bound, backend, _SavedWith(inst))
    beside.view_map[0] = 0
    try:
        caps = backend.capabilities()
        beside._check(caps)
        _check_room(inst, bound, caps)
    except InstallError as exc:
        return failed(old_hash, new_hash, "capability", str(exc))
    except BackendError as exc:
        return failed(old_hash, new_hash, "capability", f"capabilities: {exc}")
    try:
        inst._pause()
    except BackendError as exc:
        return failed(old_hash, new_hash, "install", f"pause: {exc}")
    result = ReloadResult(True, old_hash, new_hash)
    moved: list[dict[str, Any]] = []
    try:
        _build_and_switch(enforcer, inst, beside, caps, plan, moved, result)
    except BaseException as exc:  # noqa: BLE001 - any failure before the switch keeps the old plan
        result = failed(old_hash, new_hash, "install", f"{type(exc).__name__}: {exc}"
                        if not isinstance(exc, (BackendError, InstallError)) else str(exc))
        undo_errors = _roll_back(inst, beside, moved)
        if undo_errors:
            result.error += (f"; rolling back the new plan's pieces failed ({'; '.join(undo_errors[:3])}): they "
                             "stay in the journal for teardown and 'policyc recover'")
        if not isinstance(exc, Exception):
            raise                               # an interrupt: rolled back, and it goes on up
    finally:
        _unpause(enforcer, inst, result)
    if result.ok:
        enforcer.symbols = symbols
    result.seconds = time.monotonic() - t0
    return result


def reload_from_file(enforcer: Any, path: str, target: str | None, *, symbols_dir: str | None = None,
                     audit: bool = False) -> ReloadResult:
    """Compile a policy (or load a compiled plan) and reload it; a source that gives no plan is a failed
    reload like any other (stage `source`, the first error with its position). Counted and logged."""
    from ..plan_source import PlanSourceError, load_plan_source

    try:
        compiled = load_plan_source(path, target, audit=audit, symbols_dir=symbols_dir)
    except PlanSourceError as exc:
        result = failed(enforcer.plan.get("content_hash", ""), "", "source", exc.first_error())
        enforcer.note_reload(result)
        return result
    return enforcer.reload(compiled.plan, compiled.symbols)


def scenario_reloader(enforcer: Any, target: str | None,
                      results: list[tuple[int, ReloadResult]] | None = None) -> Callable[[Any, int], bool]:
    """What a `ScenarioRunner` calls for a scenario's `{op: reload, policy|plan: FILE}` step: reload
    `enforcer` from the file (compiled quietly: a broken policy is what a test reloads on purpose),
    noting each result with the top-level step it belongs to in `results`."""
    def reload_step(step: Any, index: int) -> bool:
        result = reload_from_file(enforcer, step.source, target)
        if results is not None:
            results.append((index, result))
        return result.ok
    return reload_step


# --------------------------------------------------------------------------- the transaction

class _SavedWith:
    """The state record of an installation built beside a running one: each save writes the running
    installation's record, which holds both journals (`Installation.pending`)."""

    def __init__(self, running: Installation) -> None:
        self.running = running
        self.path = running.record.path
        self.data: dict[str, Any] = {}

    def save(self, _journal: Sequence[Mapping[str, Any]]) -> None:
        self.running._save()

    def delete(self) -> None:
        pass


def _unpause(enforcer: Any, inst: Installation, result: ReloadResult) -> None:
    """Give back the reload's pause: a guest left paused is an outage, so a failed unpause is tried
    again at once (and, failing that, at teardown, which gives back every pause it holds)."""
    for attempt in range(2):
        try:
            inst._unpause()
            return
        except BackendError as exc:
            if attempt:
                enforcer.effect_errors.append(f"reload: unpause failed: {exc}")
                result.released_late.append(f"unpause: {exc} (given back at teardown)")


def _check_room(inst: Installation, bound: Any, caps: Any) -> None:
    running = sum(1 for v in inst.view_map if v != 0)
    wanted = sum(1 for v in bound.views if v != 0)
    if wanted and running + wanted + 1 > caps.max_views:
        raise InstallError(f"the new plan's {wanted} view(s) are built beside the running plan's {running}, and "
                           f"the host allows {caps.max_views} views in all")


def _build_and_switch(enforcer: Any, inst: Installation, beside: Installation, caps: Any,
                      plan: Mapping[str, Any], moved: list[dict[str, Any]], result: ReloadResult) -> None:
    """Steps 2-5 (the domain is paused). Raises only before the new plan is adopted; a failure to
    adopt it after the switch puts the vCPUs back in the running plan's view first."""
    result.answered_before_switch = _answer_in_flight(enforcer, inst, caps)
    enforcer.idle()                            # arm64: relaxed pages re-armed under the old plan first
    # The binding of step 1 was walked with the guest running: a page-table write that landed since
    # (the running plan followed it, for its own binding only) would leave the new plan watching the
    # frame the protected address no longer maps. The guest is paused now: walk again.
    beside.bound.rebind(inst.backend)
    inst.pending = beside.journal              # saved with ours: `recover` sees both while we build
    planted = {e["pa"]: e for e in inst.journal if e["op"] == "bytes"}
    beside._arm(caps, planted=planted)
    engine, native = enforcer.build_engines(beside, plan.get("content_hash", ""))
    backend = inst.backend
    default = beside.bound.default_view()
    switch_entry = next((e for e in inst.journal if e["op"] == "switch_view"), None)
    running_view = _running_view(inst) if switch_entry is not None or default is not None else 0
    if switch_entry is not None:
        inst.journal.remove(switch_entry)
        moved.append(switch_entry)
    elif default is not None:
        switch_entry = {"op": "switch_view", "view": running_view}
    if switch_entry is not None:
        beside.journal.append(switch_entry)    # last: undone first, before any view is destroyed
        inst._save()
        backend.switch_view(beside.view_map[default] if default is not None else switch_entry["view"])
    try:
        enforcer.adopt_plan(plan, beside.bound, engine, native)
    except BaseException:
        # The vCPUs are in the new plan's view but the old plan still decides: put them back before
        # the rollback destroys that view (a view in use cannot be destroyed, and the old plan's
        # traps are in its own view).
        if switch_entry is not None:
            backend.switch_view(running_view)
        raise
    # -- switched: from here the new plan decides every event; nothing below may undo that
    try:
        result.released_late = _release_old(inst, beside)
    except Exception as exc:  # noqa: BLE001 - a state record that cannot be written, say
        result.released_late.append(f"releasing the old plan's pieces: {exc}")


def _running_view(inst: Installation) -> int:
    """The view the running plan keeps its vCPUs in (what a failed reload switches back to)."""
    current = getattr(inst.backend, "current_view", None)
    if callable(current):
        return current(0)
    default = inst.bound.default_view()
    return inst.view_map[default] if default is not None else 0


def _answer_in_flight(enforcer: Any, inst: Installation, caps: Any) -> int:
    """Answer what is on the ring with the running plan; a vCPU single-stepping over an access that
    plan allowed (in its step view) is let run its one instruction, and that event is answered too.
    A page-table write stepped with an event (runtime/pt_step.py) is known to the running engine, also
    where the backend cannot say which vCPUs step (Xen has no such call): its vCPU runs its one
    instruction, and the running plan follows the write and puts it back in its view. Without MTF an
    allowed page-table write completes only when its vCPU runs on: it is let run until the running
    plan has followed the write (or given up on it, as it would outside a reload)."""
    before = enforcer.responses
    backend_stepping = getattr(inst.backend, "single_stepping", None)

    def stepping(vcpu: int) -> bool:
        if callable(backend_stepping) and backend_stepping(vcpu):
            return True
        return enforcer.engine is not None and vcpu in enforcer.engine.pt_steps.pending

    for _ in range(STEP_ROUNDS):
        enforcer.service()
        if not any(stepping(v) for v in range(caps.vcpus)) and not enforcer.page_table_writes_unfollowed():
            break
        inst._unpause()
        inst.backend.wait(0.001)
        inst._pause()
    else:
        raise InstallError(f"a vCPU was still single-stepping after {STEP_ROUNDS} rounds")
    return enforcer.responses - before


def _roll_back(inst: Installation, beside: Installation, moved: list[dict[str, Any]]) -> list[str]:
    """Undo what the transaction built; the running plan's journal is as it was."""
    for e in moved:
        beside.journal.remove(e)
        inst.journal.append(e)
    errors = beside._undo_all()
    inst.leftover += beside.leftover          # undo failures: kept for teardown and recover
    inst.pending = []
    inst._save()
    return errors


def _release_old(inst: Installation, beside: Installation) -> list[str]:
    """After the switch: remove what only the old plan needed; adopt the new plan's journal. Returns
    what could not be removed (it stays in the journal: teardown and recover undo it)."""
    new_monitors = {_monitor_key(e) for e in beside.journal if e["op"] == "monitor"}
    wanted_monitors = _wanted_monitor_keys(beside.bound.plan)
    keep_altp2m = any(v != 0 for v in beside.view_map)
    new_host = beside._access_entries.get(0)
    kept: list[dict[str, Any]] = []
    late: list[str] = []
    dead_views: set[int] = set()
    stuck_views: set[int] = set()

    def undo(entry: dict[str, Any]) -> bool:
        try:
            undo_entry(inst.backend, entry)
            return True
        except Exception as exc:  # noqa: BLE001 - the new plan enforces; teardown retries this
            late.append(f"{describe_entry(entry)}: {exc}")
            kept.append(entry)
            return False

    old_views = {e["view"] for e in inst.journal if e["op"] == "view"}
    for entry in reversed(inst.journal):
        op = entry["op"]
        if op == "monitor":
            if _monitor_key(entry) in wanted_monitors:
                kept.append(entry)             # both plans: armed throughout, the old entry knows its prior
            else:
                undo(entry)
        elif op == "bytes":
            if entry in beside._inline.values():
                kept.append(entry)
            else:
                undo(entry)
        elif op == "shadow":
            if not undo(entry):                # its views stay until teardown has undone it
                stuck_views.update(entry.get("views", {}), entry.get("restricted", {}))
        elif op == "access" and entry["view"] in old_views:
            kept.append(entry)                 # dropped below once its view is gone
        elif op == "access":                   # the host view, shared: one entry, the original access kept
            _merge_host_access(inst, entry, new_host, undo)
        elif op == "view":
            if entry["view"] in stuck_views:
                kept.append(entry)
            elif undo(entry):
                dead_views.add(entry["view"])
        elif op == "altp2m":
            if keep_altp2m:
                kept.append(entry)
            else:
                undo(entry)
        else:
            kept.append(entry)
    kept = [e for e in kept if not (e["op"] == "access" and e["view"] in dead_views)]
    # the old plan's entry stays for a monitor both plans use (its `previous` is the pre-install setting)
    fresh = [e for e in beside.journal if not (e["op"] == "monitor" and _monitor_key(e) in new_monitors
                                               and any(_monitor_key(k) == _monitor_key(e) for k in kept
                                                       if k["op"] == "monitor"))]
    journal = sorted(list(reversed(kept)) + fresh, key=lambda e: _RANK.get(e["op"], 2))
    inst.bound, inst.view_map = beside.bound, beside.view_map
    inst.journal, inst.pending = journal, []
    inst._access_entries = {e["view"]: e for e in journal if e["op"] == "access"}
    inst._shadows, inst._inline = beside._shadows, beside._inline
    inst.skipped_frames = beside.skipped_frames
    inst.record.data["plan"] = (beside.bound.plan.get("policy") or {}).get("name")
    inst.record.data["plan_hash"] = beside.bound.plan.get("content_hash")
    inst._save()
    return late


_RANK = {"altp2m": 0, "view": 1, "switch_view": 3}     # undone last, early, first (the journal is undone in reverse)


def _merge_host_access(inst: Installation, old: dict[str, Any], new: dict[str, Any] | None, undo: Any) -> None:
    """The host view's access entry: frames only the old plan restricted go back to their original
    access; frames the new plan restricts keep the original (pre-install) access as their prior."""
    new_prior = new["prior"] if new is not None else {}
    gone = {g: a for g, a in old["prior"].items() if g not in new_prior}
    for g in list(new_prior):
        if g in old["prior"]:
            new_prior[g] = old["prior"][g]
    if gone:
        undo({"op": "access", "view": old["view"], "prior": gone})


def _monitor_key(entry: Mapping[str, Any]) -> tuple:
    return (entry["kind"], entry.get("index"), entry.get("msr"))


def _wanted_monitor_keys(plan: Mapping[str, Any]) -> set[tuple]:
    mons = plan.get("monitors") or {}
    keys = {("write_ctrlreg", m["index"], None) for m in mons.get("write_ctrlreg", ())}
    keys |= {("mov_to_msr", None, int(m["msr"], 16)) for m in mons.get("mov_to_msr", ())}
    keys |= {(k, None, None) for k, v in mons.items() if v and k not in ("write_ctrlreg", "mov_to_msr",
                                                                         "defer_register_writes")}
    return keys


def reload_results_summary(results: Sequence[ReloadResult]) -> str:
    """One line for a run's summary: how many reloads took, failed, changed nothing."""
    ok = sum(1 for r in results if r.result == "ok")
    bad = sum(1 for r in results if r.result == "failed")
    same = sum(1 for r in results if r.result == "unchanged")
    return f"reloads: {ok} applied, {bad} failed (old plan kept), {same} unchanged"
