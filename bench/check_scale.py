"""How `policyc check` scales: a generated policy of 10,000 rules and 100,000 regions.

Generates (into a temporary directory, deterministically from ``--seed``) one
DSL policy over the real symbols of ``examples/policies/linux-6.1.System.map``:

- regions: ``symbol S + 0x.. size N``, ``va 0xffffffff8... size N``,
  ``pa 0x... size 4096``, ranges ``symbol _stext + A .. symbol _stext + B`` and
  ``symbol A .. symbol B``, sizes written with constants, unions of other
  regions (some of them unions of unions), a few ``register idtr|gdtr`` and
  ``percpu symbol`` regions;
- rules: every trigger kind the x86_64 target has (read of / write to /
  execute in / access to, with named and inline regions; execute symbol /
  execute va; write cr0 cr3 cr4 xcr0; write msr by name and number; read and
  write of idtr gdtr ldtr tr; cpuid [leaf N]; guest_request;
  debug_exception), ``where`` conditions over registers, event fields,
  ``in REGION`` / ``not in REGION``, ``set/cleared/changed(BITS)``, bit
  arithmetic and ``and or not``; actions allow, deny (with ``feed`` and
  ``with #UD``), log, alert, limit ... then, pause, disarm, priority.

and the same policy in YAML (``policyc fmt --to yaml``). For each spelling it
measures, warm (the Lark parser and the JSON Schema already loaded):

- the wall time of ``policyc.check.check_policy(path, Diagnostics())``, and of
  ``policyc.source.read_policy_file`` alone (the parse: text -> syntax tree);
  the rest (settings, symbols, constants, regions, rules) is the difference;
- the peak of Python allocations during the check (tracemalloc, a separate
  run: tracing slows the check down, so its time is not the one reported);
- the process's max RSS (``resource.getrusage``) in a fresh interpreter that
  imports policyc and runs the one check, next to the same interpreter's
  max RSS right after the imports.

The YAML front end refuses documents over 8 MiB or 200,000 nodes (PC202, a
deliberate bound on what reading a file may cost). A YAML policy of the full
size is over both, so when the full-size YAML is refused for that reason the
refusal (and how long it took) is reported, and the YAML figures are taken at
the largest scale that fits (same ratio of rules to regions, same generator),
with the DSL measured at that scale too, for a like-for-like comparison.

The only thing asserted is that each measured check reported no errors: a
generator bug would otherwise measure the wrong thing. Nothing about time.

    python bench/check_scale.py [--rules N] [--regions M] [--seed S] [--repeat K] [--json] [--keep DIR]

    python bench/check_scale.py --rules 1000 --regions 10000     # a quick run

With --json the report carries, at its top level, the keys every scale benchmark
reports: check_s, compile_s and serialise_s (the last two with --lower, else
null), peak_rss_mib (the fresh interpreter's max RSS during the check) and
plan_bytes (with --lower).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import io
import json
import os
import platform
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

from policyc.check import check_policy
from policyc.diagnostics import Diagnostics, Severity
from policyc.source import read_policy_file

try:  # the checker's passes on an already parsed tree (what fmt's round trip uses)
    from policyc.check import check_file_tree
except ImportError:  # pragma: no cover
    check_file_tree = None

REPO = Path(__file__).resolve().parent.parent
SYSTEM_MAP = REPO / "examples" / "policies" / "linux-6.1.System.map"
WARMUP_POLICY = REPO / "examples" / "policies" / "linux-kernel-integrity.vmi"

# YAML limits of policyc.yaml_form (PC202); read from the module when it has them.
try:
    from policyc.yaml_form import MAX_DOCUMENT_BYTES as YAML_MAX_BYTES, MAX_NODES as YAML_MAX_NODES
except ImportError:  # pragma: no cover - an older front end without bounds
    YAML_MAX_BYTES, YAML_MAX_NODES = None, None


# ---------------------------------------------------------------- the generator

def read_system_map(path: Path) -> tuple[list[tuple[str, int]], list[str]]:
    """(name, address) of the plain kernel symbols, sorted by address; and the per-CPU ones."""
    plain: list[tuple[str, int]] = []
    percpu: list[str] = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line or line.startswith("#"):
            continue
        addr, _kind, name = line.split()[:3]
        value = int(addr, 16)
        if value >= 0xFFFFFFFF80000000:
            plain.append((name, value))
        elif not name.startswith("__per_cpu"):
            percpu.append(name)
    plain.sort(key=lambda p: p[1])
    return plain, percpu


MEM_FIELDS = ("gla", "gfn", "offset", "vcpu")
BP_FIELDS = ("gla", "gfn", "vcpu", "insn_length")
CR_FIELDS = ("new", "old", "vcpu")
MSR_FIELDS = ("msr", "new", "old", "vcpu")
DESC_FIELDS = ("descriptor", "is_write", "vcpu")
CPUID_FIELDS = ("leaf", "subleaf", "insn_length", "vcpu")
DBG_FIELDS = ("gfn", "pending_dbg", "insn_length", "vcpu")
GPRS = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp", "r8", "r9", "r10", "r11", "r12", "r13",
        "r14", "r15", "rip")
SYSTEM_REGS = ("cr0", "cr3", "cr4", "cpl", "gs_base", "shadow_gs", "msr_lstar", "cs_sel", "fs_base", "cr2")
try:  # only the registers the x86_64 target's conditions may read (the language's list can change)
    from policyc.arch import ARCHES as _ARCHES

    _KNOWN = set(_ARCHES["x86_64"].registers)
    GPRS = tuple(r for r in GPRS if r in _KNOWN)
    SYSTEM_REGS = tuple(r for r in SYSTEM_REGS if r in _KNOWN)
except (ImportError, KeyError, AttributeError):  # pragma: no cover
    pass
CR_BITS = {"cr0": ("WP", "PG", "PE", "CD", "NW", "AM"), "cr4": ("SMEP", "SMAP", "PKE", "UMIP", "CET", "PCIDE"),
           "xcr0": ("AVX", "SSE", "X87", "PKRU", "OPMASK")}
MSRS = ("LSTAR", "CSTAR", "STAR", "SYSENTER_EIP", "SYSENTER_ESP", "SYSENTER_CS", "EFER", "GS_BASE",
        "KERNEL_GS_BASE", "S_CET", "PL0_SSP", "SPEC_CTRL", "DEBUGCTL", "PAT")
MSR_NUMBERS = (0xC0000082, 0xC0000080, 0x176, 0x6A2, 0x1D9)
SEVERITIES = ("info", "low", "medium", "high", "critical")
ENTRY_SYMBOLS = ("entry_SYSCALL_64", "entry_SYSENTER_compat", "entry_SYSCALL_compat", "asm_exc_int3",
                 "asm_int80_emulation")


class Generator:
    """One policy of `n_rules` rules and `n_regions` regions; the same text for the same seed."""

    def __init__(self, n_rules: int, n_regions: int, seed: int, symbols_file: str) -> None:
        self.n_rules = n_rules
        self.n_regions = n_regions
        self.rng = random.Random(seed)
        self.symbols_file = symbols_file
        self.plain, self.percpu = read_system_map(SYSTEM_MAP)
        self.addr = dict(self.plain)
        self.text_syms = [n for n, a in self.plain if self.addr["_stext"] <= a < self.addr["_etext"]]
        self.data_syms = [n for n, a in self.plain if a >= self.addr["__start_rodata"]]
        self.text_size = self.addr["_etext"] - self.addr["_stext"]
        self.distinct = list({a: (n, a) for n, a in self.plain}.values())  # one name per address
        self.base_regions: list[str] = []  # regions that are no union
        self.union_regions: list[str] = []
        self.all_regions: list[str] = []

    # -- pieces
    def hexn(self, lo: int, hi: int) -> str:
        return f"0x{self.rng.randrange(lo, hi):x}"

    def region_body(self, i: int) -> str:
        r = self.rng.random()
        rng = self.rng
        if i >= 8 and r < 0.15:
            parts = rng.sample(self.base_regions[-2000:], rng.randint(2, 4))
            if self.union_regions and rng.random() < 0.2:  # a union of unions (one level deep)
                parts[-1] = rng.choice(self.union_regions[-500:])
            return "union", ", ".join(parts)
        if r < 0.40:
            sym = rng.choice(self.data_syms if rng.random() < 0.7 else self.text_syms)
            off = rng.randrange(0, 0x1000, 8)
            size = rng.choice(("8", "16", "64", "4096", "8 * NR_SYSCALLS", "PAGE", "2 * PAGE", "SLOT * 4"))
            offs = f" + 0x{off:x}" if off else ""
            return "base", f"symbol {sym}{offs} size {size}"
        if r < 0.58:
            size = rng.choice((8, 64, 512, 4096, 0x2000))
            return "base", f"va {self.hexn(0xFFFFFFFF81000000, 0xFFFFFFFF84400000)} size {size}"
        if r < 0.72:
            return "base", f"pa 0x{rng.randrange(0x1000, 0x1_0000_0000, 0x1000):x} size 4096"
        if r < 0.88:
            a = rng.randrange(0, self.text_size - 0x2000)
            b = a + rng.randrange(1, 0x2000)
            return "base", f"symbol _stext + 0x{a:x} .. symbol _stext + 0x{b:x}"
        if r < 0.97:
            a, b = sorted(rng.sample(self.distinct, 2), key=lambda p: p[1])
            return "base", f"symbol {a[0]} .. symbol {b[0]}"
        if r < 0.985:
            return "base", f"register {rng.choice(('idtr', 'gdtr'))} size {rng.choice(('4096', 'PAGE', '256 * 16'))}"
        return "base", f"percpu symbol {rng.choice(self.percpu)} size {rng.choice((8, 16, 128))}"

    def region_name(self) -> str:
        return self.rng.choice(self.all_regions)

    def compare(self, x: str, own_regions: list[str]) -> str:
        """One comparison over the value `x` (a register or an event field), never always true or false.

        `gla` on a memory trigger is only tested against the trigger's own regions (a region a page
        away from every watched byte would make the rule unreachable); `vcpu` and `offset` take small
        numbers (their ranges are narrow)."""
        rng = self.rng
        if x == "gla" and own_regions:
            return f"gla in {rng.choice(own_regions)}"
        if x == "vcpu":
            return f"vcpu {rng.choice(('<', '>=', '!='))} {rng.randrange(1, 64)}"
        if x == "offset":
            return f"(offset & 0x{rng.randrange(1, 0x1000):x}) != 0x{rng.randrange(0, 0x10):x}"
        r = rng.random()
        if r < 0.30:
            return f"{x} {'not in' if rng.random() < 0.3 else 'in'} {self.region_name()}"
        if r < 0.45:
            return f"{x} != symbol {rng.choice(self.text_syms)}"
        if r < 0.60:
            return f"({x} & 0x{rng.randrange(1, 0x10000):x}) == 0x{rng.randrange(0, 0x100):x}"
        if r < 0.70:
            return f"{x} >> {rng.randrange(1, 48)} {rng.choice(('==', '!=', '<', '>='))} {rng.randrange(0, 1 << 16)}"
        if r < 0.85:
            return f"{x} - symbol {rng.choice(self.data_syms)} < 0x{rng.randrange(8, 0x100000):x}"
        return f"{x} {rng.choice(('!=', '<', '>='))} 0x{rng.randrange(1 << 40, 1 << 64):x}"

    def condition(self, fields: tuple[str, ...], extra: list[str] | None = None,
                  own_regions: list[str] | None = None, no_rip: bool = False) -> str:
        """Up to 4 comparisons joined by and/or/not, each over a different value (so none contradicts
        another); `extra`: trigger-specific tests (bit tests, `access`), one of which is used."""
        rng = self.rng
        n = rng.choice((1, 1, 2, 2, 3, 4))
        if extra:  # the few fixed tests alone would repeat: identical conditions tell no rules apart
            n = max(n, 2)
        pool = list(fields) + rng.sample(GPRS, 6) + rng.sample(SYSTEM_REGS, 2)
        if no_rip:  # a breakpoint fixes rip: a test of it would be always true or false
            pool = [v for v in pool if v != "rip"]
        values = rng.sample(list(dict.fromkeys(pool)), n)
        if all(x in ("vcpu", "offset", "gla") for x in values):
            # These take few distinct tests: alone, two rules would share a condition by chance.
            values.append(rng.choice([g for g in GPRS if g not in values and not (no_rip and g == "rip")]))
        parts = [self.compare(x, own_regions or []) for x in values]
        if extra:
            parts[rng.randrange(len(parts))] = rng.choice(extra)
        out = parts[0]
        for p in parts[1:]:
            op = rng.choice(("and", "and", "or"))
            if rng.random() < 0.2:
                p = f"not ({p})"
            out = f"({out}) {op} {p}" if op == "or" and rng.random() < 0.5 else f"{out} {op} {p}"
        return out

    def template(self, fields: tuple[str, ...]) -> str:
        rng = self.rng
        picks = rng.sample(list(fields) + ["rip", "rsp", "cr3", "rule", "vcpu"], 2)
        picks = list(dict.fromkeys(picks))
        return "event " + " ".join(f"{f}={{{f}:#x}}" if f not in ("vcpu", "rule") else f"{f}={{{f}}}"
                                   for f in picks)

    def report(self, fields: tuple[str, ...]) -> str:
        kind = self.rng.choice(("log", "alert"))
        return f'{kind} {self.rng.choice(SEVERITIES)} "{self.template(fields)}"'

    def actions(self, fields: tuple[str, ...], deny: str | None) -> list[str]:
        """`deny`: how this trigger kind is denied, or None when the rule only observes (Xen cannot
        refuse it)."""
        rng = self.rng
        out: list[str] = []
        verdict = None
        r = rng.random()
        if deny is not None and r < 0.55:
            verdict = deny
        elif r < 0.75:
            verdict = "allow"
        if verdict and rng.random() < 0.15:
            out.append(f"limit {rng.choice((1, 10, 100, 1000))} per second then {verdict}")
        elif verdict:
            out.append(verdict)
        for _ in range(rng.choice((1, 1, 2))):
            rep = self.report(fields)
            if rng.random() < 0.2:
                rep = f"limit {rng.choice((5, 50, 500))} per second then {rep}"
            out.append(rep)
        if rng.random() < 0.05:
            out.append("pause")
        if rng.random() < 0.05:
            out.append("disarm")
        if rng.random() < 0.1:
            out.append(f"priority {rng.randrange(0, 100)}")
        return out

    def rule(self, i: int) -> str:
        rng = self.rng
        kind = i % 12  # every trigger kind, memory ones most often
        extra = None
        own: list[str] = []
        no_rip = False
        if kind <= 3:
            access = ("read of", "write to", "execute in", "access to")[kind]
            own = list(dict.fromkeys(self.region_name() for _ in range(rng.choice((1, 1, 2, 3)))))
            terms = list(own)
            if rng.random() < 0.1:
                terms.append(f"va {self.hexn(0xFFFFFFFF81000000, 0xFFFFFFFF84400000)} size 64")
            trigger = f"{access} {', '.join(terms)}"
            fields = MEM_FIELDS
            deny = {"read of": 'deny feed "\\x00\\x00\\x00\\x00\\x00\\x00\\x00\\x00"', "write to": "deny",
                    "execute in": "deny with #UD", "access to": "deny"}[access]
            if kind == 3:
                extra = ["access & access.W != 0", "access & access.X == 0", "(access & access.R) != 0"]
        elif kind == 4:
            if rng.random() < 0.7:
                sym = rng.choice(self.text_syms)
                off = rng.choice(("", "", f" + 0x{rng.randrange(1, 0x40):x}"))
                trigger = f"execute symbol {sym}{off}"
            else:
                trigger = f"execute va {self.hexn(0xFFFFFFFF81000000, 0xFFFFFFFF81E01D32)}"
            fields, deny, no_rip = BP_FIELDS, rng.choice(("deny", "deny with #UD", "deny with #GP")), True
        elif kind in (5, 6):
            reg = rng.choice(("cr0", "cr3", "cr4", "xcr0"))
            trigger = f"write {reg}"
            fields, deny = CR_FIELDS, ("deny" if reg != "xcr0" else None)  # Xen cannot refuse XCR0 writes
            if reg in CR_BITS:
                bits = " | ".join(f"{reg}.{b}" for b in rng.sample(CR_BITS[reg], rng.randint(1, 2)))
                extra = [f"{fn}({bits})" for fn in ("set", "cleared", "changed")]
            else:
                extra = ["new != old", "(new & 0xfff) != (old & 0xfff)"]
        elif kind == 7:
            if rng.random() < 0.8:
                msr = rng.choice(MSRS)
                trigger = f"write msr {msr}"
                if msr == "EFER":
                    bit = rng.choice(("NXE", "SCE", "LME"))
                    extra = [f"{fn}(EFER.{bit})" for fn in ("set", "cleared", "changed")]
                else:
                    extra = [f"new != symbol {rng.choice(ENTRY_SYMBOLS)}", "new != old"]
            else:
                trigger = f"write msr 0x{rng.choice(MSR_NUMBERS):x}"
                extra = ["new != old", "(new & 0xfff) != 0"]
            fields, deny = MSR_FIELDS, "deny"
        elif kind == 8:
            trigger = f"{rng.choice(('read', 'write'))} {rng.choice(('idtr', 'gdtr', 'ldtr', 'tr'))}"
            fields, deny = DESC_FIELDS, "deny"
        elif kind == 9:
            trigger = rng.choice(("cpuid", f"cpuid leaf 0x{rng.choice((0, 1, 7, 0xd, 0x40000000, 0x80000001)):x}"))
            fields, deny = CPUID_FIELDS, None
        elif kind == 10:
            trigger, fields, deny = "guest_request", ("vcpu",), None
        else:
            trigger, fields, deny = "debug_exception", DBG_FIELDS, None
        actions = self.actions(fields, deny)
        # A rule with a verdict always has a condition: two unconditional rules on one target, one
        # allowing and one denying, are a conflict (PC503), which is no policy anyone means.
        verdict = any(a in ("allow", deny) for a in actions)
        where = ""
        if verdict or extra or rng.random() < 0.8:
            where = f" where {self.condition(fields, extra, own, no_rip)}"
        name = "" if rng.random() < 0.05 else f"rule_{i:05d}: "
        body = "\n".join(f"        {a}" for a in actions)
        return f"    rule {name}on {trigger}{where} {{\n{body}\n    }}\n"

    def text(self) -> str:
        out = [
            f"# generated by bench/check_scale.py: {self.n_rules} rules, {self.n_regions} regions\n",
            'policy "check-scale" {\n',
            "    target xen >= 4.17 on x86_64\n",
            f'    symbols "{self.symbols_file}"\n',
            "    mode enforce\n\n",
            "    const NR_SYSCALLS = 451\n",
            "    const PAGE = 1 << 12\n",
            "    const SLOT = 8\n",
            "    const TEXT_SIZE = symbol _etext - symbol _stext\n\n",
        ]
        for i in range(self.n_regions):
            kind, body = self.region_body(i)
            name = f"rg{i}"
            out.append(f"    region {name} = {body}\n")
            (self.union_regions if kind == "union" else self.base_regions).append(name)
            self.all_regions.append(name)
        out.append("\n")
        for i in range(self.n_rules):
            out.append(self.rule(i))
        out.append("}\n")
        return "".join(out)


def write_policy(directory: Path, n_rules: int, n_regions: int, seed: int) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    shutil.copy(SYSTEM_MAP, directory / SYSTEM_MAP.name)
    path = directory / "check-scale.vmi"
    path.write_text(Generator(n_rules, n_regions, seed, SYSTEM_MAP.name).text(), encoding="utf-8")
    return path


def to_yaml(dsl: Path) -> tuple[Path | None, str]:
    """`policyc fmt --to yaml -w` (in-process). Returns the YAML path, or None and why not."""
    try:
        import policyc.fmt  # noqa: F401
    except ImportError:
        return None, "policyc.fmt does not exist: no YAML figure"
    from policyc.cli import main as cli_main

    out = dsl.with_suffix(".yaml")
    if out.exists():
        out.unlink()
    with contextlib.redirect_stderr(io.StringIO()):  # "wrote FILE"
        status = cli_main(["fmt", "--to", "yaml", "-w", str(dsl)])
    if status != 0 or not out.exists():
        return None, f"policyc fmt --to yaml exited {status}: no YAML figure"
    return out, ""


def yaml_nodes(path: Path) -> int:
    """Nodes in a YAML document, as policyc's composer counts them (scalars, mappings, sequences)."""
    import yaml

    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    count = 0
    with path.open(encoding="utf-8") as f:
        for ev in yaml.parse(f, Loader=loader):
            if isinstance(ev, (yaml.ScalarEvent, yaml.MappingStartEvent, yaml.SequenceStartEvent)):
                count += 1
    return count


# ---------------------------------------------------------------- the measurements

def diag_counts(d: Diagnostics) -> tuple[int, int]:
    items = list(d)
    return (sum(x.severity is Severity.ERROR for x in items), sum(x.severity is Severity.WARNING for x in items))


def first_errors(d: Diagnostics, n: int = 5) -> list[str]:
    return [f"{x.span}: {x.code} {x.message}" for x in d.sorted() if x.severity is Severity.ERROR][:n]


def warm_up(tmp: Path) -> None:
    """Build the Lark parser and load the JSON Schema once, so the figures are about the policy."""
    check_policy(WARMUP_POLICY, Diagnostics())
    small = tmp / "warmup"
    small.mkdir(parents=True, exist_ok=True)
    dsl = write_policy(small, 12, 40, 0)
    yml, _ = to_yaml(dsl)
    if yml is not None:
        check_policy(yml, Diagnostics())


class _Clock:
    """Wall time and this process's CPU time of a block (CPU time is steadier on a shared machine)."""

    def __enter__(self) -> "_Clock":
        self.wall0, self.cpu0 = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc) -> None:
        self.wall = time.perf_counter() - self.wall0
        self.cpu = time.process_time() - self.cpu0


def _forget_parses() -> None:
    """read_policy_file keeps recent parses by content: each measurement starts without them."""
    import policyc.source as source
    if hasattr(source, "_PARSED"):
        source._PARSED.clear()
    if hasattr(source, "_PARSED_BYTES"):
        source._PARSED_BYTES[0] = 0


def measure_in_process(path: Path, repeat: int) -> dict:
    """Best of `repeat`: the parse alone, the checker's passes alone on that parsed tree, and the whole check."""
    runs: dict[str, list[tuple[float, float]]] = {"parse": [], "passes": [], "check": []}
    errors = warnings = 0
    rules = regions = 0
    refusal: list[str] = []
    for _ in range(repeat):
        gc.collect()
        _forget_parses()
        with _Clock() as c:
            tree = read_policy_file(path, Diagnostics())
        runs["parse"].append((c.wall, c.cpu))
        if tree is not None and check_file_tree is not None:
            with _Clock() as c:
                check_file_tree(tree, path, Diagnostics())
            runs["passes"].append((c.wall, c.cpu))
        del tree
        gc.collect()
        _forget_parses()  # the whole check, parse included (read_policy_file keeps recent parses)
        d = Diagnostics()
        with _Clock() as c:
            policy = check_policy(path, d)
        runs["check"].append((c.wall, c.cpu))
        errors, warnings = diag_counts(d)
        if errors:
            refusal = first_errors(d)
        if policy is not None:
            rules, regions = len(policy.rules), len(policy.regions)
        del policy, d
    gc.collect()
    out: dict = {}
    for key, values in runs.items():
        out[f"{key}_s"] = min(w for w, _ in values) if values else None
        out[f"{key}_cpu_s"] = min(c for _, c in values) if values else None
        out[f"{key}_s_all"] = [w for w, _ in values]
    out.update({"errors": errors, "warnings": warnings, "first_errors": refusal,
                "model_rules": rules, "model_regions": regions})
    return out


def measure_tracemalloc(path: Path) -> int:
    gc.collect()
    tracemalloc.start()
    try:
        check_policy(path, Diagnostics())
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    gc.collect()
    return peak


_RSS_SCRIPT = r"""
import json, resource, sys, time
from pathlib import Path

def hwm_kib():
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        return None

from policyc.check import check_policy
from policyc.diagnostics import Diagnostics
import policyc.dsl, policyc.yaml_form
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
d = Diagnostics()
t0 = time.perf_counter()
check_policy(Path(sys.argv[1]), d)
dt = time.perf_counter() - t0
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"maxrss_kib": peak, "after_import_kib": base, "vmhwm_kib": hwm_kib(), "cold_check_s": dt,
                  "errors": d.error_count}))
"""

# Linux carries a process's max RSS across exec from the memory of the process
# that forked it: a child started straight from this (by then large) process
# would report this process's peak as its own. A small launcher in between
# forks the measuring interpreter from its own fresh, small memory.
_LAUNCHER = "import subprocess, sys; sys.exit(subprocess.run(sys.argv[1:]).returncode)"


def measure_rss(path: Path) -> dict:
    """Max RSS of a fresh interpreter running the one check (Linux reports ru_maxrss in KiB)."""
    out = subprocess.run([sys.executable, "-c", _LAUNCHER, sys.executable, "-c", _RSS_SCRIPT, str(path)],
                         capture_output=True, text=True, check=True, cwd=path.parent)
    return json.loads(out.stdout.strip().splitlines()[-1])


_LOWER_SCRIPT = r"""
import gc, json, sys, time
from pathlib import Path
from policyc.check import check_policy
from policyc.diagnostics import Diagnostics, Severity
from policyc.compiler import compile_plan
policy = check_policy(Path(sys.argv[1]), Diagnostics())
gc.collect()
d = Diagnostics()
w, c = time.perf_counter(), time.process_time()
plan = compile_plan(policy, d)
w, c = time.perf_counter() - w, time.process_time() - c
serialise_s = plan_bytes = None
if plan is not None:
    from policyc.plan import dump_plan
    s = time.perf_counter()
    plan_bytes = len(dump_plan(plan).encode())
    serialise_s = time.perf_counter() - s
codes = {}
for x in d:
    key = f"{x.severity.value} {x.code}"
    codes[key] = codes.get(key, 0) + 1
errors = [f"{x.span}: {x.code} {x.message}" for x in d.sorted() if x.severity is Severity.ERROR]
print(json.dumps({"lower_s": w, "lower_cpu_s": c, "serialise_s": serialise_s, "plan_bytes": plan_bytes,
                  "lower_errors": len(errors),
                  "lower_warnings": sum(x.severity is Severity.WARNING for x in d),
                  "lower_diagnostics": codes, "lower_first_errors": errors[:3]}))
"""


def measure_lowering(path: Path) -> dict:
    """`policyc check` (the command) also lowers each checked policy (policyc.compiler.compile_plan: target
    capabilities, views, conflict analyses). Its time and findings, reported, not asserted. In a fresh
    interpreter: the lowering may keep the last policy in a module-level cache, and a 100,000-region
    model kept alive here would slow every later measurement's garbage collection."""
    try:
        import policyc.compiler  # noqa: F401
    except ImportError:
        return {"lower_note": "policyc.compiler does not exist"}
    out = subprocess.run([sys.executable, "-c", _LOWER_SCRIPT, str(path)], capture_output=True, text=True,
                         cwd=path.parent)
    if out.returncode != 0:
        return {"lower_note": f"the lowering failed: {out.stderr.strip().splitlines()[-1:]}"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure(path: Path, repeat: int, memory: bool = True, lower: bool = False) -> dict:
    result = {"file": path.name, "bytes": path.stat().st_size}
    result.update(measure_in_process(path, repeat))
    if result["errors"]:
        return result
    if lower:
        result.update(measure_lowering(path))
    if memory:
        result["tracemalloc_peak_bytes"] = measure_tracemalloc(path)
        result.update(measure_rss(path))
    return result


def refused_by_bounds(m: dict) -> bool:
    """A YAML check whose every error is one of the front end's size/depth bounds (PC202, PC203)."""
    return m["errors"] > 0 and all(" PC202 " in e or " PC203 " in e for e in m["first_errors"])


def yaml_fit_scale(path: Path, nodes: int) -> float:
    """The fraction of the generated size that fits the YAML bounds, with 10% headroom."""
    frac = 1.0
    if YAML_MAX_BYTES:
        frac = min(frac, YAML_MAX_BYTES / path.stat().st_size)
    if YAML_MAX_NODES:
        frac = min(frac, YAML_MAX_NODES / nodes)
    return frac * 0.9


def fail(what: str, m: dict) -> None:
    print(f"check_scale: the {what} check reported {m['errors']} error(s): the generator is wrong, "
          "so the figures would measure the wrong thing:", file=sys.stderr)
    for e in m["first_errors"]:
        print(f"  {e}", file=sys.stderr)
    raise SystemExit(1)


# ---------------------------------------------------------------- output

def mib(n: float | None) -> str:
    return "-" if n is None else f"{n / (1024 * 1024):,.0f} MiB"


def _t(m: dict, key: str) -> str:
    if m.get(f"{key}_s") is None:
        return "-"
    return f"{m[f'{key}_s']:.2f} s ({m[f'{key}_cpu_s']:.2f} s)"


def row(label: str, m: dict | None) -> str:
    if not m:
        return f"| {label} | - | - | - | - | - | - |"
    rss = mib(m["maxrss_kib"] * 1024) if "maxrss_kib" in m else "-"
    return (f"| {label} | {m['bytes'] / 1e6:.1f} MB | {_t(m, 'check')} | {_t(m, 'parse')} | {_t(m, 'passes')} "
            f"| {mib(m.get('tracemalloc_peak_bytes'))} | {rss} |")


def table(report: dict) -> str:
    lines = [f"policyc check at scale (seed {report['seed']}, best of {report['repeat']}; "
             f"{report['machine']['cpus']} CPUs, Python {report['machine']['python']}; "
             f"load average at the start {report['machine']['loadavg_start']})", "",
             "times: wall (CPU time of this process)", "",
             "| policy | size | check_policy | parse (read_policy_file) | checker passes on the parsed tree "
             "| tracemalloc peak | max RSS (fresh process) |",
             "|---|---|---|---|---|---|---|"]
    full = report["full"]
    lines.append(row(f"DSL, {full['rules']:,} rules / {full['regions']:,} regions", full["dsl"]))
    if full.get("yaml") and not full["yaml"].get("errors"):
        lines.append(row(f"YAML, {full['rules']:,} rules / {full['regions']:,} regions", full["yaml"]))
    fit = report.get("yaml_fit")
    if fit:
        lines.append(row(f"DSL, {fit['rules']:,} rules / {fit['regions']:,} regions", fit["dsl"]))
        lines.append(row(f"YAML, {fit['rules']:,} rules / {fit['regions']:,} regions", fit["yaml"]))
    for note in report["notes"]:
        lines.append("")
        lines.append(f"note: {note}")
    if "maxrss_kib" in full["dsl"]:
        lines.append("")
        lines.append(f"max RSS of the fresh interpreter right after importing policyc: "
                     f"{mib(full['dsl']['after_import_kib'] * 1024)}; that same interpreter's "
                     f"(cold) check of the full DSL: {full['dsl']['cold_check_s']:.2f} s")
    for label, m in (("full DSL", full["dsl"]), ("YAML-sized DSL", (fit or {}).get("dsl"))):
        if m and "lower_note" in m:
            lines.append(f"lowering of the {label}: {m['lower_note']}")
        if m and "lower_s" in m:
            lines.append(f"lowering (compile_plan) of the {label}: {m['lower_s']:.2f} s "
                         f"({m['lower_cpu_s']:.2f} s CPU), "
                         f"{m['lower_errors']} errors, {m['lower_warnings']} warnings "
                         f"({', '.join(f'{k} x{v}' for k, v in sorted(m['lower_diagnostics'].items())) or 'none'})")
    lines.append(f"generating the full DSL: {full['generate_s']:.1f} s"
                 + (f"; policyc fmt --to yaml of it: {full['fmt_to_yaml_s']:.1f} s"
                    if "fmt_to_yaml_s" in full else ""))
    return "\n".join(lines)


def _loadavg() -> str | None:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rules", type=int, default=10_000, help="rules in the generated policy (default 10,000)")
    ap.add_argument("--regions", type=int, default=100_000, help="regions in it (default 100,000)")
    ap.add_argument("--seed", type=int, default=1, help="generator seed (default 1)")
    ap.add_argument("--repeat", type=int, default=1, help="in-process runs of each check; the best is reported")
    ap.add_argument("--no-yaml", action="store_true", help="skip the YAML spelling")
    ap.add_argument("--lower", action="store_true",
                    help="also time policyc.compiler.compile_plan on the checked DSL model (the command "
                         "'policyc check' lowers too); its findings are reported, not asserted")
    ap.add_argument("--json", action="store_true", help="print the figures as JSON on stdout (the table goes "
                                                        "to stderr)")
    ap.add_argument("--keep", metavar="DIR", help="generate into DIR and keep it (default: a temporary directory)")
    args = ap.parse_args()

    report: dict = {
        "date": time.strftime("%Y-%m-%d"), "seed": args.seed, "repeat": args.repeat,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform(),
                    "loadavg_start": _loadavg()},
        "notes": [],
    }
    tmp_ctx = tempfile.TemporaryDirectory(prefix="policyc-check-scale-") if not args.keep else None
    tmp = Path(args.keep) if args.keep else Path(tmp_ctx.name)  # type: ignore[union-attr]
    try:
        warm_up(tmp)
        t0 = time.perf_counter()
        dsl = write_policy(tmp / "full", args.rules, args.regions, args.seed)
        gen_s = time.perf_counter() - t0
        full: dict = {"rules": args.rules, "regions": args.regions, "generate_s": gen_s}
        report["full"] = full
        full["dsl"] = measure(dsl, args.repeat, lower=args.lower)
        if full["dsl"]["errors"]:
            fail("DSL", full["dsl"])
        if args.no_yaml:
            report["notes"].append("YAML skipped (--no-yaml)")
        else:
            t0 = time.perf_counter()
            yml, why = to_yaml(dsl)
            full["fmt_to_yaml_s"] = time.perf_counter() - t0
            if yml is None:
                report["notes"].append(why)
            else:
                m = measure(yml, args.repeat)
                full["yaml"] = m
                if m["errors"] and not refused_by_bounds(m):
                    fail("YAML", m)
                if m["errors"]:
                    nodes = yaml_nodes(yml)
                    m["nodes"] = nodes
                    frac = yaml_fit_scale(yml, nodes)
                    fit = {"rules": max(1, int(args.rules * frac)), "regions": max(1, int(args.regions * frac))}
                    report["notes"].append(
                        f"the full-size YAML ({m['bytes'] / 1e6:.1f} MB, {nodes:,} nodes) is refused by the YAML "
                        f"front end's bounds ({(YAML_MAX_BYTES or 0) // (1024 * 1024)} MiB, "
                        f"{YAML_MAX_NODES or 0:,} nodes): {m['first_errors'][0]} (after {m['check_s']:.2f} s); "
                        f"YAML measured at {fit['rules']:,} rules / {fit['regions']:,} regions instead, "
                        "next to the DSL at that size")
                    fdsl = write_policy(tmp / "fit", fit["rules"], fit["regions"], args.seed)
                    fit["dsl"] = measure(fdsl, args.repeat, lower=args.lower)
                    if fit["dsl"]["errors"]:
                        fail("DSL (YAML-sized)", fit["dsl"])
                    fyml, why = to_yaml(fdsl)
                    if fyml is None:
                        report["notes"].append(why)
                    else:
                        fit["yaml"] = measure(fyml, args.repeat)
                        if fit["yaml"]["errors"]:
                            fail("YAML (scaled to fit)", fit["yaml"])
                        report["yaml_fit"] = fit
    finally:
        if tmp_ctx is not None:
            tmp_ctx.cleanup()
    # The keys every scale benchmark reports (bench/compile_scale.py has the same): the DSL at full size.
    dsl_full = report.get("full", {}).get("dsl", {})
    report.update({"check_s": dsl_full.get("check_s"), "compile_s": dsl_full.get("lower_s"),
                   "serialise_s": dsl_full.get("serialise_s"), "plan_bytes": dsl_full.get("plan_bytes"),
                   "peak_rss_mib": round(dsl_full["maxrss_kib"] / 1024, 1) if dsl_full.get("maxrss_kib") else None})
    text = table(report)
    if args.json:
        print(text, file=sys.stderr)
        print(json.dumps(report, indent=2))
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
