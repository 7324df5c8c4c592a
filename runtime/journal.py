"""The installation journal's entries undone: what each step changed (monitors, access maps, views,
breakpoints ...) put back as it was, and the plain answers that unpause a vCPU at teardown or in
recovery. `Installation` undoes its own journal with these; `recover` a dead enforcer's.
"""

from __future__ import annotations

from typing import Any, Mapping

from ..native import abi
from ..native.constants import F_PAUSED, F_TOGGLE_SS, RS_SINGLESTEP, VERSION
from .backend import BackendError, Unsupported
from .vm_event_layout import echo_response

_HDR = abi.HEADER

__all__ = ["monitor_enabled", "enable_monitor", "disable_monitor", "set_access_map", "view_exists", "undo_entry",
           "describe_entry", "teardown_response", "dummy_unpause"]


def monitor_enabled(backend: Any, entry: Mapping[str, Any]) -> bool:
    mons = backend.monitors()
    kind = entry["kind"]
    if kind == "write_ctrlreg":
        return entry["index"] in (mons.get("write_ctrlreg") or {})
    if kind == "mov_to_msr":
        return entry["msr"] in (mons.get("mov_to_msr") or {}) or hex(entry["msr"]) in (mons.get("mov_to_msr") or {})
    return kind in mons


def enable_monitor(backend: Any, kind: str, settings: Mapping[str, Any], *, index: str | None = None,
                    msr: int | None = None) -> None:
    if kind == "write_ctrlreg":
        backend.monitor_write_ctrlreg(index, True, sync=bool(settings.get("sync", True)),
                                      onchangeonly=bool(settings.get("onchangeonly", False)),
                                      bitmask=int(settings.get("bitmask", 0)))
    elif kind == "mov_to_msr":
        backend.monitor_mov_to_msr(msr, True, onchangeonly=bool(settings.get("onchangeonly", False)))
    else:
        backend.monitor(kind, True, sync=bool(settings.get("sync", True)))


def disable_monitor(backend: Any, entry: Mapping[str, Any]) -> None:
    kind = entry["kind"]
    if kind == "write_ctrlreg":
        backend.monitor_write_ctrlreg(entry["index"], False)
    elif kind == "mov_to_msr":
        backend.monitor_mov_to_msr(entry["msr"], False)
    else:
        backend.monitor(kind, False)


def set_access_map(backend: Any, view: int, prior: Mapping[int, str]) -> None:
    if not prior:
        return
    gfns = sorted(prior)
    values = [prior[g] for g in gfns]
    if len(set(values)) == 1:
        backend.set_access(view, gfns, values[0])
    else:
        backend.set_access(view, gfns, values)


def view_exists(backend: Any, view: int) -> bool:
    if view == 0:
        return True
    try:
        backend.get_access(view, next(iter(backend.populated_frames()), 0))
    except BackendError:
        return False
    return True


def undo_entry(backend: Any, entry: Mapping[str, Any], *, recovering: bool = False) -> None:
    """Undo one journal entry. Every undo is safe to repeat or to run for a step that never happened
    (entries are journaled before their call where possible). In recovery, state that is gone already
    (a view destroyed by a teardown the kill interrupted) counts as undone."""
    op = entry["op"]
    if op == "altp2m":
        backend.altp2m_set_state(False)
    elif op == "view":
        if not recovering or view_exists(backend, entry["view"]):
            backend.destroy_view(entry["view"])
    elif op == "access":
        if not recovering or view_exists(backend, entry["view"]):
            set_access_map(backend, entry["view"], entry["prior"])
    elif op == "shadow":
        g = entry["gfn"]
        for view, prior in sorted(entry.get("restricted", {}).items()):
            if not recovering or view_exists(backend, view):
                backend.set_access(view, [g], prior)
        for view, prior in sorted(entry.get("views", {}).items()):
            if not recovering or view_exists(backend, view):
                backend.change_gfn(view, g, None)
                if prior is not None:
                    backend.set_access(view, [g], prior)
        shadow = entry.get("shadow")
        if shadow is not None and (not recovering or shadow in set(backend.populated_frames())):
            backend.remove_frame(shadow)
    elif op == "bytes":
        pa = entry["pa"]
        original, planted = bytes.fromhex(entry["original"]), bytes.fromhex(entry["planted"])
        if backend.read_physical(pa, len(planted)) == planted:   # the guest did not rewrite it since
            backend.write_physical(pa, original)
    elif op == "monitor":
        if monitor_enabled(backend, entry):
            disable_monitor(backend, entry)
        prev = entry.get("previous")
        if prev is not None:
            enable_monitor(backend, entry["kind"], prev, index=entry.get("index"), msr=entry.get("msr"))
    elif op == "switch_view":
        view = entry["view"]
        if recovering and not view_exists(backend, view):
            view = 0
        try:
            backend.switch_view(view)
        except Unsupported:
            if not recovering:
                raise              # altp2m is off: every vCPU runs on the host p2m already
    else:
        raise ValueError(f"unknown journal entry '{op}'")


def describe_entry(entry: Mapping[str, Any]) -> str:
    op = entry["op"]
    detail = {k: v for k, v in entry.items() if k not in ("op", "prior")}
    if "prior" in entry:
        detail["gfns"] = len(entry["prior"])
    return f"{op} {detail}"


def teardown_response(raw: bytes) -> bytes:
    """Answer for teardown: unpause, nothing else; a single-stepping vCPU also stops stepping."""
    _, flags, reason, _, _ = _HDR.unpack_from(raw)
    paused = flags & F_PAUSED
    return echo_response(raw, F_TOGGLE_SS if reason == RS_SINGLESTEP and paused else 0)


def dummy_unpause(vcpu: int) -> bytes:
    """XEN-SEMANTICS §7 step 5: version, vcpu_id and VCPU_PAUSED; Xen does not match it to a request."""
    return _HDR.pack(VERSION, F_PAUSED, 0, vcpu, 0).ljust(abi.EVENT_SIZE, b"\0")
