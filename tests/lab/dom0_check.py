"""The lab's check, run inside the Xen dom0 by the initramfs /init (tests/lab/lab.sh).

    python3 dom0_check.py --mode qemu|bochs --guest tiny|linux --policy P.vmi --domid D [--seconds N]

It prints `LAB <name> <json>` lines on the console, `LAB-RESULT i/n PART` lines (the whole result as JSON, in short pieces); /init
frames them between `=== LAB-BEGIN` and `=== LAB-END`, and tests/test_lab.py
parses them. Steps, each recorded whether it works or not:

1. the environment: python version, `import policyc`, the ring extension,
   `policyc check` of the lab policies;
2. the guest's own report page, read through a foreign map (libxenforeignmemory, ctypes):
   gfn 0x200 of the tiny guest (tests/lab/guest/labguest.S), or the page the Linux guest's
   attacker module (tests/lab/guest/linux/) announces on Xen's debug port once it has booted;
3. `policyc run POLICY --guest xen:D --log /tmp/decisions.jsonl` for N seconds, then
   SIGTERM (the enforcer tears down); the report page is sampled all along;
4. both sides compared, every rule of the policy (`compare`; exact, but for the races named
   and bounded at the top of this file): deny decisions against the refusals the guest saw,
   allowed trapped instructions against the guest's own counts in the enforced window, the
   allowed work landing, the enforcer's exit and clean teardown; then after teardown the guest
   must still run (its round counter moves, writes land again, no fault, `xl list` answering
   and the domain neither paused nor dead);
4b. the simulator checked against this run: the enforcer recorded its requests (`--record`);
   `policyc.runtime.sim.replay_live` turns each back into the guest step that makes it, runs the
   steps on SimulatedXen under the same plan and decision engine and compares request by request
   and verdict by verdict (about 31 ms a request in Bochs 3.0's dom0); the whole trace is printed
   (`LAB-TRACE i/n`, gzipped) and the host replays it again, with the repository's code;
5. under Bochs, the backend calls no lab policy reaches on a host without MTF, each on the
   live guest and read back: altp2m (a view, a frame restricted in it, change_gfn to a frame
   added above the guest's memory and back), and a register-context round trip;
6. Xen's own client on the same guest for the same seconds from its first event:
   `xen-access D cpuid` (and `write` under Bochs); like for like, the guest's own cpuid count
   per second under each client.

Only the standard library and policyc are used (it runs on the lab's trimmed Python).
"""

from __future__ import annotations

import argparse
import collections
import ctypes
import datetime
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from typing import Callable

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))     # beside it in dom0 (/lab) and in tests/lab
import dom0_strategies as strategies  # noqa: E402

class GuestKind:
    """What the check knows of one test guest: its report page's layout, which rule each of its
    attacks meets, and what its benign work is."""

    def __init__(self, name: str, fields: tuple[str, ...], counters: int, magic: int, no_fault: int,
                 denies: dict[str, str], memory_deny: tuple[str, str], benign: tuple[str, ...],
                 counted: dict[str, str], never: tuple[str, ...] = (), vcpus: int = 1,
                 more_counters: tuple[str, ...] = (), optional_denies: dict[str, str] | None = None) -> None:
        self.name, self.fields, self.magic, self.no_fault = name, fields + more_counters, magic, no_fault
        self.counters = fields[1:counters] + more_counters
        self.denies, self.memory_deny, self.benign = denies, memory_deny, benign
        # attacks only some lab policies deny (rule -> report prefix): compared where the policy has the rule
        self.optional_denies = optional_denies or {}
        self.counted = counted      # rule -> the guest's counter of the instructions it traps (allowed)
        self.never = never          # rules whose trigger this guest never performs: no decision expected
        self.vcpus = vcpus

    def deny_pairs(self, mode: str, rules: tuple[str, ...] | list[str] | None = None) -> list[tuple[str, str]]:
        """(rule, report prefix) of each attack the policy denies; memory only where Xen can watch it;
        the optional ones where the policy has the rule (`rules`; None: every one, as after teardown,
        where each attack must land again)."""
        optional = [(r, g) for r, g in self.optional_denies.items() if rules is None or r in rules]
        return list(self.denies.items()) + ([self.memory_deny] if mode in VMX_MODES else []) + optional


GUESTS = {
    # tests/lab/guest/labguest.S with policies/lab-*.vmi
    "tiny": GuestKind("labguest", ("magic", "round", "cr4_landed", "cr4_blocked", "msr_landed", "msr_blocked",
                                   "cpuid", "int3", "wat_landed", "wat_blocked", "unw_landed", "unw_blocked",
                                   "bp_passes", "fault", "bp_addr", "watched_addr", "unwatched_addr"),
                      counters=13, magic=0x42414C50, no_fault=0xFFFFFFFF,
                      denies={"cr4_guard": "cr4", "sysenter_eip": "msr"}, memory_deny=("watched_write", "wat"),
                      benign=("unw", "lldt", "acc_wr"),
                      counted={"hypervisor_probe": "cpuid", "bp_site": "bp_passes", "sidt_probe": "sidt",
                               "debug_traps": "db", "agent_request": "greq", "sgdt_probe": "sgdt",
                               "sldt_probe": "sldt", "str_probe": "str", "ldt_load": "lldt_landed",
                               "probe_access": "acc"},
                      more_counters=("cr0_landed", "cr0_blocked", "rd_landed", "rd_blocked", "exec_landed",
                                     "exec_blocked", "sidt", "lidt_landed", "lidt_blocked", "db", "greq",
                                     "greq_failed", "qreq", "cr3_landed", "cr3_blocked", "lgdt_landed",
                                     "lgdt_blocked", "sgdt", "lldt_landed", "lldt_blocked", "sldt", "ltr_landed",
                                     "ltr_blocked", "str", "acc", "acc_wr_landed", "acc_wr_blocked", "bp_read_ok",
                                     "bp_read_bad"),
                      # policies/lab-strategies-vmx.vmi: register refusals (CR0, CR3), a fed read, an
                      # injected #UD, refused descriptor-table loads (an injected #GP)
                      optional_denies={"cr0_guard": "cr0", "secret_read": "rd", "exec_guard": "exec",
                                       "lidt_guard": "lidt", "cr3_guard": "cr3", "lgdt_guard": "lgdt",
                                       "ltr_guard": "ltr"}),
    # tests/lab/guest/linux/policyc_lab_attack.c with examples/policies/linux-kernel-integrity.vmi
    "linux": GuestKind("linuxguest", ("magic", "round", "cr4_landed", "cr4_blocked", "msr_landed", "msr_blocked",
                                      "sct_landed", "sct_blocked", "benign_landed", "benign_blocked", "creds",
                                      "cr4_ok_landed", "cr4_ok_blocked", "collateral", "cpuid", "fault", "cr4"),
                       counters=15, magic=0x4C4E5850, no_fault=0,
                       denies={"smep_smap_guard": "cr4", "syscall_entry_guard": "msr"},
                       memory_deny=("protect_tables", "sct"), benign=("benign", "cr4_ok"),
                       counted={"trace_creds": "creds"}, never=("wp_guard", "no_exec_rodata")),
}
TINY_REPORT_GFN = 0x200
# The guests' counters of register writes (CR, MSR): the ones TEARDOWN_REGISTER_DROP applies to
REGISTER_COUNTERS = ("cr0", "cr3", "cr4", "msr")
# The emulators whose Xen has Intel VT-x with EPT (mem_access, altp2m): Bochs 2.7 (no MTF) and 3.0
VMX_MODES = ("bochs", "bochs3")

# Where the decision log and the guest's own counters may differ by a race no check can close, each
# named here and bounded; everywhere else the two must be equal.
# INSTALL_EDGE: an attack that landed just before install finished, whose counter the guest bumps
# (a few instructions later) after the window's first sample: at most one per attack per vCPU.
INSTALL_EDGE = 1
# SAMPLE_EDGE: an allowed trapped instruction (cpuid, a breakpoint, a collateral write) straddling
# one of the window's two edges is decided on one side of the sample and counted by the guest on
# the other: at most one per edge per vCPU.
SAMPLE_EDGE = 2
# TEARDOWN_REGISTER_DROP: a CR/MSR write whose event is in flight when teardown disables the ring is
# dropped by Xen (the write is deferred to the vCPU's resume and the ring's disable frees it,
# XEN-SEMANTICS §7): the guest sees one refusal no decision made, at most one per vCPU. A gap in
# policyc's teardown, seen live under Bochs 3.0 (sysenter_eip: 1,164 denies, 1,165 refusals); it
# only ever adds refusals, so a lost DENY (fewer refusals than denies) still fails.
TEARDOWN_REGISTER_DROP = 1
# DELIVERY_FIRST_TOUCH: the tiny guest's own int3 may trap up to 3 times more than its #BP handler
# counts, per vCPU, in the first round after install: the re-injected #BP's first deliveries in the
# fresh views exit without an event (most likely Xen filling the views lazily from the host p2m, one
# exit for each of the IDT, GDT and stack frames), and Xen never re-queues a software exception whose
# delivery exited, so the int3 runs and traps again (XEN-SEMANTICS §11.1). Seen live: 3 extra events
# in each of two runs (2026-12-07 09:47 and 10:05 UTC), four traps in a row in the first round, none
# after; only ever extra events, so a lost re-injection still fails.
DELIVERY_FIRST_TOUCH = 3
# KERNEL_OWN_CREDS: commit_creds calls the Linux guest's kernel makes itself in the window (the
# busybox init's children); the module counts only its own.
KERNEL_OWN_CREDS = 2
# Seconds between two LAB-RESULT parts under Bochs (160 characters each; its emulated UART is slow).
RESULT_PACE = 0.1
# The guest has run at least this many whole rounds since the enforcer exited before the "after"
# counters are read, so no increment of an attempt made while enforced is still on its way.
SETTLE_ROUNDS = 2


def stop_process(proc: subprocess.Popen, sig: int | None, timeout: float) -> bool:
    """Send `sig` (None: nothing, it is ending by itself) and wait up to `timeout` seconds; kill it
    after that. True when it had to be killed."""
    if sig is not None:
        proc.send_signal(sig)
    try:
        proc.wait(timeout=timeout)
        return False
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        return True


def process_cpu_seconds(pid: int) -> float | None:
    """utime + stime of a running process (None once it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def uptime() -> float:
    with open("/proc/uptime") as f:
        return float(f.read().split()[0])


def emit(name: str, value) -> None:
    print(f"LAB {name} {json.dumps(value, sort_keys=True)}", flush=True)


class ReportPage:
    """The guest's report page, mapped read-only from dom0."""

    def __init__(self, domid: int, gfn: int, kind: GuestKind) -> None:
        self.kind = kind
        lib = ctypes.CDLL("libxenforeignmemory.so.1", use_errno=True)
        lib.xenforeignmemory_open.restype = ctypes.c_void_p
        lib.xenforeignmemory_open.argtypes = [ctypes.c_void_p, ctypes.c_uint]
        lib.xenforeignmemory_map.restype = ctypes.c_void_p
        lib.xenforeignmemory_map.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int, ctypes.c_size_t,
                                             ctypes.POINTER(ctypes.c_ulong), ctypes.POINTER(ctypes.c_int)]
        self.lib = lib
        self.handle = lib.xenforeignmemory_open(None, 0)
        if not self.handle:
            raise OSError(ctypes.get_errno(), "xenforeignmemory_open")
        gfns = (ctypes.c_ulong * 1)(gfn)
        errs = (ctypes.c_int * 1)()
        addr = lib.xenforeignmemory_map(self.handle, domid, 1, 1, gfns, errs)  # PROT_READ
        if not addr or errs[0]:
            raise OSError(ctypes.get_errno() or -errs[0], f"xenforeignmemory_map gfn {gfn:#x}")
        self.words = (ctypes.c_uint32 * len(kind.fields)).from_address(addr)

    def read(self) -> dict:
        snap = dict(zip(self.kind.fields, list(self.words)))
        snap["t"] = round(time.monotonic(), 3)
        snap["wall"] = time.time()          # against the decision log's record times
        return snap

    def delta(self, a: dict, b: dict) -> dict:
        return {k: b[k] - a[k] for k in self.kind.counters} | {"seconds": round(b["t"] - a["t"], 3)}


def announced_report_gfn(domid: int, timeout: float) -> tuple[int, float]:
    """The Linux guest's report page: its attacker module prints "policyc-lab report gfn=0x..." on
    Xen's debug port once the kernel has booted and loaded it. Returns (gfn, seconds waited)."""
    t0 = time.monotonic()
    pattern = re.compile(rf"\(d{domid}\).*policyc-lab report gfn=(0x[0-9a-f]+)")
    while True:
        _, out = run(["xl", "dmesg"])
        found = pattern.findall(out)
        if found:
            return int(found[-1], 16), round(time.monotonic() - t0, 2)
        if time.monotonic() - t0 > timeout or "p" in domain_state(domid) and "r" not in domain_state(domid):
            raise TimeoutError(f"no report page announced by d{domid} after {time.monotonic() - t0:.0f} s "
                               f"(state {domain_state(domid)})")
        time.sleep(2.0)


def run(cmd: list[str], timeout: float = 120) -> tuple[int, str]:
    try:
        p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout)
        return p.returncode, p.stdout
    except (OSError, subprocess.TimeoutExpired) as e:
        return -1, f"{type(e).__name__}: {e}"


def domain_state(domid: int) -> str:
    rc, out = run(["xl", "list", str(domid)])
    lines = out.strip().splitlines()
    return lines[-1].split()[4] if rc == 0 and len(lines) >= 2 and len(lines[-1].split()) > 4 else f"? rc={rc}"


def domid_of(name: str, fallback: int) -> int:
    """The guest's domid now: a guest that crashed and was restarted by the toolstack comes back
    under its name with a new domid."""
    rc, out = run(["xl", "domid", name])
    return int(out.strip()) if rc == 0 and out.strip().isdigit() else fallback


def step_environment(policies: list[str]) -> dict:
    env: dict = {"python": sys.version.split()[0], "executable": sys.executable, "uptime": uptime()}
    t0 = time.monotonic()
    try:
        import policyc  # noqa: F401
        from policyc.native import _vm_event  # noqa: F401  the cffi ring extension
        env["import_policyc"] = "ok"
    except Exception as e:  # record, go on
        env["import_policyc"] = f"{type(e).__name__}: {e}"
    env["import_seconds"] = round(time.monotonic() - t0, 2)
    env.update(xen_release())
    t0 = time.monotonic()
    if not policies:
        env["check_rc"] = "skipped"
        return env
    rc, out = run([sys.executable, "-m", "policyc", "check", *policies])
    env["check_rc"], env["check_output"] = rc, out.strip().splitlines()[-3:]
    env["check_seconds"] = round(time.monotonic() - t0, 2)
    return env


def xen_release() -> dict:
    """The hypervisor's release (`xl info`) and the libxenctrl release policyc's backend loads: the
    lab runs 4.17 or 4.20 (lab.sh's LAB_XEN), and each must meet its own."""
    facts: dict = {}
    rc, out = run(["xl", "info"])
    info = dict(line.split(":", 1) for line in out.splitlines() if ":" in line) if rc == 0 else {}
    info = {k.strip(): v.strip() for k, v in info.items()}
    facts["xen_version"] = (f"{info['xen_major']}.{info['xen_minor']}{info.get('xen_extra', '')}"
                            if "xen_major" in info else f"xl info failed (rc {rc}): {out.strip()[-200:]}")
    try:
        from policyc.runtime.xen_libs import LIBRARIES, loaded_release
        release = loaded_release()          # first: it picks the soname LIBRARIES then names
        facts["xen_library"] = f"{LIBRARIES['xenctrl']} (Xen {release.version})"
    except Exception as e:  # record, go on
        facts["xen_library"] = f"{type(e).__name__}: {e}"
    return facts


def step_enforce(policy: str, domid: int, seconds: float, page: ReportPage | None,
                 startup: float = 240, target: str | None = None,
                 watch: strategies.PauseWatch | None = None, record: str | None = None, extra: tuple = ()) -> dict:
    """`policyc run` for `seconds` after its first decision, then SIGTERM. The comparison window runs
    from the first report-page sample taken after the enforcer said protection is in place to the
    last one taken before SIGTERM; the whole run from before start to a settled read after exit."""
    log = DECISION_LOG
    if os.path.exists(log):
        os.unlink(log)
    res: dict = {"policy": os.path.basename(policy), "seconds": seconds, "policy_rules": policy_rules(policy)}
    samples: list[dict] = []
    before = page.read() if page else None
    cmd = [sys.executable, "-m", "policyc", "run", policy, "--guest", f"xen:{domid}", "--log", log, *extra]
    if target:
        cmd += ["--target", target]
    if record:          # the request stream, for the simulator's replay (step_replay)
        cmd += ["--record", record]
        if os.path.exists(record):
            os.unlink(record)
    res["cmd"] = " ".join(cmd[1:])
    t_start = time.monotonic()
    # a crash of the enforcer (a signal) leaves its Python stack in the output tail
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONFAULTHANDLER="1")
    in_place = None          # index of the first sample taken after "in place after ..."
    with open("/tmp/policyc-run.out", "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
        # Start-up (import, compile, bind, install) is slow on an emulated CPU: the N seconds
        # start at the first decision (or after `startup` seconds without one).
        first_decision = None
        deadline = t_start + startup
        while time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.25)
            if in_place is None and "in place after" in _read("/tmp/policyc-run.out"):
                in_place = len(samples)
                res["in_place_after"] = round(time.monotonic() - t_start, 2)
            if page:
                samples.append(page.read())
                if watch:
                    watch(samples, in_place is not None)
            if first_decision is None and os.path.exists(log) and os.path.getsize(log) > 0:
                first_decision = time.monotonic()
                cpu_first = process_cpu_seconds(proc.pid)
                res["first_decision_after"] = round(first_decision - t_start, 2)
                deadline = first_decision + seconds
        exited_early = proc.poll() is not None
        if page and not exited_early:
            samples.append(page.read())      # the window's end: protection still in place
        if first_decision is not None and not exited_early:
            res["cpu_seconds_in_window"] = _cpu_delta(cpu_first, process_cpu_seconds(proc.pid))
        t_term = time.monotonic()
        if stop_process(proc, None if exited_early else signal.SIGTERM, 120):
            res["killed"] = True
    res["rc"] = proc.returncode
    res["exited_before_sigterm"] = exited_early
    res["teardown_seconds"] = round(time.monotonic() - t_term, 2)
    out_text = _read("/tmp/policyc-run.out")
    res["output_tail"] = out_text.strip().splitlines()[-15:]
    res["teardown_clean"] = bool(re.search(r"; teardown clean \(", out_text))
    if m := re.search(r"register-write denies: (\d+), (\d+) held .*\(longest ([\d.]+) ms\), (\d+) sent unconfirmed",
                      out_text):
        res["register_deny_holds"] = {"denies": int(m[1]), "held": int(m[2]), "longest_ms": float(m[3]),
                                      "unconfirmed": int(m[4])}
    if m := re.search(r"in place after (.*) \(([\d.]+) s\)", out_text):
        res["startup_phases"] = {k: float(v) for k, v in re.findall(r"(\w+) ([\d.]+) s", m[1])} | {"total": float(m[2])}
    after = settled_read(page) if page else None
    if res["rc"] not in (0, None) and not exited_early or res.get("killed"):
        # an enforcer that did not tear down leaves the monitor ring enabled: clean up (and the
        # comparison fails: a run that needed `recover` never counts as a pass)
        rc, out = run([sys.executable, "-m", "policyc", "recover", "--guest", f"xen:{domid}"], timeout=300)
        res["recover"] = {"rc": rc, "output_tail": out.strip().splitlines()[-5:]}

    decisions = read_decisions(log)
    by = collections.Counter((d.get("kind"), d.get("rule"), d.get("verdict")) for d in decisions)
    flags = collections.Counter((d.get("rule"), "|".join(d.get("response_flags") or [])) for d in decisions)
    res["response_flags_by_rule"] = {f"{r}/{f}": n for (r, f), n in sorted(flags.items(), key=str)}
    res["decisions"] = len(decisions)
    res["decisions_by_kind_rule_verdict"] = {f"{k}/{r}/{v}": n for (k, r, v), n in sorted(by.items(), key=str)}
    if first_decision is not None:
        res["events_per_second"] = rate_from_first(decisions, seconds)

    # both sides
    if page and before and after:
        res["guest_delta_whole_run"] = page.delta(before, after)
        res["guest_fault"] = after["fault"]
        if first_decision is not None:
            res["guest_rate_from_first_decision"] = guest_rates(page, samples, first_decision)
        window = samples[in_place:] if in_place is not None and not exited_early else []
        if len(window) >= 2:
            a, b = window[0], window[-1]
            res["window"] = {"seconds": round(b["t"] - a["t"], 3), "start": a["wall"], "end": b["wall"]}
            res["guest_delta_enforced_window"] = page.delta(a, b)
            in_window = collections.Counter(f"{d.get('rule')}/{d.get('verdict')}" for d in decisions
                                            if a["wall"] <= _epoch(d.get("time")) <= b["wall"])
            res["decisions_in_window"] = dict(sorted(in_window.items()))
            res.update(strategies.decision_facts(decisions, a["wall"], b["wall"], _epoch))
    if watch:
        res["policy_pauses"] = watch.seen
    return res


TRACE = "/tmp/trace.jsonl"
TRACE_AUDIT = "/tmp/trace-audit.jsonl"
DECISION_LOG = "/tmp/decisions.jsonl"
# The requests of the trace printed under Bochs (the dom0 replays all of them; the host, these)
BOCHS_SAMPLE_REQUESTS = 300


def step_replay(trace: str, log: str, policy: str, target: str | None, limit: int | None = None) -> dict:
    """The simulator checked against this hardware: the recorded requests' guest steps replayed
    through SimulatedXen under the same plan and decision engine, compared request by request and
    verdict by verdict (policyc.runtime.sim.replay_live; its summary goes into the results)."""
    t0 = time.monotonic()
    try:
        from policyc.runtime.sim.replay_live import replay_live_files
        summary = replay_live_files(trace, log, policy, target=target, limit=limit)
    except Exception as e:  # record, go on
        return {"error": f"{type(e).__name__}: {e}"[:600], "seconds": round(time.monotonic() - t0, 2)}
    summary["seconds"] = round(time.monotonic() - t0, 2)
    return summary


def emit_trace_sample(trace: str, log: str, max_requests: int, policy: str, target: str | None) -> None:
    """The trace (its first `max_requests` requests) with their decision records, gzipped, as `LAB-TRACE
    i/n` lines: tests/test_lab.py writes them to $LAB/trace-<mode>-<guest>.json and replays them all on
    the host (about 45 bytes of console a request); tests/data keeps a cut of one for CI."""
    import base64
    import gzip
    try:
        from policyc.runtime.sim.replay_live import trace_excerpt
        sample = trace_excerpt(trace, log, max_requests)
        sample.update(policy=os.path.basename(policy), target=target)     # what the host compiles again
    except Exception as e:  # record, go on
        print(f"LAB-ERR trace sample: {type(e).__name__}: {e}"[:400], flush=True)
        return
    print_parts("LAB-TRACE", base64.b64encode(gzip.compress(json.dumps(sample, sort_keys=True).encode())).decode(),
                RESULT_PACE)


def print_parts(tag: str, text: str, pace: float) -> None:
    """`text` as `TAG i/n PART` lines of 160 characters, `pace` seconds apart: Bochs drains Xen's serial
    slowly and Xen drops what overflows its buffer (RESULT_PACE); a Bochs 3.0 run lost characters inside
    its LAB-RESULT lines after the LAB-TRACE ones that way (2026-12-07 10:35)."""
    parts = [text[i:i + 160] for i in range(0, len(text), 160)]
    for i, part in enumerate(parts):
        print(f"{tag} {i + 1}/{len(parts)} {part}", flush=True)
        if pace:
            time.sleep(pace)


def policy_rules(policy: str) -> list[str]:
    """The rule names of a lab policy (DSL), read from its text: each must be compared with the guest."""
    try:
        return sorted(set(re.findall(r"^\s*rule\s+(\w+)\s*:", _read(policy), re.M)))
    except OSError:
        return []


def settled_read(page: ReportPage, timeout: float = 10.0) -> dict:
    """The report page once the guest has run SETTLE_ROUNDS whole rounds since now: an attempt made
    while enforced has been counted by then."""
    first = page.read()
    t_end = time.monotonic() + timeout
    snap = first
    while snap["round"] - first["round"] < SETTLE_ROUNDS and time.monotonic() < t_end:
        time.sleep(0.05)
        snap = page.read()
    return snap


def read_decisions(log: str) -> list[dict]:
    decisions = []
    if os.path.exists(log):
        with open(log) as f:
            for line in f:
                try:
                    decisions.append(json.loads(line))
                except ValueError:
                    pass
    return decisions


def rate_from_first(decisions: list[dict], seconds: float) -> float:
    """Decisions per second over `seconds` from the first decision (by the log's own times)."""
    times = sorted(_epoch(d.get("time")) for d in decisions)
    if not times:
        return 0.0
    n = sum(1 for t in times if t < times[0] + seconds)
    return round(n / seconds, 1)


def _epoch(iso: str | None) -> float:
    try:
        return datetime.datetime.fromisoformat(str(iso).replace("Z", "+00:00")).timestamp()
    except ValueError:
        return float("nan")


def _read(path: str) -> str:
    with open(path, errors="replace") as f:
        return f.read()


def decision_count(res: dict, rule: str, verdict: str | None = None) -> int:
    return sum(n for k, n in res.get("decisions_by_kind_rule_verdict", {}).items()
               if k.split("/")[1] == rule and (verdict is None or k.split("/")[2] == verdict))


def compare(mode: str, kind: GuestKind, res: dict) -> dict:
    """What each side says, rule by rule, and whether they agree. Each entry has `ok` (False with a
    `why` when they do not, or when a side is missing: a missing side never passes)."""
    out: dict = {"enforcer": _enforcer_exit(res)}
    win = res.get("guest_delta_enforced_window")
    whole = res.get("guest_delta_whole_run")
    in_win = res.get("decisions_in_window")
    if not (win and whole and in_win is not None and res.get("decisions")):
        out["sides"] = {"ok": False, "why": "no comparison window: the enforcer made no decision, the report "
                        "page was not read, or the enforcer exited before SIGTERM"}
        return out
    compared: set[str] = set()
    for rule, g in kind.deny_pairs(mode, res.get("policy_rules", ())):
        compared.add(rule)
        denies = decision_count(res, rule, "deny")
        c = {"deny_decisions": denies, "guest_blocked_whole_run": whole[f"{g}_blocked"],
             "guest_landed_while_enforced": win[f"{g}_landed"], "guest_blocked_while_enforced": win[f"{g}_blocked"]}
        # Exact over the whole run: a write is refused only while enforced, and only by a deny, so
        # every deny is a refusal the guest saw. A deny lost anywhere (Xen's early-DENY gap, at
        # install, at teardown) is a write that landed: one refusal short of the log.
        why = []
        extra = TEARDOWN_REGISTER_DROP * kind.vcpus if g in REGISTER_COUNTERS else 0
        if not denies <= whole[f"{g}_blocked"] <= denies + extra:
            why.append(f"{denies} deny decisions but the guest saw {whole[f'{g}_blocked']} refusals in the whole run"
                       + (f" (TEARDOWN_REGISTER_DROP allows {extra} more)" if extra else ""))
        if win[f"{g}_landed"] > INSTALL_EDGE * kind.vcpus:
            why.append(f"{win[f'{g}_landed']} attacks landed while enforced (INSTALL_EDGE allows "
                       f"{INSTALL_EDGE * kind.vcpus})")
        if win[f"{g}_blocked"] == 0:
            why.append("the guest made no attempt while enforced")
        out[rule] = _verdict(c, why)
    for rule, g in kind.counted.items():
        if rule not in res.get("policy_rules", ()):
            continue
        compared.add(rule)
        logged = sum(n for k, n in in_win.items() if k.split("/")[0] == rule)
        guest = win[g]
        extra = KERNEL_OWN_CREDS if g == "creds" else 0
        c = {"decisions_in_window": logged, "guest_count_in_window": guest}
        why = []
        if not (guest - SAMPLE_EDGE * kind.vcpus <= logged <= guest + SAMPLE_EDGE * kind.vcpus + extra):
            why.append(f"{logged} decisions in the window against {guest} counted by the guest (SAMPLE_EDGE "
                       f"{SAMPLE_EDGE * kind.vcpus}" + (f", KERNEL_OWN_CREDS {extra}" if extra else "") + ")")
        if guest == 0:
            why.append("the guest did not perform it while enforced")
        out[rule] = _verdict(c, why)
    for rule in kind.never:
        if rule in res.get("policy_rules", ()):
            compared.add(rule)
            n = decision_count(res, rule)
            out[rule] = _verdict({"decisions": n}, [f"{n} decisions for a trigger this guest never performs"] * bool(n))
    more = strategies.compare_more(mode, res, win, whole, in_win, SAMPLE_EDGE * kind.vcpus, decision_count,
                                   DELIVERY_FIRST_TOUCH * kind.vcpus)
    out.update(more)
    compared.update(more)
    for rule in res.get("policy_rules", ()):
        if rule not in compared:
            out[rule] = {"ok": False, "why": "no guest-side counterpart for this rule: the check cannot compare it"}
    for g in kind.benign:   # allowed work (an unwatched write, a CR4 write the policy permits) lands
        c = {"landed_while_enforced": win[f"{g}_landed"], "blocked_while_enforced": win[f"{g}_blocked"]}
        why = [f"{g}: blocked {win[f'{g}_blocked']} times"] * bool(win[f"{g}_blocked"]) + \
              [f"{g}: never landed while enforced"] * (not win[f"{g}_landed"])
        out[f"benign_{g}"] = _verdict(c, why)
    if kind.name == "linuxguest" and mode in VMX_MODES:
        # writes beside the table on its page: no rule claims them, Xen's emulator performs them
        logged = in_win.get("None/allow", 0)
        c = {"allow_decisions_in_window": logged, "guest_writes_in_window": win["collateral"]}
        ok = abs(logged - win["collateral"]) <= SAMPLE_EDGE * kind.vcpus and win["collateral"] > 0
        out["collateral_write"] = _verdict(c, [] if ok else ["collateral writes and allow decisions differ"])
    return out


def _enforcer_exit(res: dict) -> dict:
    """The enforcer must have run until SIGTERM, exited 0 and said its teardown was clean; a run that
    needed `policyc recover` or a kill never passes."""
    c = {"rc": res.get("rc"), "teardown_clean": res.get("teardown_clean"), "recovered": "recover" in res}
    why = []
    if res.get("rc") != 0:
        why.append(f"exit status {res.get('rc')}")
    if not res.get("teardown_clean"):
        why.append("teardown not reported clean")
    if "recover" in res or res.get("killed"):
        why.append("needed recover/kill")
    if res.get("exited_before_sigterm"):
        why.append("exited before SIGTERM")
    return _verdict(c, why)


def _verdict(c: dict, why: list[str]) -> dict:
    c["ok"] = not why
    if why:
        c["why"] = "; ".join(why)
    return c


def state_ok(state: str) -> bool:
    """`xl list` answered and the domain is neither paused nor dead (a failing `xl` is not "running")."""
    return bool(state) and not state.startswith("?") and not any(f in state for f in "pcsd")


def step_after_teardown(domid: int, page: ReportPage | None, mode: str) -> dict:
    res: dict = {"state": domain_state(domid)}
    if page:
        a = page.read()
        time.sleep(2.0 if page.kind.name == "labguest" else 5.0)   # the Linux guest's rounds sleep 10 ms
        b = page.read()
        d = page.delta(a, b)
        res["delta"] = d
        res["fault"] = b["fault"]
        # the attacks land again: the enforcer left nothing behind
        landed = [g for _, g in page.kind.deny_pairs(mode)]
        res["ok"] = (d["round"] > 0 and all(d[f"{g}_landed"] > 0 for g in landed)
                     and b["fault"] == page.kind.no_fault and state_ok(res["state"]))
    else:
        res["ok"] = False
    if not res["ok"]:
        res["guest_console_tail"] = guest_console_tail(page.kind.name if page else "")
    rc, out = run(["xl", "vcpu-list", str(domid)])
    res["vcpu_list"] = out.strip().splitlines()[-1:] if rc == 0 else out.strip().splitlines()[-2:]
    return res


def guest_console_tail(name: str, lines: int = 40) -> list[str]:
    """The end of the guest's own console (xenconsoled --log=guest), to see why a guest stopped."""
    try:
        with open(f"/var/log/xen/guest-{name}.log", errors="replace") as f:
            return f.read().splitlines()[-lines:]
    except OSError as e:
        return [f"{type(e).__name__}: {e}"]


def step_backend_calls(domid: int, gfn: int, page: ReportPage | None) -> dict:
    """policyc's Xen backend, call by call, where no policy in this lab reaches it: the x86_64-nomtf
    plans use the host p2m only, so altp2m views, shadow frames and register writes are exercised
    here directly (the guest paused, nothing left behind), each checked by reading back."""
    from policyc.runtime.xen_backend import XenBackend

    calls: list[dict] = []

    def call(name: str, fn, check=None):
        t0 = time.monotonic()
        try:
            value = fn()
        except Exception as e:  # record, go on
            calls.append({"call": name, "ok": False, "error": f"{type(e).__name__}: {e}"[:240]})
            return None
        ok = True if check is None else bool(check(value))
        calls.append({"call": name, "ok": ok, "value": repr(value)[:80], "ms": round(1000 * (time.monotonic() - t0), 1)})
        return value

    res: dict = {"gfn": hex(gfn)}
    try:
        be = XenBackend.open(str(domid))     # Xen's mem_access calls need a monitor ring (ENODEV)
    except Exception as e:
        return {"error": f"{type(e).__name__}: {e}", "ok": False}
    caps = be.capabilities()
    res["capabilities"] = {"arch": caps.arch, "mem_access": caps.mem_access, "altp2m": caps.altp2m,
                           "max_views": caps.max_views, "singlestep": caps.singlestep,
                           "monitors": sorted(caps.monitors)}
    be.pause()
    try:
        was_on = call("altp2m_get_state", be.altp2m_get_state)
        if not was_on:
            call("altp2m_set_state(on)", lambda: be.altp2m_set_state(True))
        view = call("create_view(rwx)", lambda: be.create_view("rwx"), lambda v: v > 0)
        if view is not None:
            call("set_access(view, gfn, r)", lambda: be.set_access(view, [gfn], "r"))
            call("get_access(view, gfn) == r", lambda: be.get_access(view, gfn), lambda a: a == "r")
            call("get_access(host p2m, gfn) == rwx", lambda: be.get_access(0, gfn), lambda a: a == "rwx")
            shadow = call("add_frame", be.add_frame)
            if shadow is not None:
                call("write_physical(shadow)", lambda: be.write_physical(shadow << 12, b"policyc-shadow"))
                call("change_gfn(view, gfn -> shadow)", lambda: be.change_gfn(view, gfn, shadow))
                call("change_gfn(view, gfn -> itself)", lambda: be.change_gfn(view, gfn, None))
                call("remove_frame(shadow)", lambda: be.remove_frame(shadow))
            call("current_view(vcpu 0) == 0", lambda: be.current_view(0), lambda v: v == 0)
            call("destroy_view", lambda: be.destroy_view(view))
        if not was_on:
            call("altp2m_set_state(off)", lambda: be.altp2m_set_state(False))
        regs = call("get_registers(0)", lambda: be.get_registers(0))
        if regs:
            keep = {k: regs[k] for k in ("rax", "rbx", "rcx", "rdx", "rsp", "rip", "rflags") if k in regs}
            call("set_registers(0, the same values)", lambda: be.set_registers(0, keep))
            call("get_registers(0) unchanged", lambda: be.get_registers(0),
                 lambda r: all(r[k] == v for k, v in keep.items()))
    finally:
        be.unpause()
        be.close()
    res["calls"] = calls
    res["state"] = domain_state(domid)
    if page:
        a = page.read()
        time.sleep(3.0)
        b = page.read()
        res["guest_rounds_after"] = b["round"] - a["round"]
    res["ok"] = all(c["ok"] for c in calls) and res.get("guest_rounds_after", 1) > 0
    return res


def step_xen_access(domid: int, mode: str, seconds: float, page: ReportPage | None) -> dict:
    """Xen's own client for `seconds` from its first event (like the enforcer: start-up not counted).
    Its output goes to a file, as the enforcer's log does (a reader in this process would take dom0
    CPU from it); the guest's own cpuid counter over the same window is the like-for-like figure."""
    marker = {"cpuid": "CPUID", "write": "PAGE ACCESS"}[mode]
    out_path = f"/tmp/xen-access-{mode}.out"
    samples = []
    first = None
    t0 = time.monotonic()
    with open(out_path, "w") as out:
        try:
            proc = subprocess.Popen(["xen-access", str(domid), mode], stdout=out, stderr=subprocess.STDOUT)
        except OSError as e:
            return {"mode": mode, "rc": -1, "error": f"{type(e).__name__}: {e}", "events_per_second": 0.0}
        deadline = t0 + 60                # the first event must come within a minute
        while time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.25)
            if page:
                samples.append(page.read())
            if first is None and marker in _read(out_path):
                first = time.monotonic()
                cpu_first = process_cpu_seconds(proc.pid)
                deadline = first + seconds
        t_term = time.monotonic()
        cpu_seconds = _cpu_delta(cpu_first, process_cpu_seconds(proc.pid)) if first is not None else None
        stop_process(proc, signal.SIGTERM if proc.poll() is None else None, 60)
    lines = _read(out_path).splitlines()
    n = sum(marker in line for line in lines)
    res = {"mode": mode, "rc": proc.returncode, "seconds": seconds, "events": n,
           "first_event_after": round(first - t0, 2) if first else None,
           # every event it printed, over the time from its first event (polled every 0.25 s) to SIGTERM
           "events_per_second": round(n / max(1e-3, t_term - first), 1) if first else 0.0,
           "head": lines[:4], "tail": lines[-3:], "cpu_seconds_in_window": cpu_seconds}
    if page and first is not None:
        res["guest_rate_from_first_event"] = guest_rates(page, samples, first)
    res["state_after"] = domain_state(domid)
    return res


def _cpu_delta(a: float | None, b: float | None) -> float | None:
    return round(b - a, 3) if a is not None and b is not None else None


def step_syscalls(cmd: list[str], ready: Callable[[str], bool], domid: int, page: ReportPage | None,
                  seconds: float = 6.0) -> dict:
    """One client's system calls per guest cpuid event: `strace -c -f` attached for `seconds` once
    it answers (a run of its own, outside the measured rounds: tracing slows what it traces)."""
    if shutil.which("strace") is None or page is None:
        return {"skipped": "no strace in dom0" if page else "no report page"}
    name = os.path.basename(cmd[0]) if cmd[0] != sys.executable else "policyc"
    out_path, trace_path = f"/tmp/syscalls-{name}.out", f"/tmp/syscalls-{name}.strace"
    res: dict = {"cmd": " ".join(cmd[1:] if name == "policyc" else cmd), "seconds": seconds}
    with open(out_path, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 240
        while proc.poll() is None and time.monotonic() < deadline and not ready(out_path):
            time.sleep(0.25)
        if proc.poll() is not None or not ready(out_path):
            proc.kill()
            proc.wait()
            return {**res, "error": "the client never answered"}
        a = page.read()
        tracer = subprocess.Popen(["strace", "-c", "-f", "-p", str(proc.pid), "-o", trace_path],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(seconds)
        stop_process(tracer, signal.SIGINT, 60)      # strace prints its table on SIGINT
        b = page.read()
        stop_process(proc, signal.SIGTERM, 120)
    res["rc"] = proc.returncode
    if name == "policyc" and proc.returncode != 0:
        res["recover_rc"] = run([sys.executable, "-m", "policyc", "recover", "--guest", f"xen:{domid}"], timeout=300)[0]
    events = b["cpuid"] - a["cpuid"]
    calls = strace_counts(_read(trace_path))
    res["events"] = events
    if events > 0 and calls:
        res["per_event"] = {k: round(v / events, 2) for k, v in sorted(calls.items(), key=lambda kv: -kv[1])}
        res["total_per_event"] = round(sum(calls.values()) / events, 2)
    return res


def strace_counts(text: str) -> dict[str, int]:
    """`strace -c`'s table: calls per system call."""
    counts: dict[str, int] = {}
    for line in text.splitlines():
        f = line.split()
        # % time, seconds, usecs/call, calls, [errors,] syscall
        if len(f) >= 5 and f[-1] not in ("total", "syscall") and f[3].isdigit():
            counts[f[-1]] = int(f[3])
    return counts


def guest_rates(page: ReportPage, samples: list[dict], since: float) -> dict:
    """The guest's counters per second between the first sample after `since` and the last one."""
    window = [s for s in samples if s["t"] >= since]
    if len(window) < 2:
        return {}
    d = page.delta(window[0], window[-1])
    return {k: round(v / d["seconds"], 1) for k, v in d.items() if k != "seconds" and d["seconds"] > 0}


def summarize(result: dict) -> dict:
    """The run's verdict, part by part: what tests/test_lab.py asserts."""
    env, g = result.get("environment", {}), result.get("guest_before", {})
    enf, aft = result.get("enforce", {}), result.get("after_teardown", {})
    # the audit run's verdicts and its teardown count as the first run's do
    cmp = {**result.get("compare", {}), **{f"audit:{k}": c for k, c in result.get("compare_audit", {}).items()}}
    enforcer_ran = bool(enf.get("decisions"))
    base = result.get("enforce_baseline", {})
    xa = {x["mode"]: x for x in result.get("xen_access", [])}
    like = like_for_like(result.get("like_for_like_rounds", []))
    return {
        "import_policyc": env.get("import_policyc") == "ok",
        "policyc_check": env.get("check_rc") == 0,          # skipped is not passed
        "guest_running": bool(g.get("magic_ok")) and g.get("rounds_per_second", 0) > 0,
        "enforcer_ran": enforcer_ran,
        "enforcer_rc": enf.get("rc"),
        "verdicts_agree": bool(enforcer_ran and cmp and all(c.get("ok") is True for c in cmp.values())),
        "disagreements": {k: c.get("why") for k, c in cmp.items() if c.get("ok") is not True},
        "guest_runs_after_teardown": aft.get("ok") is True and result.get("after_audit", {"ok": True}).get("ok") is True,
        "memory_policy_refused": result.get("capability_refusal", {}).get("ok"),
        "backend_calls_ok": result.get("backend_calls", {}).get("ok"),
        "guest_restarted_before_check": "guest_restarted" in result,
        "enforcer_events_per_second": enf.get("events_per_second"),
        "replay_matches_live": bool(result.get("replay", {}).get("ok")
                                    and result.get("replay_audit", {"ok": True}).get("ok")),
        "enforcer_baseline_cpuid_events_per_second": base.get("events_per_second"),
        "xen_access_events_per_second": {m: x.get("events_per_second") for m, x in xa.items()},
        "like_for_like_cpuid": like,
    }


def like_for_like(rounds: list[dict]) -> dict | None:
    """The enforcer (cpuid-only policy) against xen-access cpuid, round by round in one boot: the
    guest's own cpuid count per second from each client's first event, the ratio of each round, and
    their median (rounds alternate which client goes first, so a drift of the emulator's speed
    through the boot does not favour either); dom0 CPU per event of each client."""
    per_round = []
    for r in rounds:
        ours = r["policyc"].get("guest_rate_from_first_decision", {}).get("cpuid")
        theirs = r["xen_access"].get("guest_rate_from_first_event", {}).get("cpuid")
        row = {"first": r["first"], "policyc_cpuid_per_second": ours, "xen_access_cpuid_per_second": theirs,
               "ratio": round(ours / theirs, 3) if ours and theirs else None}
        for who, side, rate in (("policyc", r["policyc"], ours), ("xen_access", r["xen_access"], theirs)):
            cpu = side.get("cpu_seconds_in_window")
            if cpu is not None and rate:
                row[f"{who}_cpu_ms_per_event"] = round(1000 * cpu / (rate * side["seconds"]), 3)
        per_round.append(row)
    ratios = sorted(r["ratio"] for r in per_round if r["ratio"] is not None)
    if not ratios:
        return None
    mid = len(ratios) // 2
    median = ratios[mid] if len(ratios) % 2 else round((ratios[mid - 1] + ratios[mid]) / 2, 3)
    return {"ratio": median, "rounds": per_round}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mode", choices=("qemu", *VMX_MODES), required=True)
    ap.add_argument("--guest", choices=sorted(GUESTS), default="tiny")
    ap.add_argument("--target", help="compile the policy for this target (`policyc run --target`)")
    ap.add_argument("--boot-timeout", type=float, default=600,
                    help="seconds to wait for the Linux guest to announce its report page")
    ap.add_argument("--policy", required=True)
    ap.add_argument("--check", nargs="*", default=None, help="policies to `policyc check` (default: --policy)")
    ap.add_argument("--domid", type=int, required=True)
    ap.add_argument("--seconds", type=float, default=20)
    ap.add_argument("--audit-policy", help="a mode-audit policy run after --policy (would-deny against what the "
                    "guest saw land)")
    ap.add_argument("--baseline", help="a cpuid-only policy, run like --policy, to compare with xen-access cpuid")
    ap.add_argument("--like-rounds", type=int, default=3,
                    help="rounds of the baseline against xen-access cpuid (alternating which goes first)")
    ap.add_argument("--startup", type=float, default=240, help="seconds allowed until the first decision")
    ap.add_argument("--must-refuse", help="a memory policy this host's target cannot enforce: compiling it for "
                    "--host-target must fail with the capability error")
    ap.add_argument("--host-target", default="x86_64-svm")
    ap.add_argument("--sample-requests", type=int, default=30000,
                    help="requests of the recorded trace printed (LAB-TRACE lines) for the host's replay")
    a = ap.parse_args()
    kind = GUESTS[a.guest]
    result: dict = {"mode": a.mode, "guest": a.guest, "domid": a.domid}

    result["environment"] = env = step_environment(a.check or [a.policy])
    emit("environment", env)

    created = a.domid
    a.domid = domid_of(kind.name, a.domid)
    if a.domid != created:
        # Reported, not hidden: the guest died and the toolstack restarted it before the check began.
        result["guest_restarted"] = {"created_as": created, "now": a.domid}
        emit("guest_restarted", result["guest_restarted"])
        result["domid"] = a.domid

    page = None
    try:
        waited = None
        gfn = TINY_REPORT_GFN
        if a.guest == "linux":
            gfn, waited = announced_report_gfn(a.domid, a.boot_timeout)
            print(f"LAB-T guest_booted {uptime()}", flush=True)
        page = ReportPage(a.domid, gfn, kind)
        page_gfn = gfn
        snap = page.read()
        time.sleep(1.0 if a.guest == "tiny" else 3.0)
        snap2 = page.read()
        result["guest_before"] = g = {"magic_ok": snap["magic"] == kind.magic, "rounds_per_second": round(
            (snap2["round"] - snap["round"]) / (snap2["t"] - snap["t"]), 1), "report": snap2,
            "report_gfn": hex(gfn), "boot_wait_seconds": waited, "state": domain_state(a.domid)}
    except Exception as e:
        result["guest_before"] = g = {"error": f"{type(e).__name__}: {e}"}
    emit("guest_before", g)

    if a.must_refuse:
        rc, out = run([sys.executable, "-m", "policyc", "compile", a.must_refuse, "--target", a.host_target,
                       "-o", "/tmp/refused.plan.json"], timeout=300)
        lines = [line for line in out.splitlines() if line.startswith("error[")]
        result["capability_refusal"] = ref = {
            "rc": rc, "errors": lines[:4],
            "ok": rc == 1 and any(a.host_target in line and "watch memory" in line for line in lines)
            and not os.path.exists("/tmp/refused.plan.json")}
        emit("capability_refusal", ref)

    t0 = uptime()
    result["enforce"] = enf = step_enforce(a.policy, a.domid, a.seconds, page, a.startup, a.target,
                                           watch=strategies.PauseWatch(a.domid, domain_state, run), record=TRACE)
    enf["dom0_seconds"] = round(uptime() - t0, 2)
    emit("enforce", enf)
    result["compare"] = cmp = compare(a.mode, kind, enf)
    emit("compare", cmp)
    result["replay"] = rep = step_replay(TRACE, DECISION_LOG, a.policy, a.target)
    emit("replay", rep)
    # Bochs's console carries about 25 lines a minute under load (0.2 lines a request): a cut there
    emit_trace_sample(TRACE, DECISION_LOG, a.sample_requests if a.mode == "qemu" else BOCHS_SAMPLE_REQUESTS,
                      a.policy, a.target)
    result["after_teardown"] = aft = step_after_teardown(a.domid, page, a.mode)
    emit("after_teardown", aft)
    if a.audit_policy:
        result["audit"] = aud = step_enforce(a.audit_policy, a.domid, a.seconds, page, a.startup, a.target,
                                             record=TRACE_AUDIT)
        emit("audit", aud)
        result["replay_audit"] = rep = step_replay(TRACE_AUDIT, DECISION_LOG, a.audit_policy, a.target)
        emit("replay_audit", rep)
        result["compare_audit"] = c = strategies.compare_audit(aud, SAMPLE_EDGE * kind.vcpus, decision_count,
                                                               _enforcer_exit(aud))
        emit("compare_audit", c)
        result["after_audit"] = aft = step_after_teardown(a.domid, page, a.mode)
        emit("after_audit", aft)

    if a.mode in VMX_MODES and page:
        result["backend_calls"] = calls = step_backend_calls(a.domid, page_gfn, page)
        emit("backend_calls", calls)

    result["xen_access"] = []
    result["like_for_like_rounds"] = rounds = []
    for i in range(a.like_rounds if a.baseline else 0):
        sides = {}
        order = ("policyc", "xen_access") if i % 2 == 0 else ("xen_access", "policyc")
        for who in order:
            if who == "policyc":
                sides[who] = base = step_enforce(a.baseline, a.domid, a.seconds, page, a.startup)
                base.pop("output_tail", None)
                emit(f"enforce_baseline_{i + 1}", base)
            else:
                sides[who] = xa = step_xen_access(a.domid, "cpuid", a.seconds, page)
                emit(f"xen_access_cpuid_{i + 1}", xa)
        rounds.append({"first": order[0], **sides})
        if i == 0:
            result["enforce_baseline"] = sides["policyc"]
            result["xen_access"].append(sides["xen_access"])
    if rounds:
        log = "/tmp/decisions-syscalls.jsonl"
        result["syscalls_per_event"] = sc = {
            "policyc": step_syscalls([sys.executable, "-m", "policyc", "run", a.baseline, "--guest", f"xen:{a.domid}",
                                      "--log", log], lambda _out: os.path.exists(log) and os.path.getsize(log) > 0,
                                     a.domid, page),
            "xen_access": step_syscalls(["xen-access", str(a.domid), "cpuid"], lambda out: "CPUID" in _read(out),
                                        a.domid, page)}
        emit("syscalls_per_event", sc)
    for m in (["cpuid"] if not rounds else []) + (["write"] if a.mode in VMX_MODES else []):
        xa = step_xen_access(a.domid, m, a.seconds, page)
        result["xen_access"].append(xa)
        emit(f"xen_access_{m}", xa)
    result["after_xen_access"] = aft2 = step_after_teardown(a.domid, page, a.mode)
    emit("after_xen_access", aft2)

    result["summary"] = summarize(result)
    # short lines: Xen's console may slip a guest's line between two writes of a long one
    print_parts("LAB-RESULT", json.dumps(result, sort_keys=True), RESULT_PACE if a.mode in VMX_MODES else 0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
