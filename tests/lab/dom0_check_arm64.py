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
   SIGTERM; the decisions by rule, and the guest kernel's linux_banner the binder checked;
5. split_tlb: the split-TLB experiment. The guest module's probe page (its frame printed at load) is
   watched for execute by a lab policy written here (`SPLIT_POLICY`, with the frame filled in) and
   compiled in step 1's wake; the module reads the page and executes it every round. Enforced like
   step 4, then both sides: execute decisions on the frame (their access bits, frames, addresses)
   against the guest's count of executions and reads while its table writes were refused;
6. after: the guest's own loop (its console, through xenconsoled's log) still advances after
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
SPLIT_VMI = "/lab/policies/lab-arm64-split-tlb.vmi"
SPLIT_PLAN = "/tmp/plan-split-tlb.json"
SPLIT_LOG = "/tmp/decisions-split-tlb.jsonl"
# The table write is denied every round, and its event re-arms the probe page relaxed for the previous
# round's execute (arm64 relax-and-rearm): so each enforced round's execute of the probe traps once.
SPLIT_POLICY = """policy "lab-arm64-split-tlb" {
    target xen >= 4.17 on arm64
    symbols "linux-6.1-arm64.System.map"
    mode enforce

    region syscalls = symbol sys_call_table size 8 * 451
    region probe = pa %#x size 4096      # the guest module's probe page

    rule protect_tables: on write to syscalls {
        deny
    }

    rule probe_exec: on execute in probe {
        log info "probe executed at {pc:#x}, gla {gla:#x}"
    }
}
"""
# A round under the enforcer whose table write was refused may have had its probe executed before the
# install or its table write after teardown: one round at each edge.
SPLIT_EDGE = 1


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
    # The guest stays paused throughout: an SMC it makes while the privileged_call monitor is on (or a
    # write to the frame while it is rx) would put a request on a ring nobody answers, and Xen does not
    # unpause a vCPU paused for such a request when the ring is disabled (common/vm_event.c,
    # vm_event_disable, unpauses only vCPUs blocked on a full ring): it would stay paused for good.
    call("xc_domain_pause", ctypes.c_uint32(domid))
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
    call("xc_domain_unpause", ctypes.c_uint32(domid))
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


def step_split_policy() -> dict:
    """The probe page's frame from the guest module's load line, the lab policy watching it for execute,
    compiled for arm64."""
    t = time.monotonic()
    probe = {}
    while not probe and time.monotonic() - t < 120:
        probe = guest_probe()
        if not probe:
            time.sleep(0.5)
    if not probe:
        return {"error": "the guest module printed no probe line in 120 s"}
    with open(SPLIT_VMI, "w") as f:
        f.write(SPLIT_POLICY % (probe["pfn"] << 12))
    t = time.monotonic()
    rc, out = run([sys.executable, "-m", "policyc", "compile", SPLIT_VMI, "--target", "arm64", "-o", SPLIT_PLAN])
    return {"probe_va": hex(probe["va"]), "probe_gfn": hex(probe["pfn"]), "compile_rc": rc,
            "compile_seconds": round(time.monotonic() - t, 2), "compile_tail": out[-900:]}


def guest_probe() -> dict:
    """The module's "policyc-lab-arm64 probe va=... pfn=..." line; {} before it printed one."""
    try:
        with open("/var/log/xen/guest-armguest.log", errors="replace") as f:
            m = re.search(r"policyc-lab-arm64 probe va=([0-9a-f]+) pfn=([0-9a-f]+)", f.read())
    except OSError:
        return {}
    return {"va": int(m.group(1), 16), "pfn": int(m.group(2), 16)} if m else {}


def step_run(domid: int, seconds: float, plan: str = PLAN, log: str = LOG) -> dict:
    if plan != PLAN and not os.path.exists(plan):
        return {"error": f"no {plan}: its policy did not compile"}
    t0 = time.monotonic()
    samples = {"guest_before": guest_report()}
    with open("/tmp/enforcer.out", "w") as out:
        # a plan compiled in step 1 (its symbol file beside the policy): compiling again costs a minute
        # of emulated CPU
        target = plan if os.path.exists(plan) else POLICY
        p = subprocess.Popen([sys.executable, "-m", "policyc", "run", target, "--symbols", "/lab/policies",
                              "--guest", f"xen:{domid}", "--log", log], stdout=out, stderr=subprocess.STDOUT)
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
    access_kinds: collections.Counter = collections.Counter()
    # the execute watches (rules on a region the guest also reads): what Xen reported for each event
    watched = {r: {k: collections.Counter() for k in ("access", "gfn", "pc", "gla")} for r in EXEC_RULES}
    if os.path.exists(log):
        with open(log) as f:
            for line in f:
                try:
                    d = json.loads(line)
                except ValueError:
                    continue
                by_rule[f"{d.get('rule')}:{d.get('verdict')}"] += 1
                ev = d.get("event") or {}
                if d.get("rule") in watched:
                    for k, counter in watched[d["rule"]].items():
                        counter[str(ev.get(k))] += 1
                if d.get("kind") == "mem_access":
                    access_kinds[str(ev.get("access"))] += 1
    banner = re.search(r"guest kernel: linux_banner at (0x[0-9a-f]+) (matches the symbol file|read[^:]*): '(.*)'",
                       text)
    return {**samples, "rc": p.returncode, "ended": ended, "seconds": round(time.monotonic() - t0, 1),
            "decisions": dict(by_rule),
            "exec_watch_events": {r: {k: dict(c.most_common(6)) for k, c in w.items()} for r, w in watched.items()
                                  if sum(w["access"].values())},
            "kernel_banner": {"address": banner.group(1), "matched": banner.group(2) == "matches the symbol file",
                              "banner": banner.group(3)} if banner else None,
            "mem_access_by_access_bits": dict(access_kinds), "output_tail": text[-1500:]}


EXEC_RULES = ("exec_rodata", "probe_exec")


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


def compare_split(run: dict, probe: dict) -> dict:
    """The split-TLB run: execute events on the probe frame against the guest's executions of it in
    rounds whose table write was refused (whole run: a refusal happens only under the enforcer), and
    what Xen reported for them; reads of the page must raise none."""
    before, after = run.get("guest_before") or {}, run.get("guest_after") or {}
    dec = run.get("decisions", {})
    ev = (run.get("exec_watch_events") or {}).get("probe_exec") or {}
    delta = {k: after.get(k, 0) - before.get(k, 0) for k in ("probe_execs_enforced", "probe_reads_enforced",
                                                                "sct_blocked", "probe_read_wrong",
                                                                "probe_exec_wrong")} if after else {}
    n = sum(v for k, v in dec.items() if k.startswith("probe_exec:"))
    out = {"decisions": n, "protect_tables_denies": dec.get("protect_tables:deny", 0), "guest": delta,
           "reported_access_bits": ev.get("access", {}), "reported_gfns": ev.get("gfn", {}),
           "reported_glas": ev.get("gla", {}), "reported_pcs": ev.get("pc", {})}
    gfn, va = probe.get("probe_gfn"), probe.get("probe_va")
    out["events_not_execute"] = sum(v for k, v in out["reported_access_bits"].items() if k != "4")
    out["events_on_another_frame"] = sum(v for k, v in out["reported_gfns"].items() if k != gfn)
    out["events_elsewhere_than_the_probe"] = sum(v for k, v in out["reported_pcs"].items() if k != va)
    out["ok"] = bool(delta) and delta["probe_execs_enforced"] > 0 \
        and abs(n - delta["probe_execs_enforced"]) <= SPLIT_EDGE and delta["sct_blocked"] == out["protect_tables_denies"] \
        and out["events_not_execute"] == out["events_on_another_frame"] == 0 \
        and delta["probe_read_wrong"] == delta["probe_exec_wrong"] == 0
    return out


def settled_report(end: dict) -> dict:
    """Two of the module's counter lines after `end` (the last seen before SIGTERM): rounds that ran once
    the enforcer was gone."""
    first = first_line_after(end.get("round", -1))
    return first_line_after(first.get("round", -1)) if first else {}


def guest_rounds() -> int:
    """The guest's last "ARMGUEST round=N" on its console (xenconsoled's log)."""
    try:
        with open("/var/log/xen/guest-armguest.log", errors="replace") as f:
            found = re.findall(r"ARMGUEST round=(\d+)", f.read())
    except OSError:
        return -1
    return int(found[-1]) if found else 0


def step_after(domid: int) -> dict:
    """After teardown: the guest still advances (its user loop's rounds, or the module's: under load the
    user loop's console line can lag the module's by minutes, seen in CI on 2026-12-07: 1,350 against
    5,800) and xl shows it neither paused nor dead."""
    first, first_module = guest_rounds(), guest_report().get("round", -1)
    time.sleep(12)
    last, after = guest_rounds(), guest_report()
    rc, out = run(["xl", "list", str(domid)])
    state = out.split()[-2] if rc == 0 and len(out.split()) >= 2 else f"xl rc {rc}"
    advanced = last > first or after.get("round", -1) > first_module
    return {"rounds_before": first, "rounds_after": last, "module_rounds_before": first_module,
            "module_rounds_after": after.get("round", -1), "state": state, "guest_after": after,
            "running": advanced and "p" not in state and "d" not in state and rc == 0}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--domid", type=int, required=True)
    ap.add_argument("--seconds", type=float, default=20)
    a = ap.parse_args()
    result: dict = {"mode": "arm64", "domid": a.domid}

    def run_and_settle(plan: str, log: str) -> dict:
        res = step_run(a.domid, a.seconds, plan, log)
        res["guest_after"] = settled_report(res.get("guest_end") or {})
        return res

    for name, fn in (("environment", step_environment), ("split_policy", step_split_policy),
                     ("xen", lambda: step_xen(a.domid)), ("attach", lambda: step_attach(a.domid)),
                     ("run", lambda: run_and_settle(PLAN, LOG)),
                     ("split_tlb", lambda: run_and_settle(SPLIT_PLAN, SPLIT_LOG)),
                     ("after", lambda: step_after(a.domid))):
        print(f"LAB-T {name}_start {uptime()}", flush=True)
        try:
            result[name] = fn()
        except Exception as exc:
            result[name] = {"error": f"{type(exc).__name__}: {exc}"}
        emit(name, result[name])
    result["compare"] = compare(result.get("run") or {})
    result["guest_counts"] = {rule: c["guest"] for rule, c in result["compare"].items()
                              if isinstance(c, dict) and "guest" in c}
    result["split_compare"] = compare_split(result.get("split_tlb") or {}, result.get("split_policy") or {})
    emit("compare", result["compare"])
    emit("split_compare", result["split_compare"])
    text = json.dumps(result, sort_keys=True)
    pieces = [text[i:i + 60] for i in range(0, len(text), 60)]
    for i, piece in enumerate(pieces, 1):
        print(f"LAB-RESULT {i}/{len(pieces)} {piece}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
