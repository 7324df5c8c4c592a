"""`policyc recover`: cleaning up after an enforcer killed outright, from the journal in its state
record (`runtime/state_record.py`): every vCPU unpaused, the ring reset, each journalled step undone
(`runtime/journal.py`), the record removed. `RecoveryReport` says what could not be restored.
"""

from __future__ import annotations

import errno as _errno
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..native import abi
from .backend import BackendError
from .journal import describe_entry, dummy_unpause, teardown_response, undo_entry
from .state_record import domain_identity, load_record, other_domain, remove_stray_temporaries, state_path_for

__all__ = ["RecoveryReport", "recover", "recover_guest"]


@dataclass
class RecoveryReport:
    """What `recover` did and what it could not do.

    Restored: monitors (undone from the journal; the ring disable clears them all anyway), paused
    vCPUs (their requests answered with a plain unpause, or one bare VCPU_PAUSED response each), the
    domain pause count, views and access (host p2m included), shadow frames and inline breakpoint
    bytes (when the guest has not rewritten them since), the vCPUs' view, altp2m off if it was off.
    Not restored: CR/MSR writes held back for a response and pending emulations when the ring had to
    be disabled (XEN-SEMANTICS §7: the guest's write silently never happens); the decisions the dead
    agent owed (everything pending is let through, retried in an unwatched guest); a vCPU left
    single-stepping (no per-vCPU debug_control in the Backend: listed in `cannot`); the op-4
    "deferred register writes" flag, which only a ring disable clears; a vCPU asleep waiting for a
    ring slot makes the disable fail (EBUSY) and the domain cannot be freed short of destroying it
    (`stuck`). A frame or view created in the instant between the hypercall and the journal write
    is not known to the record (a view goes when altp2m is switched off)."""

    found: bool = False
    guest: str | None = None
    undone: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    unpaused_vcpus: list[int] = field(default_factory=list)
    answered: int = 0                # requests answered on the old ring (when it was reachable)
    refused: list[str] = field(default_factory=list)   # bare unpause responses the ring refused
    ring_reenabled: bool = False
    stuck: bool = False
    cannot: list[str] = field(default_factory=list)
    not_this_domain: str | None = None   # the journal belongs to another domain: nothing was done

    @property
    def clean(self) -> bool:
        return not self.errors and not self.stuck


_RING_SLOTS = abi.Ring().slots      # 8: one 4 KiB page (XEN-SEMANTICS §7)


def _reset_ring(b: Any, report: RecoveryReport, reenable: bool) -> None:
    """XEN-SEMANTICS §7 steps 1-5: disable the ring, re-enable it, one bare unpause per vCPU."""
    try:
        b.close()
    except BackendError as exc:
        report.stuck = exc.errno == _errno.EBUSY
        report.errors.append(f"monitor ring disable: {exc}" + (": a vCPU waits for a ring slot; the domain "
                                                               "stays stuck until it is destroyed"
                                                               if report.stuck else ""))
        return
    if not reenable:
        return
    reattach = getattr(b, "reattach", None)
    if not callable(reattach):
        report.cannot.append("the backend cannot re-enable the monitor ring: vCPUs paused on the dead "
                             "agent's events stay paused")
        return
    try:
        reattach()
        report.ring_reenabled = True
    except BackendError as exc:
        report.errors.append(f"monitor ring re-enable: {exc}")
        return
    # Xen matches responses to nothing, and an extra unpause only logs a warning (§7 step 5). Answers to
    # nothing leave the ring's indices skewed (responses ahead of requests), and a ring in that state
    # would misplace the next answers: after each ring's worth, disable and enable once more.
    vcpus = list(range(b.capabilities().vcpus))
    for start in range(0, len(vcpus), _RING_SLOTS):
        chunk = vcpus[start:start + _RING_SLOTS]
        try:
            b.put_responses([dummy_unpause(v) for v in chunk])
            b.notify()
            report.unpaused_vcpus.extend(chunk)
        except BackendError as exc:
            report.refused.append(f"vCPU(s) {chunk}: {exc}")
        try:
            b.close()
            reattach()
        except BackendError as exc:
            report.errors.append(f"monitor ring reset after the bare responses: {exc}")
            return


def recover(backend: Any, state_path: str | Path, *, reenable_ring: bool = True) -> RecoveryReport:
    """Undo what a killed enforcer left in the guest, from its state record (XEN-SEMANTICS §7)."""
    path = Path(state_path)
    report = RecoveryReport()
    data = load_record(path)
    if data is None:
        return report
    report.found = True
    report.guest = data.get("guest")
    try:
        other = other_domain(data.get("domain"), domain_identity(backend))
    except BackendError as exc:
        other = f"the domain cannot be identified: {exc}"
    if other is not None:
        report.not_this_domain = other      # nothing is touched; the journal stays
        report.errors.append(f"refused: {other}")
        return report
    b = backend
    paused_here = 0
    try:
        b.pause()
        paused_here = 1
    except Exception as exc:  # noqa: BLE001
        report.errors.append(f"pause: {exc}")
    # 1. the ring. If this process can still reach the dead agent's ring (the same process, or a
    # backend that can map it), answer what is on it; the vCPUs finish (held-back CR/MSR writes
    # included) once the domain runs again. On real Xen a new process cannot (the ring gfn left the
    # physmap, §7): then disable (wakes throttled vCPUs, clears monitors, drops held-back writes),
    # re-enable, and push one VCPU_PAUSED response per vCPU.
    reachable = True
    try:
        for _ in range(4096):
            reqs = b.take_requests(64)
            if not reqs:
                break
            b.put_responses([teardown_response(r) for r in reqs])
            b.notify()
            report.answered += len(reqs)
    except BackendError:
        reachable = False
    if not reachable:
        _reset_ring(b, report, reenable_ring)
    # 2. the journal, newest first
    for entry in reversed(data["journal"]):
        try:
            undo_entry(b, entry, recovering=True)
            report.undone.append(describe_entry(entry))
        except Exception as exc:  # noqa: BLE001
            report.errors.append(f"undo {describe_entry(entry)}: {exc}")
    # 3. single-step cannot be switched off through the Backend
    stepping = getattr(b, "single_stepping", None)
    if callable(stepping):
        left = [v for v in range(b.capabilities().vcpus) if stepping(v)]
        if left:
            report.cannot.append(f"vCPU(s) {left} are left single-stepping (no debug_control in the Backend)")
    # 4. unpause: ours and the dead enforcer's outstanding pauses
    for _ in range(paused_here + int(data.get("paused", 0))):
        try:
            b.unpause()
        except BackendError as exc:
            if exc.errno != _errno.EINVAL:
                report.errors.append(f"unpause: {exc}")
            break
    try:
        still = sorted(b.paused_vcpus())
        if still and reachable and not report.stuck:
            # requests the dead agent had taken and never answered: §7's disable / re-enable / bare
            # responses is the only way left to reach those vCPUs
            _reset_ring(b, report, reenable_ring)
            still = sorted(b.paused_vcpus())
    except BackendError:
        still = []
    asked = int(data.get("policy_paused", 0))
    if still and asked and still == list(range(b.capabilities().vcpus)):
        # the whole domain, paused by the policy's own `pause` action: kept, as teardown keeps it
        report.cannot.append(f"the domain stays paused: the policy's pause action paused it ({asked}x), as asked")
    elif still:
        report.errors.append(f"vCPU(s) {still} are still paused: their requests were taken by the dead agent "
                             "and the bare unpause responses did not reach them")
    if report.clean:
        try:
            path.unlink()
        except FileNotFoundError:
            pass
        remove_stray_temporaries(path)
    return report


def recover_guest(backend: Any, guest: str, state_dir: str | Path | None = None) -> RecoveryReport:
    """`policyc recover --guest G`: recover from the record at `state_path_for(guest, state_dir)`."""
    return recover(backend, state_path_for(guest, state_dir))
