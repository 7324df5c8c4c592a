"""`policyc compile --emit xsm`: the FLASK rules an introspection domain needs for a plan.

Permission sets are compared as sets of (source, target, class, permission) read back
from the emitted `allow` lines, never as text. Every (class, permission) the emitter can
produce is checked against Xen 4.17's FLASK access vectors: always against the names list
tests/data/xen-flask-access-vectors.txt (read from Xen's access_vectors and
security_classes; its header names the commit), and also against a Xen source tree when
XEN_SRC points at one (e.g. `apt-get source xen`, which needs a deb-src line); no Debian
binary package ships Xen's FLASK policy (Debian builds Xen without XSM). With XEN_SRC,
m4 and checkpolicy, the fragments are also built into Xen's own policy with its Makefile's
m4 + checkpolicy steps.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from policyc.cli import main
from policyc.diagnostics import Diagnostics
from policyc.xsm import POSSIBLE_PERMISSIONS, emit_flask, plan_rules

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "examples" / "policies"
GOLDEN = REPO / "tests" / "golden" / "plans"
NAMES = REPO / "tests" / "data" / "xen-flask-access-vectors.txt"

S, T = "introspect_t", "domU_t"

REGISTER_ONLY_SVM = '''policy "register-guards" {
    target xen >= 4.17 on x86_64-svm
    mode enforce

    rule wp_guard: on write cr0 where cleared(cr0.WP) {
        deny
        alert critical "CR0.WP cleared on vcpu {vcpu}"
    }

    rule smep_smap_guard: on write cr4 where cleared(cr4.SMEP | cr4.SMAP) {
        deny
        alert critical "SMEP/SMAP disabled: {old:#x} -> {new:#x}"
    }

    rule syscall_entry_guard: on write msr LSTAR where new != 0xffffffff81a00000 {
        deny
        alert critical "LSTAR hijack to {new:#x}"
    }
}
'''


# ---------------------------------------------------------------- helpers

def _lower(path: Path, target: str | None = None) -> dict:
    """Compile a policy into a plan."""
    from policyc.check import check_policy
    from policyc.compiler import compile_plan

    d = Diagnostics()
    policy = check_policy(path, d, target_arch=target)
    assert policy is not None, [str(i) for i in d.items]
    plan = compile_plan(policy, d, target=target)
    assert plan is not None, [f"{i.code}: {i.message}" for i in d.items if i.severity.value == "error"]
    return plan


_ALLOW = re.compile(r"^allow\s+(\w+)\s+(\w+):(\w+)\s+(?:\{\s*([\w\s]+?)\s*\}|(\w+))\s*;\s*$")


def perms_of(text: str) -> set[tuple[str, str, str, str]]:
    """(source, target, class, permission) for every `allow` line; fails on any other
    non-comment line than the expected macro calls."""
    out = set()
    for line in text.splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        m = _ALLOW.match(line)
        if m is None:
            assert re.match(r"^(declare_domain|create_domain|manage_domain|domain_comms)\(\w+(, \w+)?\)$", line), line
            continue
        src, tgt, cls, many, one = m.groups()
        for perm in (many or one).split():
            out.add((src, tgt, cls, perm))
    return out


def expand(*rules: tuple[str, str, str, str]) -> set[tuple[str, str, str, str]]:
    return {(s, t, c, p) for s, t, c, ps in rules for p in ps.split()}


def xen_names() -> set[tuple[str, str]]:
    names = set()
    for line in NAMES.read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.startswith("#"):
            cls, perm = line.split()
            names.add((cls, perm))
    return names


BASE_ANY = expand(
    (S, T, "domain", "getdomaininfo getvcpucontext getvcpuinfo pause unpause"),
    (S, "domxen_t", "domain", "getdomaininfo"),
    (S, T, "domain2", "vm_event"),
    (S, T, "hvm", "getparam"),
    (S, T, "mmu", "adjust map_read map_write stat"),
    # the ring's event channel (docs/XEN-SEMANTICS.md section 6)
    (S, f"{T}_channel", "event", "create"),
    (f"{T}_channel", S, "event", "bind"),
    (S, f"{S}_channel", "event", "create send"),
    (f"{S}_channel", T, "event", "bind"),
)
BASE_X86 = BASE_ANY | expand((S, T, "hvm", "gethvmc"), (S, T, "mmu", "pageinfo"))

EXPECTED_A = BASE_X86 | expand(
    (S, T, "domain2", "mem_access"),          # memory rules
    (S, T, "hvm", "altp2mhvm_op"),            # altp2m views
    (S, T, "domain", "setdomainmaxmem"),      # int3-shadow-frame breakpoint
    (S, T, "mmu", "physmap"),
    (S, T, "domain", "setdebugging"),         # singlestep monitor
    (S, T, "hvm", "dm"),                      # reinject int3, inject on deny
)
EXPECTED_B = BASE_X86
EXPECTED_C = BASE_ANY | expand((S, T, "domain2", "mem_access"))


@pytest.fixture(scope="module")
def plan_a() -> dict:
    return _lower(EXAMPLES / "linux-kernel-integrity.vmi")


@pytest.fixture(scope="module")
def plan_b(tmp_path_factory: pytest.TempPathFactory) -> dict:
    path = tmp_path_factory.mktemp("xsm") / "register-guards.vmi"
    path.write_text(REGISTER_ONLY_SVM, encoding="utf-8")
    return _lower(path)


@pytest.fixture()
def plan_c() -> dict:
    return _lower(EXAMPLES / "linux-arm64-integrity.vmi")


def golden_plans() -> list[Path]:
    return sorted(GOLDEN.glob("*.plan.json"))


# ---------------------------------------------------------------- names against Xen's access vectors

def test_names_list_is_exactly_what_the_emitter_can_produce() -> None:
    # The list holds only names the emitter uses: a new permission must be checked against
    # Xen's access_vectors and added here by hand.
    assert xen_names() == set(POSSIBLE_PERMISSIONS)
    header = NAMES.read_text(encoding="utf-8").splitlines()[:5]
    assert any("9373a593c5a6ef57db1302eb1dca58cc3eb51c07" in h and "RELEASE-4.17.7" in h for h in header)
    assert any("access_vectors" in h for h in header) and any("security_classes" in h for h in header)


def _parse_xen_policy_dir(policy_dir: Path) -> tuple[set[str], dict[str, set[str]]]:
    strip = lambda text: re.sub(r"#[^\n]*", "", text)  # noqa: E731
    classes = set(re.findall(r"^\s*class\s+(\w+)\s*$", strip((policy_dir / "security_classes").read_text()), re.M))
    vectors = {m.group(1): set(m.group(2).split())
               for m in re.finditer(r"\bclass\s+(\w+)\s*\{([^}]*)\}", strip((policy_dir / "access_vectors").read_text()))}
    return classes, vectors


def test_against_a_xen_source_tree() -> None:
    root = os.environ.get("XEN_SRC")
    if not root:
        pytest.skip("XEN_SRC (a Xen 4.17 source tree, e.g. from `apt-get source xen`) not set: "
                    "checked against tests/data/xen-flask-access-vectors.txt only")
    policy_dir = Path(root) / "xen" / "xsm" / "flask" / "policy"
    if not (policy_dir / "access_vectors").is_file():
        pytest.skip(f"no xen/xsm/flask/policy/access_vectors under XEN_SRC={root}")
    classes, vectors = _parse_xen_policy_dir(policy_dir)
    missing = sorted((c, p) for c, p in POSSIBLE_PERMISSIONS if c not in classes or p not in vectors.get(c, set()))
    assert not missing
    # The macros and stock types the fragment uses exist in Xen's policy modules.
    modules = Path(root) / "tools" / "flask" / "policy" / "modules"
    xen_if = (modules / "xen.if").read_text()
    for macro in ("declare_domain", "create_domain", "manage_domain", "domain_comms"):
        assert f"define(`{macro}'" in xen_if, macro
    te = "\n".join(p.read_text() for p in sorted(modules.glob("*.te")))
    assert re.search(r"declare_\w*domain\(dom0_t", te) and re.search(r"\btype domxen_t\b", te)


def _build_xen_policy(root: Path, module: str, te_text: str, work: Path) -> subprocess.CompletedProcess:
    """Xen's tools/flask/policy build (m4, then checkpolicy) with `te_text` added as a module."""
    flask = root / "xen" / "xsm" / "flask" / "policy"
    pol = work / "policy"
    shutil.copytree(root / "tools" / "flask" / "policy", pol)
    mods = pol / "modules"
    (mods / f"{module}.te").write_text(te_text, encoding="utf-8")
    conf = mods / "modules.conf"
    conf.write_text(conf.read_text() + f"\n{module} = on\n")
    enabled = [f[0] for f in (line.split() for line in conf.read_text().splitlines() if re.match(r"[ \t]*[a-z]", line))
               if len(f) >= 3 and f[2] == "on"]
    sections = [flask / "security_classes", pol / "policy" / "security_classes", flask / "initial_sids",
                flask / "access_vectors", pol / "policy" / "access_vectors",
                *sorted((pol / "policy" / "support").glob("*.spt")), pol / "policy" / "mls",
                *[mods / f"{m}.if" for m in enabled if (mods / f"{m}.if").exists()],
                pol / "policy" / "global_tunables", *[mods / f"{m}.te" for m in enabled], pol / "policy" / "users",
                *[mods / f"{m}.cons" for m in enabled if (mods / f"{m}.cons").exists()],
                pol / "policy" / "initial_sids", pol / "policy" / "device_contexts"]
    conf_text = subprocess.run(["m4", "-D", "self_contained_policy", "-s", "-D", "mls_num_sens=16",
                                "-D", "mls_num_cats=256", *map(str, sections)],
                               check=True, capture_output=True, text=True).stdout
    (work / "policy.conf").write_text(conf_text)
    return subprocess.run(["checkpolicy", "-t", "Xen", "-c", "30", str(work / "policy.conf"),
                           "-o", str(work / "xenpolicy")], capture_output=True, text=True)


@pytest.mark.parametrize("which", ["a", "b", "c"])
def test_fragment_builds_into_xens_policy(which: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    """The emitted module compiles with Xen's own policy build (stock modules + this one)."""
    root = os.environ.get("XEN_SRC")
    if not root or not (Path(root) / "tools" / "flask" / "policy" / "modules" / "xen.if").is_file():
        pytest.skip("XEN_SRC (a Xen 4.17 source tree with tools/flask/policy) not set")
    if not (shutil.which("m4") and shutil.which("checkpolicy")):
        pytest.skip("m4 and checkpolicy (Debian packages m4, checkpolicy) are needed to build Xen's policy")
    text = emit_flask(request.getfixturevalue(f"plan_{which}"))
    done = _build_xen_policy(Path(root), "introspect", text, tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert (tmp_path / "xenpolicy").stat().st_size > 0
    # a misspelt permission would not build: the check is real
    bad = _build_xen_policy(Path(root), "introspect", text.replace("{ vm_event }", "{ vm_events }"),
                            tmp_path / "bad")
    assert bad.returncode != 0


@pytest.mark.parametrize("which", ["a", "b", "c"])
def test_every_emitted_permission_is_in_xens_vectors(which: str, request: pytest.FixtureRequest) -> None:
    plan = request.getfixturevalue(f"plan_{which}")
    names = xen_names()
    classes = {c for c, _ in names}
    for _, _, cls, perm in perms_of(emit_flask(plan)):
        assert cls in classes and (cls, perm) in names, (cls, perm)


# ---------------------------------------------------------------- exact sets for the three plans

def test_a_linux_kernel_integrity_x86_64(plan_a: dict) -> None:
    assert plan_a["target"]["arch"] == "x86_64" and len(plan_a["views"]) == 3
    assert perms_of(emit_flask(plan_a)) == EXPECTED_A


def test_b_register_only_svm(plan_b: dict) -> None:
    assert plan_b["target"]["arch"] == "x86_64-svm"
    assert not plan_b["views"] and not plan_b["breakpoints"] and "mem_access" not in plan_b["dispatch"]
    got = perms_of(emit_flask(plan_b))
    assert got == EXPECTED_B
    assert not {p for *_, p in got} & {"mem_access", "altp2mhvm_op", "dm", "setdebugging", "physmap"}


def test_c_arm64(plan_c: dict) -> None:
    assert plan_c["target"]["arch"] == "arm64" and plan_c["dispatch"].get("mem_access")
    got = perms_of(emit_flask(plan_c))
    assert got == EXPECTED_C
    # x86-only domctls and HVMOPs are not granted on arm64
    assert not {p for *_, p in got} & {"gethvmc", "pageinfo", "altp2mhvm_op", "dm"}


# ---------------------------------------------------------------- what each feature grants

@pytest.mark.parametrize("path", golden_plans(), ids=lambda p: p.name)
def test_golden_plans(path: Path) -> None:
    plan = json.loads(path.read_text(encoding="utf-8"))
    got = perms_of(emit_flask(plan))
    granted = {p for *_, p in got}
    assert {(c, p) for _, _, c, p in got} <= xen_names()
    assert (BASE_X86 if plan["target"]["arch"].startswith("x86") else BASE_ANY) <= got
    assert ("mem_access" in granted) == bool(plan["dispatch"].get("mem_access"))
    assert ("altp2mhvm_op" in granted) == any(v["id"] != 0 for v in plan["views"])
    assert ("setdebugging" in granted) == bool(plan["monitors"].get("singlestep"))
    shadow = any(b["mechanism"] == "int3-shadow-frame" for b in plan["breakpoints"])
    assert ("physmap" in granted) == shadow and ("setdomainmaxmem" in granted) == shadow
    injects = any("inject" in r or "reinject" in r for cases in plan["responses"].values()
                  for r in cases.values() if isinstance(r, dict))
    assert ("dm" in granted) == injects
    assert "setvcpucontext" not in granted and "sethvmc" not in granted


def test_no_memory_rules_never_grants_mem_access(plan_a: dict, plan_b: dict) -> None:
    assert not any(p == "mem_access" for *_, p in perms_of(emit_flask(plan_b)))
    stripped = copy.deepcopy(plan_a)
    stripped["dispatch"].pop("mem_access")
    stripped["responses"].pop("mem_access")
    for view in stripped["views"]:
        view["ranges"] = []
    got = perms_of(emit_flask(stripped))
    assert not any(p == "mem_access" for *_, p in got)
    # the breakpoint still needs its views, the shadow frame and single-stepping
    assert expand((S, T, "hvm", "altp2mhvm_op"), (S, T, "mmu", "physmap"), (S, T, "domain", "setdebugging")) <= got


def test_no_injection_no_dm(plan_a: dict) -> None:
    quiet = copy.deepcopy(plan_a)
    for cases in quiet["responses"].values():
        for response in cases.values():
            if isinstance(response, dict):
                response.pop("inject", None)
                response.pop("reinject", None)
    assert not any(p == "dm" for *_, p in perms_of(emit_flask(quiet)))


def test_audit_mode_drops_injections_on_deny_paths_only(plan_a: dict) -> None:
    audit = copy.deepcopy(plan_a)
    audit["policy"]["mode"] = "audit"
    # breakpoint.not_ours still re-injects the guest's own int3
    assert (S, T, "hvm", "dm") in perms_of(emit_flask(audit))
    del audit["responses"]["breakpoint"]["not_ours"]
    assert (S, T, "hvm", "dm") not in perms_of(emit_flask(audit))


# ---------------------------------------------------------------- the text around the rules

def test_header_and_comments(plan_a: dict, plan_b: dict, plan_c: dict) -> None:
    text = emit_flask(plan_a)
    head = text.split("\n\n")[0]
    assert plan_a["policy"]["name"] in head and plan_a["content_hash"] in head and "x86_64" in head
    assert "must be PV" in head and "altp2m=1" in head
    assert "declare_domain(introspect_t)" in text
    # every group of allow lines is preceded by a one-line comment
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("allow ") and not lines[i - 1].startswith("allow "):
            assert lines[i - 1].startswith("# "), line
    assert "altp2m=1" not in emit_flask(plan_b) and "must be PV" in emit_flask(plan_b)
    arm = emit_flask(plan_c)
    assert "must be PV" not in arm and "altp2m=1" not in arm and "CONFIG_MEM_ACCESS" in arm


def test_grouped_by_class_in_xens_order(plan_a: dict) -> None:
    classes = [m.group(1) for m in re.finditer(r"^allow \w+ \w+:(\w+)", emit_flask(plan_a), re.M)]
    order = ["domain", "domain2", "hvm", "mmu", "event"]
    assert classes == sorted(classes, key=order.index)
    assert [r.cls for r in plan_rules(plan_a)] == classes


def test_deterministic(plan_a: dict) -> None:
    first = emit_flask(plan_a)
    assert emit_flask(plan_a) == first
    assert emit_flask(_lower(EXAMPLES / "linux-kernel-integrity.vmi")) == first
    # key order in the plan does not matter
    shuffled = json.loads(json.dumps(plan_a, sort_keys=True))
    shuffled = {k: shuffled[k] for k in reversed(list(shuffled))}
    assert emit_flask(shuffled) == first


def test_deterministic_arm64(plan_c: dict) -> None:
    again = _lower(EXAMPLES / "linux-arm64-integrity.vmi")
    assert emit_flask(again) == emit_flask(plan_c) == emit_flask(copy.deepcopy(plan_c))


def test_custom_types(plan_b: dict) -> None:
    got = perms_of(emit_flask(plan_b, "vmi_t", "guest_t"))
    assert ("vmi_t", "guest_t", "domain2", "vm_event") in got
    assert ("vmi_t", "guest_t_channel", "event", "create") in got
    assert ("vmi_t_channel", "guest_t", "event", "bind") in got
    assert not any(S in (s, t) or T in (s, t) for s, t, _, _ in got)
    for bad in ("", "a b", "x;allow", "1abc"):
        with pytest.raises(ValueError):
            emit_flask(plan_b, source_type=bad)
    with pytest.raises(ValueError):
        emit_flask(plan_b, "same_t", "same_t")


# ---------------------------------------------------------------- the command line

def test_cli_compile_emit_xsm(capsys: pytest.CaptureFixture[str], plan_a: dict) -> None:
    assert main(["compile", "--emit", "xsm", str(EXAMPLES / "linux-kernel-integrity.vmi")]) == 0
    out = capsys.readouterr().out
    assert out == emit_flask(plan_a)
    assert perms_of(out) == EXPECTED_A


def test_cli_compile_emit_xsm_to_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    policy = tmp_path / "register-guards.vmi"
    policy.write_text(REGISTER_ONLY_SVM, encoding="utf-8")
    out = tmp_path / "introspect.te"
    assert main(["compile", "--emit", "xsm", "-o", str(out), str(policy)]) == 0
    assert capsys.readouterr().out == ""
    assert perms_of(out.read_text(encoding="utf-8")) == EXPECTED_B
