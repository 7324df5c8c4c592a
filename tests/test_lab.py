"""The Xen lab (tests/lab/): real Xen 4.17 (LAB_XEN=4.20: Debian 13's 4.20) in QEMU TCG, policyc
enforcing on a live guest.

Runs only with POLICYC_LAB=1 and the lab's packages installed (`tests/lab/lab.sh setup`);
it boots the QEMU lab twice, with the tiny guest and with the Linux guest (about 2 minutes
each), and checks what the dom0 driver (tests/lab/dom0_check.py) printed between the markers.
POLICYC_LAB_BOCHS=1 also runs the Bochs lab: the example kernel-integrity policy, memory
rules included, on the Linux guest (LAB_GUEST=tiny: the tiny guest's memory policy).
"""

from __future__ import annotations

import base64
import gzip
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
LAB_SH = HERE / "lab" / "lab.sh"
# LAB_XEN: the Xen release the lab runs, 4.17 (Debian 12, the machine's) or 4.20 (Debian 13's, fetched by
# lab.sh into its own $LAB)
LAB_XEN = os.environ.get("LAB_XEN", "4.17")
WORK = Path(os.environ.get("LAB", "/tmp/policyc-lab" if LAB_XEN == "4.17" else f"/tmp/policyc-lab-{LAB_XEN}"))
LINUX_GUEST_KERNEL = "6.1.0-56-amd64"   # lab.sh's KPKG: the build the example policies name


def _skip_reason(mode: str) -> str | None:
    if os.environ.get("POLICYC_LAB") != "1":
        return "the Xen lab runs only with POLICYC_LAB=1 (see tests/lab/README.md)"
    need = ["qemu-system-x86_64", "cpio", "busybox"] + (["bochs-bin", "grub-mkrescue"] if mode == "bochs" else [])
    need += ["grub-mkrescue", "script"] if mode == "bochs3" else []
    missing = [b for b in need if shutil.which(b) is None]
    # Xen 4.20 comes from Debian 13 at build time (lab.sh fetches it); 4.17 is installed by setup
    missing += [p for p in ("/boot/xen-4.17-amd64.gz", "/usr/lib/xen-4.17/bin/xl")
                if LAB_XEN == "4.17" and not os.path.exists(p)]
    if missing:
        return f"the Xen lab needs {', '.join(missing)}: run tests/lab/lab.sh setup"
    return None


def parse_lab_output(text: str) -> dict:
    """The markers of one lab run: `LAB-T` timings, `LAB <step> <json>` lines and the
    result reassembled from its `LAB-RESULT i/n PART` pieces."""
    begin, end = text.find("=== LAB-BEGIN"), text.find("=== LAB-END")
    out: dict = {"begin": begin >= 0, "end": end >= 0, "times": {}, "steps": {}, "errors": []}
    body = text[begin:end if end >= 0 else None] if begin >= 0 else ""
    parts: dict[int, str] = {}
    trace_parts: dict[int, str] = {}
    total = trace_total = None
    for line in body.splitlines():
        line = line.rstrip("\r")
        if m := re.match(r"LAB-TRACE (\d+)/(\d+) (\S+)$", line):
            trace_parts[int(m.group(1))] = m.group(3)
            trace_total = int(m.group(2))
        elif m := re.match(r"LAB-T (\w+) ([\d.]+)", line):
            out["times"][m.group(1)] = float(m.group(2))
        elif m := re.match(r"LAB-RESULT (\d+)/(\d+) (.*)$", line):
            parts[int(m.group(1))] = m.group(3)
            total = int(m.group(2))
        elif m := re.match(r"LAB (\w+) (\{.*\})$", line):
            try:
                out["steps"][m.group(1)] = json.loads(m.group(2))
            except ValueError:
                pass
        elif line.startswith("LAB-ERR"):
            out["errors"].append(line)
    if total and len(parts) == total:
        try:
            out["result"] = json.loads("".join(parts[i] for i in range(1, total + 1)))
        except ValueError as exc:
            out["errors"].append(f"LAB-RESULT does not parse: {exc}")
    if trace_total and len(trace_parts) == trace_total:
        try:
            blob = base64.b64decode("".join(trace_parts[i] for i in range(1, trace_total + 1)))
            out["trace_sample"] = json.loads(gzip.decompress(blob))
        except (ValueError, OSError) as exc:
            out["errors"].append(f"LAB-TRACE does not decode: {exc}")
    if m := re.search(r"=== LAB-WALL \w+ seconds=(\d+)", text):
        out["wall_seconds"] = int(m.group(1))
    # boots lab.sh cut and booted again because dom0's /init never began (the emulator stalled)
    out["boot_stalls"] = re.findall(r"^=== LAB-BOOT-STALL (.*)$", text, re.M)
    # what the console printed last, for a run that did not reach its end marker
    out["console_tail"] = [ln for ln in text.splitlines() if ln.strip()][-25:]
    return out


def _run_lab(mode: str, timeout: int, guest: str | None = None) -> dict:
    env = dict(os.environ, LAB=str(WORK), LAB_XEN=LAB_XEN, LAB_SECONDS=os.environ.get("LAB_SECONDS", "15"))
    if guest:
        env["LAB_GUEST"] = guest
    if not (WORK / "dom0.cpio.gz").exists() or os.environ.get("POLICYC_LAB_REBUILD", "1") == "1":
        subprocess.run([str(LAB_SH), "build"], env=env, check=True, timeout=600,
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    p = subprocess.run([str(LAB_SH), mode], env=env, timeout=timeout, stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, text=True, errors="replace")
    parsed = parse_lab_output(p.stdout)
    (WORK / f"console-{mode}-{guest or env.get('LAB_GUEST', 'default')}.log").write_text(p.stdout)
    shown = {k: v for k, v in parsed.items() if k not in ("result", "trace_sample", "console_tail")}
    print(json.dumps(shown, indent=1, sort_keys=True)[:20000])
    if "trace_sample" in parsed:      # a real recording's first requests, for tests/data (replay_live)
        sample = WORK / f"trace-{mode}-{guest or env.get('LAB_GUEST', 'default')}.json"
        sample.write_text(json.dumps(parsed["trace_sample"], sort_keys=True) + "\n")
        print(f"trace sample: {sample}")
        parsed["replay_host"] = replay_on_host(sample)
        print(f"replay on the host: {json.dumps(parsed['replay_host'], sort_keys=True)[:3000]}")
    if "result" in parsed:
        out = WORK / f"result-{mode}-{guest or env.get('LAB_GUEST', 'default')}.json"
        out.write_text(json.dumps(run_result(parsed), indent=1, sort_keys=True) + "\n")
        print(f"result: {out}")
    return parsed


def replay_on_host(sample_path: Path) -> dict:
    """The simulator checked against this live run (runtime/sim/replay_live.py): every recorded request
    of the trace the dom0 printed, replayed through SimulatedXen under the policy it enforced, compiled
    here for the same target; the summary (matched, differences by kind)."""
    import tempfile

    from policyc.plan_source import load_plan_source
    from policyc.runtime.sim.replay_live import load_sample, replay_live

    sample = json.loads(sample_path.read_text())
    examples = HERE.parent / "examples" / "policies"
    policy = next((p for p in (HERE / "lab" / "policies" / sample["policy"], examples / sample["policy"])
                   if p.exists()), None)
    if policy is None:
        return {"ok": False, "error": f"no policy {sample['policy']} in the repository"}
    with tempfile.TemporaryDirectory() as tmp:
        # laid out as in dom0 (lab.sh): the policy with the example symbol files it names beside it
        shutil.copy(policy, tmp)
        for name in re.findall(r'^\s*symbols\s+"([^"]+)"', policy.read_text(), re.M):
            if (examples / name).exists() and not (policy.parent / name).exists():
                shutil.copy(examples / name, tmp)
            elif (policy.parent / name).exists():
                shutil.copy(policy.parent / name, tmp)
        compiled = load_plan_source(str(Path(tmp) / policy.name), sample.get("target"))
        trace, decisions = load_sample(sample_path, tmp)
        return replay_live(trace, decisions, compiled.plan, compiled.symbols).summary()


def run_result(lab: dict) -> dict:
    """What a run's result file keeps: per rule of the policy, the answers Xen was given (the
    strategy's response flags), the decisions and the guest's own count, and whether they agree."""
    r = lab["result"]
    enforce = r.get("enforce") or {}
    flags = enforce.get("response_flags_by_rule") or {}
    rules = {}
    for rule, c in (r.get("compare") or {}).items():
        if rule == "enforcer":
            continue
        rules[rule] = dict(c, responses={k.split("/", 1)[1]: n for k, n in flags.items()
                                         if k.split("/", 1)[0] == rule})
    # the audit-mode run after it in the same boot (Bochs 3.0): its rules as audit:<rule>
    audit_flags = (r.get("audit") or {}).get("response_flags_by_rule") or {}
    for rule, c in (r.get("compare_audit") or {}).items():
        if rule != "enforcer":
            rules[f"audit:{rule}"] = dict(c, responses={k.split("/", 1)[1]: n for k, n in audit_flags.items()
                                                        if k.split("/", 1)[0] == rule})
    env = r.get("environment") or {}
    return {"mode": r.get("mode"), "xen": {k: env.get(k) for k in ("xen_version", "xen_library")},
            "policy": enforce.get("policy"), "rules": rules,
            "enforcer": (r.get("compare") or {}).get("enforcer"), "summary": r.get("summary"),
            "replay": {"dom0": r.get("replay"), "host": lab.get("replay_host")},
            "times": lab.get("times"), "wall_seconds": lab.get("wall_seconds")}


def _assert_reached_end(lab: dict, what: str = "the dom0 /init") -> None:
    if lab["boot_stalls"]:
        print(f"the emulator's boot stalled before dom0's /init and was booted again: {lab['boot_stalls']}")
    assert lab["begin"] and lab["end"], (f"{what} did not reach the end markers; the console's last lines:\n"
                                         + "\n".join(lab["console_tail"]))


def _check_common(lab: dict) -> dict:
    _assert_reached_end(lab)
    assert "toolstack_ready" in lab["times"] and "guest_created" in lab["times"]
    assert "result" in lab, f"no result: {lab['errors']}"
    s = lab["result"]["summary"]
    assert s["import_policyc"], lab["result"]["environment"]
    # the hypervisor asked for, and policyc's backend speaking to it through that release's libxenctrl
    env = lab["result"]["environment"]
    assert str(env.get("xen_version")).startswith(LAB_XEN + "."), env
    assert f"(Xen {LAB_XEN})" in str(env.get("xen_library")), env
    assert s["policyc_check"], lab["result"]["environment"]
    assert s["guest_running"], lab["result"]["guest_before"]
    assert s["enforcer_ran"], lab["result"]["enforce"].get("output_tail")
    assert s["verdicts_agree"], (s["disagreements"], lab["result"]["compare"])
    assert s["guest_runs_after_teardown"], lab["result"]["after_teardown"]
    # the simulator checked against this hardware (runtime/sim/replay_live.py): the same requests and
    # verdicts for the recorded guest steps, but for differences documented in docs/XEN-SEMANTICS.md
    rep = lab["result"].get("replay") or {}
    assert rep.get("ok") and rep.get("requests", 0) > 0, rep
    if "audit" in lab["result"]:      # the audit-mode run of the same boot, recorded and replayed too
        aud = lab["result"].get("replay_audit") or {}
        assert aud.get("ok") and aud.get("requests", 0) > 0, aud
    host = lab.get("replay_host") or {}          # the whole trace from QEMU, a cut from Bochs
    assert host.get("ok") and host["requests"] == lab["trace_sample"]["requests"] > 0, host
    assert host["requests"] == lab["result"]["enforce"]["decisions"] or lab["result"]["mode"] != "qemu", host
    return s


def test_parse_lab_output() -> None:
    text = ("noise\n=== LAB-BEGIN mode=qemu seconds=1\nLAB-T dom0_init 8.11\n(d1) LABGUEST round=1\n"
            'LAB environment {"check_rc": 0}\nLAB-RESULT 1/2 {"summary": \nLAB-RESULT 2/2 {"x": 1}}\n'
            "=== LAB-END\n=== LAB-WALL qemu seconds=71\n")
    lab = parse_lab_output(text)
    assert lab["times"] == {"dom0_init": 8.11}
    assert lab["steps"]["environment"] == {"check_rc": 0}
    assert lab["result"] == {"summary": {"x": 1}}
    assert lab["wall_seconds"] == 71
    assert lab["boot_stalls"] == []


def test_parse_lab_output_of_a_stalled_boot() -> None:
    # the first boot cut by lab.sh's watchdog, the second reaching dom0's /init
    text = ("[    7.2] Loading compiled-in X.509 certificates\n"
            "=== LAB-BOOT-STALL qemu attempt=1 seconds=300 last=[    7.2] Loading compiled-in X.509 certificates\n"
            "=== LAB-BEGIN mode=qemu seconds=1\nLAB-T dom0_init 8.11\n=== LAB-END\n=== LAB-WALL qemu seconds=371\n")
    lab = parse_lab_output(text)
    assert lab["begin"] and lab["end"] and lab["times"] == {"dom0_init": 8.11}
    assert lab["boot_stalls"] == ["qemu attempt=1 seconds=300 last=[    7.2] Loading compiled-in X.509 certificates"]
    stalled = parse_lab_output(text.split("=== LAB-BEGIN")[0])
    assert not stalled["begin"] and stalled["console_tail"][-1].startswith("=== LAB-BOOT-STALL")


def test_qemu_lab() -> None:
    if reason := _skip_reason("qemu"):
        print(f"SKIP: {reason}")
        pytest.skip(reason)
    lab = _run_lab("qemu", timeout=1500)
    s = _check_common(lab)
    # the AMD host cannot watch memory: compiling the memory policy for its target is refused
    assert s["memory_policy_refused"], lab["result"].get("capability_refusal")
    print(f"qemu lab, tiny guest: wall {lab.get('wall_seconds')} s, toolstack at {lab['times']['toolstack_ready']} s, "
          f"enforcer {s['enforcer_events_per_second']} events/s, xen-access {s['xen_access_events_per_second']}, "
          f"like for like (cpuid, the guest's count) {s['like_for_like_cpuid']}")


def test_qemu_linux_lab() -> None:
    """Debian's 6.1.0-56 kernel as a PVH guest, its attacker module clearing CR4.SMEP and moving
    LSTAR: the register rules of the example kernel-integrity policy deny both, seen from both
    sides; the example policy itself is refused for this AMD host."""
    if reason := _skip_reason("qemu") or _linux_guest_missing():
        print(f"SKIP: {reason}")
        pytest.skip(reason)
    lab = _run_lab("qemu", timeout=900, guest="linux")
    s = _check_common(lab)
    assert lab["result"]["guest"] == "linux"
    assert s["memory_policy_refused"], lab["result"].get("capability_refusal")
    cmp = lab["result"]["compare"]
    assert cmp["smep_smap_guard"]["ok"] and cmp["syscall_entry_guard"]["ok"], cmp
    assert cmp["benign_cr4_ok"]["ok"], cmp   # a CR4 write the policy permits still lands
    print(f"qemu lab, Linux guest: wall {lab.get('wall_seconds')} s, guest booted at "
          f"{lab['times'].get('guest_booted')} s, enforcer {s['enforcer_events_per_second']} events/s, "
          f"xen-access {s['xen_access_events_per_second']}")


def _linux_guest_missing() -> str | None:
    if not Path(f"/usr/src/linux-headers-{LINUX_GUEST_KERNEL}").is_dir():
        return f"the lab's Linux guest needs linux-headers-{LINUX_GUEST_KERNEL}: run tests/lab/lab.sh setup"
    return None


def test_bochs_lab() -> None:
    if reason := _skip_reason("bochs"):
        print(f"SKIP: {reason}")
        pytest.skip(reason)
    if os.environ.get("POLICYC_LAB_BOCHS") != "1":
        print("SKIP: the Bochs lab (several minutes) runs only with POLICYC_LAB_BOCHS=1")
        pytest.skip("the Bochs lab (several minutes) runs only with POLICYC_LAB_BOCHS=1")
    guest = os.environ.get("LAB_GUEST", "linux")
    if guest == "linux" and (reason := _linux_guest_missing()):
        print(f"SKIP: {reason}")
        pytest.skip(reason)
    lab = _run_lab("bochs", timeout=3000, guest=guest)
    s = _check_common(lab)
    cmp = lab["result"]["compare"]
    if guest == "linux":
        # linux-kernel-integrity.vmi as written: the sys_call_table write, CR4.SMEP and LSTAR denied,
        # commit_creds's breakpoint logged, and after teardown every attack lands again
        for rule in ("protect_tables", "smep_smap_guard", "syscall_entry_guard", "trace_creds"):
            assert cmp[rule]["ok"], (rule, cmp)
    else:
        assert cmp["watched_write"]["ok"], cmp
    # altp2m, shadow frames and register writes, which no x86_64-nomtf plan uses, call by call
    assert s["backend_calls_ok"], lab["result"].get("backend_calls")
    print(f"bochs lab, {guest} guest: wall {lab.get('wall_seconds')} s, enforcer "
          f"{s['enforcer_events_per_second']} events/s, xen-access {s['xen_access_events_per_second']}")


def test_bochs3_lab() -> None:
    """Bochs 3.0 (VT-x with EPT and the monitor trap flag): the memory policy compiled for x86_64,
    so altp2m views with FAST_SINGLESTEP and the breakpoint in a shadow frame run on live Xen."""
    if reason := _skip_reason("bochs3"):
        print(f"SKIP: {reason}")
        pytest.skip(reason)
    if os.environ.get("POLICYC_LAB_BOCHS3") != "1":
        print("SKIP: the Bochs 3.0 lab (several minutes) runs only with POLICYC_LAB_BOCHS3=1")
        pytest.skip("the Bochs 3.0 lab (several minutes) runs only with POLICYC_LAB_BOCHS3=1")
    bochs3 = Path(os.environ.get("BOCHS3", "/opt/bochs3")) / "bin" / "bochs"
    if not bochs3.exists():
        reason = f"no Bochs 3.0 at {bochs3}: run tests/lab/lab.sh bochs3-build"
        print(f"SKIP: {reason}")
        pytest.skip(reason)
    guest = os.environ.get("LAB_GUEST", "tiny")
    lab = _run_lab("bochs3", timeout=3000, guest=guest)
    s = _check_common(lab)
    assert lab["result"]["mode"] == "bochs3"
    flags = lab["result"]["enforce"]["response_flags_by_rule"]
    if guest == "tiny":
        # the x86_64 target's strategies, each answered as the plan says and counted by the guest
        # (the comparison above): the breakpoint from the shadow frame's view switch (FAST_SINGLESTEP
        # back), the read fed its word, the execute answered with an injected #UD, the write emulated
        # without its store
        assert any(k.startswith("bp_site/") and "FAST_SINGLESTEP" in k for k in flags), flags
        assert any(k.startswith("secret_read/") and "SET_EMUL_READ_DATA" in k for k in flags), flags
        assert any(k.startswith("watched_write/") and "EMULATE_NOWRITE" in k for k in flags), flags
        assert any(k.startswith("exec_guard/") for k in flags), flags
        # an allowed descriptor-table load emulated; audit mode's would-deny write stepped over, not emulated
        assert any(k.startswith("ldt_load/") and "EMULATE" in k for k in flags), flags
        audit = lab["result"]["audit"]["response_flags_by_rule"]
        assert any(k.startswith("watched_write/") and "FAST_SINGLESTEP" in k for k in audit), audit
        # then the long-mode guest (tests/lab/dom0_remap.py): a watched virtual address remapped to another
        # frame while enforced, the binding following it
        remap = _remap_result(WORK / f"console-bochs3-{guest}.log")
        assert remap is not None, "no LAB-REMAP result on the console"
        result_file = WORK / "result-bochs3-tiny.json"
        if result_file.exists():
            kept = json.loads(result_file.read_text())
            kept["remap"] = {k: remap[k] for k in ("compare", "log", "after_teardown")} | {
                "enforce": {k: v for k, v in remap["enforce"].items() if k not in ("output_tail", "head", "tail")}}
            result_file.write_text(json.dumps(kept, indent=1, sort_keys=True) + "\n")
        c = remap["compare"]["counts"]
        assert c["rc"] == 0 and c["teardown_clean"], remap["enforce"].get("output_tail")
        assert c["rebinds"] == 1 and c["remapped_in_window"] == 1, (c, remap["log"]["rebinds"])
        assert c["denies_frame_a"] == c["guest_refused_before_remap"] > 0, c
        assert c["denies_frame_b"] == c["guest_refused_after_remap"] > 0, c
        assert c["landed_while_enforced_after_remap"] == 0, c
        assert c["frame_a_writes_landed_after_remap"] > 0 and c["frame_a_writes_refused_after_remap"] == 0, c
        assert remap["compare"]["ok"], remap["compare"]
        print(f"bochs3 lab, remap: {json.dumps(c, sort_keys=True)}")
    assert s["backend_calls_ok"], lab["result"].get("backend_calls")
    print(f"bochs3 lab, {guest} guest: wall {lab.get('wall_seconds')} s, enforcer "
          f"{s['enforcer_events_per_second']} events/s, flags {flags}")


def _remap_result(console: Path) -> dict | None:
    """The remap run's result (tests/lab/dom0_remap.py), from its `LAB-REMAP i/n PART` lines on the console."""
    parts: dict[int, str] = {}
    total = None
    for line in console.read_text(errors="replace").splitlines() if console.exists() else ():
        if m := re.match(r"LAB-REMAP (\d+)/(\d+) (.*)$", line.rstrip("\r")):
            parts[int(m.group(1))], total = m.group(3), int(m.group(2))
    if not total or len(parts) != total:
        return None
    return json.loads("".join(parts[i] for i in range(1, total + 1)))


# =========================================================================== arm64

LAB_ARM64_SH = HERE / "lab" / "lab_arm64.sh"
WORK_ARM64 = Path(os.environ.get("LAB_ARM64", "/tmp/policyc-lab-arm64"))


def _arm64_skip_reason() -> str | None:
    if unavailable := os.environ.get("POLICYC_LAB_ARM64_UNAVAILABLE"):      # .ci/run: its setup failed
        return unavailable
    # its own switch: .ci/run sets it when the arm64 setup worked, whether or not the x86 lab's did
    if os.environ.get("POLICYC_LAB_ARM64") != "1":
        return "the arm64 Xen lab runs only with POLICYC_LAB_ARM64=1 (see tests/lab/README.md)"
    missing = [b for b in ("qemu-system-aarch64", "aarch64-linux-gnu-gcc", "qemu-aarch64-static", "cpio")
               if shutil.which(b) is None]
    if missing:
        return f"the arm64 lab needs {', '.join(missing)}: run tests/lab/lab_arm64.sh setup"
    if not (WORK_ARM64 / "root" / "boot").is_dir():
        arches = subprocess.run(["dpkg", "--print-foreign-architectures"], capture_output=True, text=True).stdout
        if "arm64" not in arches.split():
            return "no arm64 packages to be had (dpkg --add-architecture arm64): run tests/lab/lab_arm64.sh setup"
    return None


def test_arm64_lab() -> None:
    """Xen 4.17 arm64 in qemu-system-aarch64 TCG: examples/policies/linux-arm64-integrity.vmi compiled
    for arm64 unmodified in dom0, enforced by `policyc run` on a Debian 6.1.0-56-arm64 guest, torn
    down clean, the guest running after; $LAB/result-arm64.json gets the decisions per rule."""
    if reason := _arm64_skip_reason():
        print(f"SKIP: {reason}")
        pytest.skip(reason)
    # QEMU's own limit below the boot's: two enforcement runs took 649 s of QEMU wall at load average 9
    env = dict(os.environ, LAB=str(WORK_ARM64), LAB_SECONDS=os.environ.get("LAB_SECONDS", "15"),
               LAB_TIMEOUT=os.environ.get("LAB_TIMEOUT", "1400"))
    if not (WORK_ARM64 / "root" / "boot").is_dir():
        subprocess.run([str(LAB_ARM64_SH), "fetch"], env=env, check=True, timeout=900)
    if not (WORK_ARM64 / "xen-4.17-arm64-mem-access").exists():
        subprocess.run([str(LAB_ARM64_SH), "xen"], env=env, check=True, timeout=1800)
    subprocess.run([str(LAB_ARM64_SH), "build"], env=env, check=True, timeout=900,
                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    p = subprocess.run([str(LAB_ARM64_SH), "boot"], env=env, timeout=1500, stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, text=True, errors="replace")
    lab = parse_lab_output(p.stdout)
    print(json.dumps({k: v for k, v in lab.items() if k not in ("result", "console_tail")}, indent=1,
                     sort_keys=True)[:20000])
    _assert_reached_end(lab, "the arm64 dom0 /init")
    assert "result" in lab, f"no result: {lab['errors']}"
    r = lab["result"]
    run = r["run"]
    rules = {}
    for key, n in run.get("decisions", {}).items():
        rule, _, verdict = key.rpartition(":")
        rules.setdefault(rule, {"decisions": 0, "by_verdict": {}, "guest_count": None})
        rules[rule]["decisions"] += n
        rules[rule]["by_verdict"][verdict] = n
    for rule, count in (r.get("guest_counts") or {}).items():
        rules.setdefault(rule, {"decisions": 0, "by_verdict": {}})["guest_count"] = count
    split = r.get("split_compare") or {}
    (WORK_ARM64 / "result-arm64.json").write_text(json.dumps(
        {"rules": rules, "times": lab["times"], "wall_seconds": lab.get("wall_seconds"),
         "capabilities": r["attach"].get("capabilities"), "after_teardown": r.get("after"),
         "compare": r.get("compare"), "kernel_banner": run.get("kernel_banner"),
         "exec_watch_events": run.get("exec_watch_events"),
         "split_tlb": {"probe": r.get("split_policy"), "compare": split,
                       "rules": {"probe_exec": {"decisions": split.get("decisions"),
                                                "guest_count": (split.get("guest") or {}).get("probe_execs_enforced"),
                                                "guest_reads": (split.get("guest") or {}).get("probe_reads_enforced")},
                                 "protect_tables": {"decisions": split.get("protect_tables_denies"),
                                                    "guest_count": (split.get("guest") or {}).get("sct_blocked")}},
                       "run": {k: v for k, v in (r.get("split_tlb") or {}).items() if k != "output_tail"}}},
        indent=1, sort_keys=True) + "\n")
    env_step = r["environment"]
    assert env_step["import_policyc"] and env_step["machine"] == "aarch64", env_step
    assert env_step["compile_rc"] == 0, env_step["compile_tail"]     # the example policy, unmodified
    assert r["attach"]["ok"] and r["attach"]["capabilities"]["arch"] == "arm64", r["attach"]
    assert r["attach"]["capabilities"]["mem_access"], r["attach"]["notes"]
    assert run["rc"] == 0 and run["ended"] == "sigterm", run["output_tail"]
    assert "teardown clean" in run["output_tail"], run["output_tail"]
    assert sum(v["decisions"] for v in rules.values()) > 0, rules
    assert r["after"]["running"], r["after"]
    cmp = r["compare"]
    # the guest's side (tests/lab/guest/linux-arm64/): every refused table write and skipped SMC is one
    # decision, no table write landed while enforced, the benign write always landed, and after
    # teardown both attacks land again
    assert cmp["protect_tables"]["ok"], cmp
    assert cmp["firmware_calls"]["ok"], cmp
    assert cmp["sct_landed_while_enforced"] == 0, cmp
    assert cmp["benign_blocked"] == 0, cmp
    assert cmp["attacks_land_after_teardown"], cmp
    # the binder read the guest kernel's own linux_banner at the slid symbol and found the symbol file's
    banner = run["kernel_banner"]
    assert banner and banner["matched"] and banner["banner"].startswith("Linux version 6.1.0-56-arm64 "), run
    # the split-TLB experiment (tests/lab/README.md): an execute watch on the module's probe page, which
    # the guest reads and executes every round; both sides were seen, the guest's reads and calls of
    # the page always gave the right bytes and result
    assert r["split_policy"].get("compile_rc") == 0, r["split_policy"]
    srun = r["split_tlb"]
    assert srun["rc"] == 0 and "teardown clean" in srun["output_tail"], srun
    g = split["guest"]
    assert g["probe_execs_enforced"] > 0 and g["probe_reads_enforced"] > 0 and split["decisions"] > 0, split
    assert g["probe_read_wrong"] == g["probe_exec_wrong"] == 0, split
    assert g["sct_blocked"] == split["protect_tables_denies"], split
    # and what they saw agreed (measured 37 = 37, tests/lab/README.md): one execute event per enforced
    # round's call, on the probe's frame at its address, and none for the reads
    assert split["ok"], split
    print(f"arm64 lab: split-TLB experiment {json.dumps(split, sort_keys=True)}")
    print(f"arm64 lab: wall {lab.get('wall_seconds')} s, decisions per rule "
          f"{ {k: v['decisions'] for k, v in rules.items()} }, result in {WORK_ARM64 / 'result-arm64.json'}")
