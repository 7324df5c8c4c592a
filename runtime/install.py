"""Install and teardown of a bound plan, as transactions; recovery after a killed enforcer.

`install(bound, backend)` applies a `BoundPlan` (runtime/bind.py) to the guest
in this order, with the domain paused throughout:

1. altp2m on (unless it already was), then one view per plan view other than
   the host's; the ids the backend hands out are mapped from the plan's and
   the map is recorded (`Installation.view_map`; `engine_plan()` is the plan
   with the ids rewritten, for the decision engine);
2. access per view, on populated frames only (XEN-FACTS: a PVH p2m has
   holes), one `set_access` (multi) call per view;
3. breakpoints. `int3-shadow-frame` (x86_64 with altp2m): per frame, a new
   shadow frame (`add_frame`) gets a copy of the page with 0xCC at each site;
   in every view the sites are planted in, the frame is remapped to the
   shadow (`change_gfn`) and made execute-only there, so the guest's reads
   and writes trap and are stepped in the unrestricted view, which still
   maps the original. `int3-inline-emulate` / `smc-inline`: the instruction
   is written into the guest's own frame;
4. monitors (`plan["monitors"]`), after checking that the host has them.
   `defer_register_writes` (XEN_DOMCTL_MONITOR_OP_CONTROL_REGISTERS, without
   which DENY of a CR/MSR write does nothing, XEN-SEMANTICS §0.1)
   is `Backend.monitor_control_registers(True)`; a backend without it is
   refused rather than installed with DENY silently void;
5. every vCPU switched to the plan's default restricted view;
6. unpause.

Every step that changed something appends an undo entry to a journal before
the next step runs (before the call itself where a call can half-succeed:
`set_access` multi stops at the first bad gfn). Any failure undoes the
journal in reverse and unpauses: the guest is left as it was. The journal is
plain JSON and is written to a state record on disk after every change
(`state_path_for(guest)`: $XDG_RUNTIME_DIR/policyc/<guest>.json or
/tmp/policyc-<uid>/<guest>.json); a clean teardown deletes it.

`Installation.teardown()` (idempotent): pause; answer every pending request
(those the enforcer took and did not answer, and everything still on the
ring) with the echo, so no vCPU stays paused; undo the journal in reverse
(view switch, monitors, page-table watch and access, breakpoint bytes and
shadow frames, views, altp2m); unpause. `run_with_teardown` runs an enforcer
loop with SIGINT/SIGTERM handlers that only set a flag, and tears down on any
exit, exception included (and at interpreter exit).

`recover.recover(backend, state_path)` (`recover.recover_guest(backend, guest)` for
`policyc recover --guest G`) cleans up after an enforcer killed outright, from
the state record alone (XEN-SEMANTICS §7): pause; answer what is on the old
ring if this process can reach it, else disable the monitor ring (clears
every monitor, wakes throttled vCPUs, drops held-back CR/MSR writes),
re-enable it and push one VCPU_PAUSED response per vCPU (Xen matches
responses to nothing and ignores extra unpauses); replay the journal in
reverse; unpause as often as the dead process had paused; if a vCPU is still
paused (its request died with the agent), do the disable / re-enable / bare
responses then. See `RecoveryReport` for what it cannot restore.
"""

from __future__ import annotations

import atexit
import copy
import json
import os
import signal
import threading
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from .backend import ON_OFF_MONITORS, BackendError
from ..targets import runs_on
from .bind import BindDelta, BoundBreakpoint, BoundPlan, intersect_access
from .guest_memory import FRAME_SHIFT, FRAME_SIZE
from .journal import describe_entry, disable_monitor, enable_monitor, set_access_map, teardown_response, undo_entry
from .state_record import StateRecord, domain_identity, pid_alive, remove_stray_temporaries, state_path_for
from ..errors import PolicycError

__all__ = ["Installation", "InstallError", "TeardownError", "install", "remap_view_ids", "run_with_teardown"]

PAGE = FRAME_SIZE


INT3 = b"\xcc"
SMC = (0xD4000003).to_bytes(4, "little")     # smc #0



# --------------------------------------------------------------------------- errors

class InstallError(PolicycError, RuntimeError):
    """Install failed. `cause` is the first failure; `undo_errors` lists undo steps that failed too (then
    the guest is NOT as before and the state record at `state_path` is kept for `recover`)."""

    def __init__(self, message: str, *, cause: BaseException | None = None,
                 undo_errors: Sequence[str] = (), state_path: Path | None = None) -> None:
        if undo_errors:
            message += f"; rollback incomplete ({len(undo_errors)} step(s) failed: {undo_errors[0]}); run " \
                       f"'policyc recover' (state record {state_path})"
        super().__init__(message)
        self.cause = cause
        self.undo_errors = list(undo_errors)
        self.state_path = state_path


class TeardownError(PolicycError, RuntimeError):
    def __init__(self, errors: Sequence[str], state_path: Path | None) -> None:
        super().__init__(f"teardown incomplete ({len(errors)} step(s) failed: {'; '.join(errors[:3])}); "
                         f"state record kept at {state_path} for 'policyc recover'")
        self.errors = list(errors)
        self.state_path = state_path


# --------------------------------------------------------------------------- the installation

class Installation:
    """A bound plan applied to a guest. Use `teardown()` (or `run_with_teardown`) to remove it."""

    def __init__(self, bound: BoundPlan, backend: Any, record: StateRecord) -> None:
        self.bound = bound
        self.backend = backend
        self.record = record
        self.journal: list[dict[str, Any]] = []
        self.view_map: dict[int, int] = {}      # plan view id -> backend view id
        self.paused = 0                         # our outstanding domain pauses
        self.installed = False
        self.torn_down = False
        self.in_flight: dict[int, bytes] = {}   # taken from the ring, not yet answered (by ring order)
        self.notify_owed = False                # responses pushed whose notify failed (retried)
        self.notify_failures = 0
        self.released_undecided = 0             # requests teardown answered with a bare unpause (no decision)
        self._seq = 0
        self._access_entries: dict[int, dict[str, Any]] = {}   # backend view -> its "access" entry
        self._shadows: dict[int, dict[str, Any]] = {}          # gfn -> its "shadow" entry
        self._inline: dict[str, dict[str, Any]] = {}           # site id -> its "bytes" entry
        self._lock = threading.RLock()
        self.teardown_errors: list[str] = []
        self.leftover: list[dict[str, Any]] = []               # entries whose undo failed
        self.skipped_frames: dict[int, list[int]] = {}         # plan view -> unpopulated gfns not set
        self.verified = {"frames": 0, "bytes": 0}              # read back after their undo at teardown
        # A reload's entries for the new plan, saved after ours while it is built (runtime/reload.py)
        self.pending: list[dict[str, Any]] = []

    # ------------------------------------------------------------------ journal
    def _log(self, entry: dict[str, Any]) -> dict[str, Any]:
        self.journal.append(entry)
        self._save()
        return entry

    def _save(self) -> None:
        self.record.data["paused"] = self.paused
        self.record.data["view_map"] = {str(k): v for k, v in self.view_map.items()}
        self.record.save(self.leftover + self.journal + self.pending)

    def note_policy_pause(self) -> None:
        """The policy's `pause` action paused the domain on purpose: recorded, so that `recover` after
        a crash leaves that pause for the operator instead of taking it for a stuck vCPU."""
        self.record.data["policy_paused"] = int(self.record.data.get("policy_paused", 0)) + 1
        self._save()

    def _pause(self) -> None:
        self.paused += 1          # recorded before the call: an extra unpause in recovery is harmless
        self._save()
        try:
            self.backend.pause()
        except BaseException:
            self.paused -= 1
            self._save()
            raise

    def _unpause(self) -> None:
        self.backend.unpause()
        self.paused -= 1
        self._save()

    def _unpause_all(self) -> list[str]:
        """Give back every pause this installation holds; stop at the first that fails (reported)."""
        while self.paused > 0:
            try:
                self._unpause()
            except Exception as exc:  # noqa: BLE001
                return [f"unpause: {exc}"]
        return []

    def _undo_all(self) -> list[str]:
        """Undo the journal newest first. An entry whose undo fails moves to `leftover` (kept in the
        state record for `recover`); undoing goes on."""
        errors = []
        while self.journal:
            entry = self.journal.pop()
            try:
                undo_entry(self.backend, entry)
                errors += self._read_back(entry)
            except Exception as exc:  # noqa: BLE001 - keep undoing; report every failure
                errors.append(f"undo {describe_entry(entry)}: {exc}")
                self.leftover.insert(0, entry)
            if entry["op"] == "access":
                self._access_entries.pop(entry["view"], None)
            elif entry["op"] == "shadow":
                self._shadows.pop(entry["gfn"], None)
            elif entry["op"] == "bytes":
                self._inline.pop(entry["site"], None)
            self._save()
        return errors

    def _read_back(self, entry: Mapping[str, Any]) -> list[str]:
        """After an undo, the hypervisor's own view of what it restored: every frame's access read back
        against what it was before install, and the bytes under each breakpoint. A teardown that
        reports success without looking is what leaves a production guest half-protected."""
        b = self.backend
        if entry["op"] == "access":
            wrong = [(g, a, b.get_access(entry["view"], g)) for g, a in sorted(entry["prior"].items())]
            wrong = [w for w in wrong if w[2] != w[1]]
            self.verified["frames"] += len(entry["prior"]) - len(wrong)
            return [f"view {entry['view']} gfn {g:#x}: access {now} after teardown, {was} before install"
                    for g, was, now in wrong[:8]] + ([f"... {len(wrong) - 8} more frames"] if len(wrong) > 8 else [])
        if entry["op"] == "bytes":
            original, planted = bytes.fromhex(entry["original"]), bytes.fromhex(entry["planted"])
            now = b.read_physical(entry["pa"], len(original))
            if now == original:
                self.verified["bytes"] += 1
            # anything else but our int3 is the guest's own rewrite since (_undo leaves it alone)
            return [f"breakpoint at pa {entry['pa']:#x}: the int3 is still there after teardown"] \
                if now == planted else []
        return []

    # ------------------------------------------------------------------ install steps
    def _install(self) -> None:
        b, bound = self.backend, self.bound
        caps = b.capabilities()
        self._check(caps)
        self._pause()
        self.view_map[0] = 0
        self._arm(caps)                        # 1-4: views, access, breakpoints, monitors
        # 5. every vCPU in the restricted view
        default = bound.default_view()
        if default is not None:
            current = getattr(b, "current_view", None)
            prior = current(0) if callable(current) else 0
            self._log({"op": "switch_view", "view": prior})
            b.switch_view(self.view_map[default])
        # 6. run
        self.record.data["phase"] = "installed"
        self._unpause()
        self.installed = True

    def _arm(self, caps: Any, *, planted: Mapping[int, dict[str, Any]] | None = None) -> None:
        """Install steps 1-4 (views, access, breakpoints, monitors), journalled; the domain is paused.
        A reload runs them for the new plan beside the running one (runtime/reload.py): `planted`
        holds the running plan's inline breakpoints by physical address, which stay as they are."""
        b, bound = self.backend, self.bound
        # 1. altp2m and views
        extra = [v for v in sorted(bound.views.values(), key=lambda v: v.id) if v.id != 0]
        if extra:
            existing = _existing_views(b, caps)
            active = bool(existing)
            getter = getattr(b, "altp2m_get_state", None)
            if callable(getter):
                active = bool(getter())
            if not active:
                self._log({"op": "altp2m"})             # before: turning it off again is harmless
                b.altp2m_set_state(True)
            for v in extra:
                if v.visible_to_guest is False and not callable(getattr(b, "altp2m_set_visibility", None)):
                    raise InstallError(f"view {v.id} must be hidden from the guest's VMFUNC but the backend "
                                       "cannot set view visibility")
                actual = b.create_view(v.default_access)
                self.view_map[v.id] = actual
                self._log({"op": "view", "view": actual, "plan_view": v.id})
                if v.visible_to_guest is False:
                    b.altp2m_set_visibility(actual, False)
        # 2. access per view (populated frames only)
        populated = _populated_among(b, {g for v in bound.views.values() for g in v.access})
        for v in sorted(bound.views.values(), key=lambda v: v.id):
            if not v.access:
                continue
            self._apply_access(v.id, v.access, populated)
        # 3. breakpoints
        self._plant_all(populated, planted or {})
        # 4. monitors
        self._enable_monitors(self.bound.plan.get("monitors") or {}, caps)

    def _check(self, caps: Any) -> None:
        bound = self.bound
        if not runs_on(bound.arch, caps.arch):
            raise InstallError(f"the plan is for {bound.arch}, the host is {caps.arch}")
        extra = [v for v in bound.views.values() if v.id != 0]
        if extra and not caps.altp2m:
            raise InstallError(f"the plan needs {len(extra)} altp2m views; the host has no altp2m")
        if extra and len(extra) + 1 > caps.max_views:
            raise InstallError(f"the plan needs {len(extra) + 1} views; the host allows {caps.max_views}")
        if any(v.access for v in bound.views.values()) and not caps.mem_access:
            raise InstallError("the plan restricts memory access; the host has no mem_access")
        mons = self.bound.plan.get("monitors") or {}
        missing = sorted(k for k in mons if k != "defer_register_writes" and k not in caps.monitors)
        if missing:
            raise InstallError(f"the host lacks the monitor(s) {', '.join(missing)}")
        if mons.get("defer_register_writes"):
            if not callable(getattr(self.backend, "monitor_control_registers", None)):
                raise InstallError("the plan denies CR/MSR writes, which needs XEN_DOMCTL_MONITOR_OP_CONTROL_"
                                   "REGISTERS (op 4); this backend cannot issue it, so DENY would do nothing")

    def _apply_access(self, plan_view: int, access: Mapping[int, str], populated: set[int]) -> None:
        b = self.backend
        actual = self.view_map[plan_view]
        gfns = [g for g in sorted(access) if g in populated]
        skipped = [g for g in access if g not in populated]
        if skipped:
            self.skipped_frames[plan_view] = sorted(skipped)
        entry = self._access_entries.get(actual)
        if entry is None:
            entry = self._access_entries[actual] = {"op": "access", "view": actual, "prior": {}}
            self.journal.append(entry)
        for g in gfns:
            if g not in entry["prior"]:
                entry["prior"][g] = b.get_access(actual, g)
        self._save()                                    # before the call: multi can half-succeed
        set_access_map(b, actual, {g: access[g] for g in gfns})

    # -- breakpoints
    def _plant_all(self, populated: set[int], planted: Mapping[int, dict[str, Any]]) -> None:
        by_gfn: dict[int, list[BoundBreakpoint]] = {}
        for bp in self.bound.breakpoints:
            if bp.mechanism == "int3-shadow-frame":
                by_gfn.setdefault(bp.gfn, []).append(bp)
            elif bp.pa in planted:
                self._inline[bp.id] = planted[bp.pa]     # already there: it stays, in the running journal
            else:
                self._plant_inline(bp)
        for gfn, sites in sorted(by_gfn.items()):
            self._plant_shadow(gfn, sites)

    def _plant_inline(self, bp: BoundBreakpoint) -> None:
        b = self.backend
        planted = SMC if bp.mechanism == "smc-inline" else INT3
        original = b.read_physical(bp.pa, len(planted))
        entry = {"op": "bytes", "site": bp.id, "pa": bp.pa, "original": original.hex(), "planted": planted.hex()}
        self._inline[bp.id] = self._log(entry)
        b.write_physical(bp.pa, planted)

    def _plant_shadow(self, gfn: int, sites: list[BoundBreakpoint]) -> None:
        b = self.backend
        entry: dict[str, Any] = {"op": "shadow", "gfn": gfn, "shadow": None, "views": {}, "restricted": {},
                                 "sites": sorted(s.id for s in sites)}
        self._shadows[gfn] = self._log(entry)
        shadow = b.add_frame()
        entry["shadow"] = shadow
        self._save()
        page = bytearray(b.read_physical(gfn << FRAME_SHIFT, PAGE))
        for s in sites:
            page[s.offset] = INT3[0]
        b.write_physical(shadow << FRAME_SHIFT, bytes(page))
        views = sorted({v for s in sites for v in (s.views or ())})
        for plan_view in views:
            actual = self.view_map[plan_view]
            entry["views"][actual] = b.get_access(actual, gfn)
            self._save()
            b.change_gfn(actual, gfn, shadow)
            # Execute-only: reads and writes of the patched page trap and are stepped in the unrestricted
            # view, which maps the original (the guest never reads its own 0xCC).
            region_access = self.bound.views[plan_view].access.get(gfn, "rwx")
            entry["restricted"][actual] = b.get_access(actual, gfn)
            self._save()
            b.set_access(actual, [gfn], intersect_access(region_access, "x"))

    def _unplant_shadow(self, gfn: int) -> None:
        entry = self._shadows.pop(gfn, None)
        if entry is None:
            return
        undo_entry(self.backend, entry)
        self.journal.remove(entry)
        self._save()

    def refresh_shadow(self, gfn: int) -> None:
        """Re-copy a shadowed page from the original (after the guest legitimately rewrote its code, e.g.
        a static key or ftrace patch stepped in the unrestricted view) and re-plant its 0xCC bytes."""
        entry = self._shadows.get(gfn)
        if entry is None or entry.get("shadow") is None:
            return
        page = bytearray(self.backend.read_physical(gfn << FRAME_SHIFT, PAGE))
        for bp in self.bound.breakpoints:
            if bp.id in entry["sites"]:
                page[bp.offset] = INT3[0]
        self.backend.write_physical(entry["shadow"] << FRAME_SHIFT, bytes(page))

    # -- monitors
    def _enable_monitors(self, mons: Mapping[str, Any], caps: Any) -> None:
        b = self.backend
        if mons.get("defer_register_writes") and callable(getattr(b, "monitor_control_registers", None)):
            b.monitor_control_registers(True)   # stays on until the ring is disabled (§0.1): no undo
        current = b.monitors()
        for m in mons.get("write_ctrlreg", ()):
            want = {"sync": bool(m.get("sync", True)), "onchangeonly": bool(m.get("onchangeonly", False)),
                    "bitmask": int(str(m.get("bitmask", "0x0")), 16)}
            self._enable_one("write_ctrlreg", want, (current.get("write_ctrlreg") or {}).get(m["index"]),
                             index=m["index"])
        for m in mons.get("mov_to_msr", ()):
            msr = int(m["msr"], 16)
            want = {"onchangeonly": bool(m.get("onchangeonly", False))}
            have = current.get("mov_to_msr") or {}
            self._enable_one("mov_to_msr", want, have.get(msr, have.get(hex(msr))), msr=msr)
        for kind in ON_OFF_MONITORS:
            setting = mons.get(kind)
            if not setting:
                continue
            want = {"sync": bool(setting.get("sync", True))} if isinstance(setting, Mapping) else {"sync": True}
            self._enable_one(kind, want, current.get(kind))

    def _enable_one(self, kind: str, want: Mapping[str, Any], have: Mapping[str, Any] | None, *,
                    index: str | None = None, msr: int | None = None) -> None:
        b = self.backend
        entry: dict[str, Any] = {"op": "monitor", "kind": kind, "previous": None}
        if index is not None:
            entry["index"] = index
        if msr is not None:
            entry["msr"] = msr
        if have is not None:
            if all(have.get(k) == v for k, v in want.items()):
                return                               # already as wanted (and not ours to disable)
            entry["previous"] = dict(have)           # undo: ours off, the previous setting back on
            self._log(entry)
            disable_monitor(b, entry)
            enable_monitor(b, kind, want, index=index, msr=msr)
            return
        self._log(entry)                             # undo checks whether it is on before disabling
        enable_monitor(b, kind, want, index=index, msr=msr)

    # ------------------------------------------------------------------ the enforcer's ring access
    def take_requests(self, limit: int = 8) -> list[bytes]:
        """`backend.take_requests`, remembering what is taken until it is answered (teardown answers it)."""
        with self._lock:
            if self.notify_owed:
                self.notify()
            reqs = self.backend.take_requests(limit)
            self.adopt_requests(reqs)
            return reqs

    def adopt_requests(self, reqs: Sequence[bytes]) -> None:
        """Requests taken off the ring by native code and not answered there: in flight until
        `put_responses` (teardown answers them otherwise)."""
        with self._lock:
            for r in reqs:
                self.in_flight[self._seq] = r
                self._seq += 1

    def put_responses(self, responses: Sequence[bytes]) -> None:
        """`backend.put_responses` + `notify`; the oldest in-flight requests count as answered."""
        with self._lock:
            self.backend.put_responses(responses)
            for rsp in responses:
                vcpu = int.from_bytes(rsp[12:16], "little")
                for key in sorted(self.in_flight):
                    if int.from_bytes(self.in_flight[key][12:16], "little") == vcpu:
                        del self.in_flight[key]
                        break
            self.notify()

    def notify(self) -> bool:
        """Tell the hypervisor responses are on the ring. A failed notify leaves the answered vCPUs
        paused until a later one reaches Xen: it is owed, retried before the next take and at
        teardown, and counted; it does not stop enforcing (the responses are already on the ring)."""
        try:
            self.backend.notify()
        except BackendError:
            self.notify_owed = True
            self.notify_failures += 1
            return False
        self.notify_owed = False
        return True

    def _drain(self) -> list[str]:
        """Answer every request the enforcer holds and every one on the ring (loop: answering may let a
        vCPU waiting for a slot put its request)."""
        errors: list[str] = []
        b = self.backend
        with self._lock:
            pending = [self.in_flight[k] for k in sorted(self.in_flight)]
            self.in_flight.clear()
            for _ in range(4096):
                try:
                    pending += b.take_requests(64)
                except BackendError as exc:
                    errors.append(f"take_requests: {exc}")
                    break
                if not pending:
                    break
                # Arrived after the enforcer's last batch (or taken and never answered): the guest
                # goes on, but no policy decided these events.
                self.released_undecided += len(pending)
                try:
                    b.put_responses([teardown_response(r) for r in pending])
                    b.notify()
                    self.notify_owed = False
                except BackendError as exc:
                    errors.append(f"answering {len(pending)} pending request(s): {exc}")
                    break
                pending = []
            if self.notify_owed and not self.notify():
                errors.append("notify: the hypervisor was never told of the last responses")
        return errors

    # ------------------------------------------------------------------ page-table watch
    def is_pt_frame(self, gfn: int) -> bool:
        return gfn in self.bound.pt_frames

    def rebind_after_pt_write(self, gfn: int, offset: int | None = None) -> BindDelta:
        """Call after a write to a watched page-table frame was allowed and has completed. Re-walks the
        protected regions; restricts their new frames before relaxing the old ones (no window without a
        trap); moves breakpoints whose page moved; moves the page-table watch. Returns what changed."""
        if gfn not in self.bound.pt_frames:
            return BindDelta()
        if offset is not None and not self.bound.pt_entry_users(gfn, offset):
            return BindDelta()
        with self._lock:
            self._pause()
            try:
                old_bps = {bp.id: bp for bp in self.bound.breakpoints}
                delta = self.bound.rebind(self.backend)
                populated = _populated_among(self.backend, {g for changes in delta.views.values()
                                                             for g in changes})
                moved_gfns = set()
                for old, new in delta.breakpoints.values():
                    moved_gfns |= {old.gfn, new.gfn}
                for plan_view, changes in delta.views.items():
                    self._move_access(plan_view, changes, populated, moved_gfns)
                for site, (old, new) in delta.breakpoints.items():
                    if old.mechanism != "int3-shadow-frame":
                        entry = self._inline.pop(site, None)
                        if entry is not None:
                            undo_entry(self.backend, entry)
                            self.journal.remove(entry)
                        self._plant_inline(new)
                for g in sorted(moved_gfns):
                    self._unplant_shadow(g)
                for g in sorted(moved_gfns):
                    sites = [bp for bp in self.bound.breakpoints if bp.gfn == g
                             and bp.mechanism == "int3-shadow-frame"]
                    if sites:
                        self._plant_shadow(g, sites)
                del old_bps
                self._save()
            finally:
                self._unpause()
        return delta

    def _move_access(self, plan_view: int, changes: Mapping[int, tuple[str | None, str | None]],
                     populated: set[int], skip: set[int]) -> None:
        b = self.backend
        actual = self.view_map.get(plan_view)
        if actual is None:
            return
        entry = self._access_entries.get(actual)
        if entry is None:
            entry = self._access_entries[actual] = {"op": "access", "view": actual, "prior": {}}
            self.journal.append(entry)
        tighten = {g: new for g, (_old, new) in changes.items() if new is not None and g in populated
                   and g not in self._shadows}
        relax = [g for g, (_old, new) in changes.items() if new is None and g not in self._shadows]
        for g in tighten:
            if g not in entry["prior"]:
                entry["prior"][g] = b.get_access(actual, g)
        self._save()
        set_access_map(b, actual, tighten)
        back = {g: entry["prior"][g] for g in relax if g in entry["prior"]}
        set_access_map(b, actual, back)
        for g in back:
            del entry["prior"][g]
        self._save()

    # ------------------------------------------------------------------ side effects of decisions
    def remove_breakpoint(self, site: str | None) -> bool:
        """Put a site's original bytes back (an inline breakpoint the plan answers by restoring, or a
        disarmed one); False when the site has none planted. A shadow-frame site stays: its view is
        the guest's only copy of the 0xCC and costs nothing when not executed."""
        with self._lock:
            entry = self._inline.pop(site or "", None)
            if entry is None:
                return False
            undo_entry(self.backend, entry)
            self.journal.remove(entry)
            self._save()
            return True

    def relax_access(self, gfn: int | None, access: str | None) -> None:
        """arm64 relax-and-rearm: let the faulting access through in the host view (no single-step on
        Xen/arm64); `rearm_access` puts the plan's access back at the next event."""
        if gfn is None or access is None:
            return
        with self._lock:
            self.backend.set_access(self.view_map.get(0, 0), [gfn], access)

    def rearm_access(self, gfn: int | None) -> None:
        if gfn is None:
            return
        with self._lock:
            view = self.bound.views.get(0)
            planned = view.access.get(gfn) if view is not None else None
            if planned is not None:
                self.backend.set_access(self.view_map.get(0, 0), [gfn], planned)

    # ------------------------------------------------------------------ the decision engine's plan
    def engine_plan(self) -> dict:
        """The plan with view ids rewritten to the backend's (identical when the ids matched)."""
        return remap_view_ids(self.bound.plan, self.view_map)

    @property
    def shadow_frames(self) -> dict[int, int]:
        """Original gfn -> shadow gfn. The guest could map a shadow gfn itself (it is ordinary RAM
        beyond the guest's memory map): an enforcer should deny accesses to these frames."""
        return {g: e["shadow"] for g, e in self._shadows.items() if e.get("shadow") is not None}

    # ------------------------------------------------------------------ teardown
    def teardown(self) -> list[str]:
        """Remove everything install did and unpause. Idempotent; returns the errors (empty when clean).
        Raises TeardownError when some step failed (the state record is then kept for `recover`)."""
        with self._lock:
            if self.torn_down:
                return self.teardown_errors
            self.torn_down = True
            errors: list[str] = []
            self.record.data["phase"] = "tearing_down"
            try:
                self._pause()
            except Exception as exc:  # noqa: BLE001
                errors.append(f"pause: {exc}")
            errors += self._drain()
            errors += self._undo_all()
            errors += self._unpause_all()
            self.teardown_errors = errors
            if errors:
                self.record.data["phase"] = "teardown_failed"
                self._save()
                raise TeardownError(errors, self.record.path)
            self.record.delete()
            return errors

    def __repr__(self) -> str:
        state = "torn down" if self.torn_down else "installed" if self.installed else "installing"
        return f"Installation({state}, views={self.view_map}, journal={len(self.journal)})"


def remap_view_ids(plan: Mapping[str, Any], view_map: Mapping[int, int]) -> dict:
    """A copy of `plan` with every view id (views, breakpoint views and step views, response
    altp2m_idx) translated through `view_map`."""
    out = copy.deepcopy(dict(plan))
    if all(k == v for k, v in view_map.items()):
        return out
    m = dict(view_map)
    for v in out.get("views", ()):
        v["id"] = m.get(v["id"], v["id"])
    for bp in out.get("breakpoints", ()):
        if "views" in bp:
            bp["views"] = [m.get(x, x) for x in bp["views"]]
        if isinstance(bp.get("step_view"), int):
            bp["step_view"] = m.get(bp["step_view"], bp["step_view"])
    for shapes in (out.get("responses") or {}).values():
        for spec in shapes.values():
            if isinstance(spec, dict) and isinstance(spec.get("altp2m_idx"), int):
                spec["altp2m_idx"] = m.get(spec["altp2m_idx"], spec["altp2m_idx"])
    return out


def _populated_among(backend: Any, gfns: set[int]) -> set[int]:
    """The populated frames among `gfns`. A backend that can probe just those says so with
    `populated_among` (Xen: a plan's few thousand frames instead of the guest's whole physmap);
    otherwise the full list is filtered."""
    narrow = getattr(backend, "populated_among", None)
    if callable(narrow):
        return set(narrow(gfns))
    return gfns & set(backend.populated_frames())


def _existing_views(backend: Any, caps: Any) -> list[int]:
    """Views other than 0 that exist now (probed with get_access: the Backend has no view listing)."""
    populated = next(iter(backend.populated_frames()), 0)
    found = []
    for v in range(1, max(caps.max_views, 1)):
        try:
            backend.get_access(v, populated)
        except BackendError:
            continue
        found.append(v)
    return found


# --------------------------------------------------------------------------- entry points

def install(bound: BoundPlan, backend: Any, *, guest: str | None = None, state_dir: str | Path | None = None,
            state_path: str | Path | None = None) -> Installation:
    """Apply `bound` to the guest as one transaction. Raises InstallError (guest unchanged unless the
    error says the rollback was incomplete)."""
    name = guest or getattr(backend, "name", None) or "guest"
    path = Path(state_path) if state_path is not None else state_path_for(name, state_dir)
    if not path.exists():
        remove_stray_temporaries(path)
    if path.exists():
        try:
            other = json.loads(path.read_text())
            pid = int(other.get("pid", 0))
        except (OSError, ValueError):
            pid = 0
        alive = pid_alive(pid)
        me = " (this process)" if pid == os.getpid() else ""
        raise InstallError(f"guest '{name}' has a state record at {path}: "
                           + (f"an enforcer (pid {pid}{me}) is running" if alive else
                              "an earlier enforcer did not tear down; run 'policyc recover --guest "
                              f"{name}' first"))
    inst = Installation(bound, backend, StateRecord(path, name, bound.plan, domain_identity(backend)))
    try:
        inst._save()
        inst._install()
    except BaseException as exc:
        errors = inst._undo_all()
        errors += inst._unpause_all()
        if errors:
            inst.record.data["phase"] = "rollback_failed"
            inst._save()
        else:
            inst.record.delete()
        inst.torn_down = True
        if isinstance(exc, (KeyboardInterrupt, SystemExit)) and not errors:
            raise
        msg = str(exc) if isinstance(exc, InstallError) else f"install failed: {exc}"
        raise InstallError(msg, cause=exc, undo_errors=errors, state_path=path) from exc
    return inst


# --------------------------------------------------------------------------- running

def run_with_teardown(installation: Installation, step: Callable[[], Any], *,
                      signals: Sequence[int] = (signal.SIGINT, signal.SIGTERM),
                      register_atexit: bool = True) -> str:
    """Run `step()` until it returns False or a signal in `signals` arrives, then tear down. Teardown also
    runs on an exception (which then propagates) and, as a last resort, at interpreter exit. The signal
    handlers only set a flag, so `step` should not block for long (use `backend.wait(timeout)`).
    Returns "done" or the signal's name."""
    stop: dict[str, Any] = {"signal": None}

    def handler(signum: int, _frame: Any) -> None:
        stop["signal"] = signum

    previous = {}
    if threading.current_thread() is threading.main_thread():
        for s in signals:
            previous[s] = signal.signal(s, handler)
    if register_atexit:
        atexit.register(_teardown_quietly, installation)
    reason = "done"
    try:
        while stop["signal"] is None:
            if step() is False:
                break
        if stop["signal"] is not None:
            reason = signal.Signals(stop["signal"]).name
    finally:
        try:
            installation.teardown()
        finally:
            for s, h in previous.items():
                signal.signal(s, h)
            if register_atexit:
                atexit.unregister(_teardown_quietly)
    return reason


def _teardown_quietly(installation: Installation) -> None:
    try:
        installation.teardown()
    except Exception:  # noqa: BLE001 - at exit there is no one to tell but the state record
        pass
