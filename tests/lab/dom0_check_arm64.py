"""The arm64 lab's check, run inside the arm64 Xen dom0 by tests/lab/init_arm64.sh.

    python3 dom0_check_arm64.py --domid D [--seconds N]

Prints `LAB <step> <json>` lines and the whole result in `LAB-RESULT i/n PART` pieces, the same
format as dom0_check.py (tests/test_lab.py parses both). Steps, each recorded whether it works:

1. environment: Debian's arm64 python3, `import policyc` with the aarch64 ring extension,
   `policyc compile` of examples/policies/linux-arm64-integrity.vmi for `arm64`, unmodified;
2. xen: libxenctrl straight through ctypes on the live guest, no policyc in between: vm_event
   version, monitor capabilities, stage-2 mem_access set and read back on one guest frame,
   the privileged_call (SMC) monitor enabled and disabled;
3. attach: `XenBackend.open` on the guest, its capabilities and notes;
4. run: `policyc run PLAN --guest xen:D` (the plan of step 1) for N seconds from "in place", then
   SIGTERM; the decisions by rule;
5. after: the guest's own loop (its console, through xenconsoled's log) still advances after
   teardown, and `xl list` shows it neither paused nor dead.

Only the standard library and policyc are used.
"""

from __future__ import annotations

import argparse
import collections
import ctypes
import json
import os
import re
import signal
import subprocess
import sys
import time

POLICY = "/lab/policies/linux-arm64-integrity.vmi"
PLAN = "/tmp/plan-arm64.json"
LOG = "/tmp/decisions-arm64.jsonl"


def uptime() -> float:
    with open("/proc/uptime") as f:
        return float(f.read().split()[0])


def emit(name: str, value) -> None:
    print(f"LAB {name} {json.dumps(value, sort_keys=True)}", flush=True)


def run(cmd: list[str], timeout: float = 300) -> tuple[int, str]:
    try:
        p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout)
        return p.returncode, p.stdout
    except subprocess.TimeoutExpired as exc:
        return -1, f"timeout after {timeout} s: {exc.output!r}"


def step_environment() -> dict:
    res: dict = {"python": sys.version.split()[0], "machine": os.uname().machine}
    t = time.monotonic()
    try:
        import policyc
        from policyc.native import _vm_event, abi
        res.update(import_policyc=True, policyc=policyc.__file__, ring=_vm_event.__file__, abi_version=abi.VERSION)
    except Exception as exc:                           # recorded, not raised: the step failed
        res.update(import_policyc=False, error=repr(exc))
    res["import_seconds"] = round(time.monotonic() - t, 2)
    t = time.monotonic()
    rc, out = run([sys.executable, "-m", "policyc", "compile", POLICY, "--target", "arm64", "-o", PLAN])
    res.update(compile_rc=rc, compile_seconds=round(time.monotonic() - t, 2), compile_tail=out[-600:])
    return res


def step_xen(domid: int) -> dict:
    """libxenctrl by hand, so a failure here is Xen's and not policyc's."""
    res: dict = {}
    xc_lib = ctypes.CDLL("libxenctrl.so.4.17", use_errno=True)
    xc_lib.xc_interface_open.restype = ctypes.c_void_p
    xch = ctypes.c_void_p(xc_lib.xc_interface_open(None, None, 0))
    res["interface_open"] = bool(xch.value)

    def call(name: str, *args) -> int:
        rc = getattr(xc_lib, name)(xch, *args)
        res[name] = rc if rc >= 0 else f"rc {rc} errno {os.strerror(ctypes.get_errno())}"
        return rc

    res["vm_event_version"] = xc_lib.xc_vm_event_get_version(xch)
    caps = ctypes.c_uint32()
    if call("xc_monitor_get_capabilities", ctypes.c_uint16(domid), ctypes.byref(caps)) >= 0:
        res["capabilities"] = hex(caps.value)
    acc = ctypes.c_int()
    call("xc_get_mem_access", ctypes.c_uint16(domid), ctypes.c_uint64(0x40000), ctypes.byref(acc))
    res["get_mem_access_before"] = acc.value
    port = ctypes.c_uint32()
    xc_lib.xc_monitor_enable.restype = ctypes.c_void_p
    ring = xc_lib.xc_monitor_enable(xch, ctypes.c_uint16(domid), ctypes.byref(port))
    res["monitor_enable"] = bool(ring) or f"errno {os.strerror(ctypes.get_errno())}"
    if ring:
        call("xc_set_mem_access", ctypes.c_uint16(domid), ctypes.c_int(5), ctypes.c_uint64(0x40000),
             ctypes.c_uint32(1))                      # XENMEM_access_rx on one frame
        call("xc_get_mem_access", ctypes.c_uint16(domid), ctypes.c_uint64(0x40000), ctypes.byref(acc))
        res["get_mem_access_after"] = acc.value
        call("xc_set_mem_access", ctypes.c_uint16(domid), ctypes.c_int(7), ctypes.c_uint64(0x40000),
             ctypes.c_uint32(1))                      # back to rwx
        call("xc_monitor_privileged_call", ctypes.c_uint16(domid), ctypes.c_bool(True))
        res["privileged_call_on"] = res.pop("xc_monitor_privileged_call")
        call("xc_monitor_privileged_call", ctypes.c_uint16(domid), ctypes.c_bool(False))
        res["privileged_call_off"] = res.pop("xc_monitor_privileged_call")
        call("xc_monitor_disable", ctypes.c_uint16(domid))
    xc_lib.xc_interface_close(xch)
    return res


def step_attach(domid: int) -> dict:
    try:
        from policyc.runtime.xen_backend import XenBackend
        with XenBackend.open(str(domid), ring=False) as be:
            caps = be.capabilities()
            return {"ok": True, "capabilities": {k: (sorted(v) if isinstance(v, frozenset) else v)
                                                 for k, v in vars(caps).items()},
                    "notes": dict(be.capability_notes)}
    except Exception as exc:
        return {"ok": False, "error": f"{type(exc).__name__}: {exc}"}


def step_run(domid: int, seconds: float) -> dict:
    t0 = time.monotonic()
    samples = {"guest_before": guest_report()}
    with open("/tmp/enforcer.out", "w") as out:
        # the plan step 1 compiled from the example policy (its symbol file beside it): compiling again
        # costs two minutes of emulated CPU
        target = PLAN if os.path.exists(PLAN) else POLICY
        p = subprocess.Popen([sys.executable, "-m", "policyc", "run", target, "--symbols", "/lab/policies",
                              "--guest", f"xen:{domid}", "--log", LOG], stdout=out, stderr=subprocess.STDOUT)
        ended, placed = "exited", None
        while p.poll() is None:         # N seconds from "in place" (start-up is slow on TCG), at most 300 s to get there
            with open("/tmp/enforcer.out") as f:
                if placed is None and "in place" in f.read():
                    samples["guest_placed"] = first_line_after(guest_report().get("round", -1))
                    placed = time.monotonic()       # the N seconds count from that line
            now = time.monotonic()
            if (placed and now - placed > seconds) or (not placed and now - t0 > 300):
                samples["guest_end"] = guest_report()
                p.send_signal(signal.SIGTERM)
                ended = "sigterm"
                try:
                    p.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    p.kill(); p.wait(); ended = "killed"
                break
            time.sleep(0.5)
    with open("/tmp/enforcer.out") as f:
        text = f.read()
    by_rule: collections.Counter = collections.Counter()
    exec_pcs: collections.Counter = collections.Counter()
    access_kinds: collections.Counter = collections.Counter()
    if os.path.exists(LOG):
        with open(LOG) as f:
            for line in f:
                try:
                    d = json.loads(line)
                except ValueError:
                    continue
                by_rule[f"{d.get('rule')}:{d.get('verdict')}"] += 1
                ev = d.get("event") or {}
                if d.get("rule") == "exec_rodata":      # the execute watch on a region the guest reads
                    exec_pcs[str(ev.get("pc"))] += 1
                if d.get("kind") == "mem_access":
                    access_kinds[str(ev.get("access"))] += 1
    return {**samples, "rc": p.returncode, "ended": ended, "seconds": round(time.monotonic() - t0, 1),
            "decisions": dict(by_rule), "exec_rodata_pcs": dict(exec_pcs.most_common(8)),
            "mem_access_by_access_bits": dict(access_kinds), "output_tail": text[-1500:]}


def guest_report() -> dict:
    """The attacker module's last counters line ("policyc-lab-arm64 round=N sct_landed=N ...") on the
    guest's console, as xenconsoled logged it; {} before the module printed one."""
    try:
        with open("/var/log/xen/guest-armguest.log", errors="replace") as f:
            lines = re.findall(r"policyc-lab-arm64 (round=.*)", f.read())
    except OSError:
        return {}
    return {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", lines[-1])} if lines else {}


def first_line_after(round_seen: int, timeout: float = 60) -> dict:
    """The module's first counters line printed after the one last seen when protection was in place:
    every round it counts after that line ran under the enforcer (it prints every 10 rounds, so the
    line seen then may predate the install by up to 10 rounds)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        rep = guest_report()
        if rep.get("round", -1) > round_seen:
            return rep
        time.sleep(0.2)
    return {}


def compare(run: dict) -> dict:
    """The decision log against the guest's own counters, rule by rule. A refusal happens only under
    the enforcer, so whole-run totals compare exactly: each protect_tables deny is one write the guest
    saw refused, each firmware_calls decision one SMC it saw skipped."""
    before, placed, end, after = (run.get(k) or {} for k in ("guest_before", "guest_placed", "guest_end",
                                                               "guest_after"))
    dec = run.get("decisions", {})
    out = {
        "protect_tables": {"decisions": dec.get("protect_tables:deny", 0), "guest": after.get("sct_blocked")},
        "firmware_calls": {"decisions": sum(v for k, v in dec.items() if k.startswith("firmware_calls:")),
                           "guest": after.get("smc_skipped")},
        "trace_creds": {"decisions": sum(v for k, v in dec.items() if k.startswith("trace_creds:")),
                        "guest": (end.get("creds", 0) - placed.get("creds", 0)) if placed and end else None,
                        "guest_read_the_smc": after.get("creds_smc_seen")},
        "collateral": {"decisions": dec.get("None:allow", 0),
                       "guest": (end.get("collateral", 0) - placed.get("collateral", 0)) if placed and end else None},
        "exec_rodata": {"decisions": sum(v for k, v in dec.items() if k.startswith("exec_rodata:")), "guest": None},
    }
    for rule in ("protect_tables", "firmware_calls"):
        out[rule]["ok"] = out[rule]["guest"] is not None and out[rule]["decisions"] == out[rule]["guest"] > 0
    out["sct_landed_while_enforced"] = (end.get("sct_landed", 0) - placed.get("sct_landed", 0)) if placed else None
    out["benign_blocked"] = after.get("benign_blocked")
    out["attacks_land_after_teardown"] = bool(after and end and after.get("sct_landed", 0) > end.get("sct_landed", 0)
                                              and after.get("smc_answered", 0) > end.get("smc_answered", 0))
    return out


def guest_rounds() -> int:
    """The guest's last "ARMGUEST round=N" on its console (xenconsoled's log)."""
    try:
        with open("/var/log/xen/guest-armguest.log", errors="replace") as f:
            found = re.findall(r"ARMGUEST round=(\d+)", f.read())
    except OSError:
        return -1
    return int(found[-1]) if found else 0


def step_after(domid: int) -> dict:
    """After teardown: the guest's loop still advances and xl shows it neither paused nor dead."""
    first = guest_rounds()
    time.sleep(12)
    last = guest_rounds()
    rc, out = run(["xl", "list", str(domid)])
    state = out.split()[-2] if rc == 0 and len(out.split()) >= 2 else f"xl rc {rc}"
    return {"rounds_before": first, "rounds_after": last, "state": state, "guest_after": guest_report(),
            "running": last > first and "p" not in state and "d" not in state and rc == 0}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--domid", type=int, required=True)
    ap.add_argument("--seconds", type=float, default=20)
    a = ap.parse_args()
    result: dict = {"mode": "arm64", "domid": a.domid}
    for name, fn in (("environment", step_environment), ("xen", lambda: step_xen(a.domid)),
                     ("attach", lambda: step_attach(a.domid)), ("run", lambda: step_run(a.domid, a.seconds)),
                     ("after", lambda: step_after(a.domid))):
        print(f"LAB-T {name}_start {uptime()}", flush=True)
        try:
            result[name] = fn()
        except Exception as exc:
            result[name] = {"error": f"{type(exc).__name__}: {exc}"}
        emit(name, result[name])
    run_res = dict(result.get("run") or {}, guest_after=(result.get("after") or {}).get("guest_after"))
    result["compare"] = compare(run_res)
    result["guest_counts"] = {rule: c["guest"] for rule, c in result["compare"].items()
                              if isinstance(c, dict) and "guest" in c}
    emit("compare", result["compare"])
    text = json.dumps(result, sort_keys=True)
    pieces = [text[i:i + 60] for i in range(0, len(text), 60)]
    for i, piece in enumerate(pieces, 1):
        print(f"LAB-RESULT {i}/{len(pieces)} {piece}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
