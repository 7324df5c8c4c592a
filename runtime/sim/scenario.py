"""Scenarios (shared/spec/SCENARIOS.md): load one, build its guest, run its steps.

A scenario file says what the guest looks like (``guest:``), which policy it
is meant for (``policy:``), what its vCPUs do (``steps:``) and, for
``policyc test``, what should come of it (``expect:``, kept as written for
the test runner). `load_scenario` reads the YAML with positions, so a bad
step or expression is reported at its line and column; expressions are
parsed once with `policyc.dsl.parse_expression` into the plan's condition form
and evaluated by the plans' own evaluator (`policyc.condition_form`, so a
division by zero gives 0 as in a rule's `when`) when the step runs, against
the slid symbols and the step's vCPU registers at that moment ("cr0 & ~cr0.WP"
reads the current CR0).

`ScenarioRunner` runs the steps in order against a `SimulatedXen`. A step
whose vCPU pauses hands control to the RESPONDER (a callable taking the
`SimulatedXen`: the enforcer, or a test's small monitor), which drains the
ring, puts responses and notifies; the simulator resumes the vCPU per the
response. The runner keeps calling the responder while the step's vCPU is
stuck and the responder makes progress. Each step yields a `StepResult`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import yaml
from yaml.constructor import SafeConstructor
from yaml.nodes import MappingNode, ScalarNode, SequenceNode

from ...arch import ARCHES
from ...condition_form import ARITH, COMPARE, U64, evaluate
from ...diagnostics import Diagnostics, Span
from ...dsl import parse_expression
from ...symbols import SymbolFileError
from ...yaml_form.compose import MAX_DEPTH, MAX_DOCUMENT_BYTES, MAX_NODES, BoundedLoader, YamlBoundError, describe_yaml_error
from ... import syntax as S
from ..guest_memory import MemorySnapshot
from .guest import MSR, GuestFault, TranslationFault
from .layout_pages import parse_size
from .layouts import build_guest
from .xen import Op, SimulatedXen
from ...errors import PolicycError

__all__ = ["ScenarioError", "Scenario", "Step", "StepResult", "ScenarioRunner", "load_scenario",
           "load_scenario_text", "build_scenario", "run_scenario", "OPS"]

Responder = Callable[[SimulatedXen], None]

# op -> (required keys, optional keys)
OPS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "read": (("va",), ("size",)),
    "write": (("va", "value"), ("size", "via")),
    "exec": (("va",), ("via",)),
    "rmw": (("va",), ("size", "value", "via")),
    "write_cr": (("cr", "value"), ()),
    "wrmsr": (("msr", "value"), ()),
    "lidt": (("base",), ("limit",)),
    "lgdt": (("base",), ("limit",)),
    "sidt": ((), ()),
    "lldt": (("base",), ()),
    "ltr": (("base",), ()),
    "sldt": ((), ()),
    "str": ((), ()),
    "sgdt": ((), ()),
    "cpuid": ((), ("leaf", "subleaf")),
    "int3": ((), ("va",)),
    "guest_request": ((), ("rax", "rbx", "rcx", "rdx")),
    "remap": (("va", "to_pa"), ()),
    "icebp": ((), ()),
    "trap_flag": ((), ()),
    "smc": ((), ()),
    "loop": (("steps",), ("count", "times")),
    "parallel": (("steps",), ()),
    "reload": ((), ("policy", "plan")),
}
_COMMON = ("vcpu", "op", "rip", "cr3", "insn_length", "comment", "name")
_EXPR_KEYS = ("va", "value", "size", "base", "limit", "leaf", "subleaf", "to_pa", "rip", "cr3",
              "count", "times", "insn_length", "rax", "rbx", "rcx", "rdx")
LOOP_KEEP_RAW = 4       # iterations of a loop whose raw events are kept
MAX_LOOP_COUNT = 1_000_000          # iterations of one loop, and of nested loops together
MAX_MEMORY = 8 << 30                # the simulator builds page tables and frames for all of it
# How a `write`/`rmw` reaches its target (see `ScenarioRunner._route_write`).
WRITE_ROUTES = ("auto", "va", "alias")


class ScenarioError(PolicycError):
    """A scenario that cannot be used; ``line``/``col`` locate the culprit (1-based)."""

    def __init__(self, message: str, path: str = "<scenario>", line: int | None = None,
                 col: int | None = None) -> None:
        where = f"{path}:{line}:{col}: " if line is not None else f"{path}: "
        super().__init__(where + message)
        self.message = message
        self.path = path
        self.line = line
        self.col = col


# --------------------------------------------------------------------------- YAML with positions

class _PMap(dict):
    pos: tuple[int, int]
    key_pos: dict
    value_pos: dict
    quoted: dict


class _PList(list):
    pos: tuple[int, int]
    item_pos: list


_SCALARS = SafeConstructor()


def _pos(node: Any) -> tuple[int, int]:
    return node.start_mark.line + 1, node.start_mark.column + 1


def _convert(node: Any, path: str, budget: list[int], depth: int = 0) -> Any:
    """Plain values with positions. Every node is charged to `budget`, an alias once per use: an
    alias repeats its anchor's whole content, which is how a 300-byte file expands to gigabytes."""
    if depth > MAX_DEPTH:
        raise ScenarioError(f"YAML nesting is deeper than {MAX_DEPTH} levels", path, *_pos(node))
    budget[0] -= 1
    if budget[0] < 0:
        raise ScenarioError(f"the scenario expands to more than {MAX_NODES:,} YAML nodes (through aliases)",
                            path, *_pos(node))
    if isinstance(node, ScalarNode):
        return _SCALARS.construct_object(node, deep=True)
    if isinstance(node, SequenceNode):
        out = _PList(_convert(n, path, budget, depth + 1) for n in node.value)
        out.pos = _pos(node)
        out.item_pos = [_pos(n) for n in node.value]
        return out
    if isinstance(node, MappingNode):
        out = _PMap()
        out.pos = _pos(node)
        out.key_pos, out.value_pos, out.quoted = {}, {}, {}
        for knode, vnode in node.value:
            if not isinstance(knode, ScalarNode):
                raise ScenarioError("mapping keys must be plain scalars", path, *_pos(knode))
            key = knode.value
            if key in out:
                raise ScenarioError(f"duplicate key '{key}'", path, *_pos(knode))
            out[key] = _convert(vnode, path, budget, depth + 1)
            out.key_pos[key] = _pos(knode)
            out.value_pos[key] = _pos(vnode)
            out.quoted[key] = isinstance(vnode, ScalarNode) and vnode.style in ("'", '"')
        return out
    raise ScenarioError("unsupported YAML node", path, *_pos(node))


def _load_yaml(text: str, path: str) -> Any:
    """The document read with the policy loader's bounds (size, nodes, depth, alias expansion)."""
    if len(text.encode("utf-8", "surrogatepass")) > MAX_DOCUMENT_BYTES:
        raise ScenarioError(f"larger than {MAX_DOCUMENT_BYTES // (1024 * 1024)} MiB", path)
    try:
        loader = BoundedLoader(text)
    except yaml.YAMLError as exc:   # the reader refuses a character before any parsing
        message, span, _hint = describe_yaml_error(exc, path, text)
        raise ScenarioError(message, path, span.line, span.col) from None
    try:
        node = loader.get_single_node()
    except YamlBoundError as stop:
        raise ScenarioError(stop.message, path, *(_mark_pos(stop.mark))) from None
    except yaml.MarkedYAMLError as exc:
        raise ScenarioError(f"YAML syntax error: {exc.problem or exc}", path,
                            *_mark_pos(exc.problem_mark or exc.context_mark)) from None
    except yaml.YAMLError as exc:
        raise ScenarioError(f"YAML error: {exc}", path) from None
    except (ValueError, TypeError, IndexError, KeyError, AttributeError, UnicodeError) as exc:
        raise ScenarioError(f"the YAML text cannot be read: {exc}", path) from None
    finally:
        loader.dispose()
    if node is None:
        raise ScenarioError("empty scenario file", path)
    try:
        return _convert(node, path, [MAX_NODES])
    except yaml.YAMLError as exc:   # a scalar the constructor refuses (e.g. a bad timestamp)
        raise ScenarioError(f"YAML error: {exc}", path, *_pos(node)) from None
    except (ValueError, OverflowError) as exc:
        raise ScenarioError(f"YAML value cannot be read: {exc}", path) from None


def _exists(path: Path) -> bool:
    """Whether a file is there; a name the system cannot even look up (too long, a NUL) is not."""
    try:
        return path.exists()
    except (OSError, ValueError):
        return False


def _mark_pos(mark: Any) -> tuple[int | None, int | None]:
    return (mark.line + 1, mark.column + 1) if mark is not None else (None, None)


# --------------------------------------------------------------------------- expressions

_MASK = U64
_NAMED_BITS = {k.lower(): v for k, v in ARCHES["x86_64"].named_bits.items()}
_MSR_NAMES = {**ARCHES["x86_64"].msrs, **MSR}


@dataclass
class _Env:
    runner: "ScenarioRunner"
    vcpu: int


Compiled = Callable[[_Env], int]
# A name a scenario expression reads (a register, an MSR, a symbol), resolved when the step runs.
_Reader = Callable[[_Env], int]


class _Condition:
    """A scenario expression in the plan's condition form, evaluated by the one evaluator plans use
    (`policyc.condition_form.evaluate`): the same arithmetic, wrapping and comparisons as a rule's
    `when`, so a scenario cannot compute a value the enforcer would compute differently. Names the
    guest supplies (registers, MSRs, symbols) are the form's fields, read when the step runs."""

    __slots__ = ("form", "readers")

    def __init__(self, form: list, readers: dict[str, _Reader]) -> None:
        self.form, self.readers = form, readers

    def __call__(self, env: _Env) -> int:
        return int(evaluate(self.form, _GuestFields(self.readers, env)))


class _GuestFields(Mapping[str, int]):
    """The event the evaluator reads: each field asked for is read from the guest at that moment."""

    def __init__(self, readers: dict[str, _Reader], env: _Env) -> None:
        self.readers, self.env = readers, env

    def __getitem__(self, key: str) -> int:
        return self.readers[key](self.env)

    def __iter__(self) -> Iterator[str]:
        return iter(self.readers)

    def __len__(self) -> int:
        return len(self.readers)


def _compile(node: S.Expr, path: str, span: tuple[int, int]) -> Compiled:
    readers: dict[str, _Reader] = {}
    return _Condition(_FormBuilder(path, span, readers).form(node), readers)


class _FormBuilder:
    """Syntax tree -> condition form, dispatched on the node's type through `_FORMS`."""

    def __init__(self, path: str, span: tuple[int, int], readers: dict[str, _Reader]) -> None:
        self.path, self.span, self.readers = path, span, readers

    def form(self, node: S.Expr) -> list:
        build = _FORMS.get(type(node))
        if build is None:
            raise self.error(f"{type(node).__name__} is not allowed in a scenario expression", node)
        return build(self, node)

    def error(self, msg: str, node: Any = None) -> ScenarioError:
        sp = getattr(node, "span", None)
        if sp is not None and sp.file == self.path and sp.line:
            return ScenarioError(msg, self.path, sp.line, sp.col)
        return ScenarioError(msg, self.path, *self.span)

    def number(self, node: S.Num) -> list:
        return ["lit", hex(node.value & _MASK)]

    def named_bit(self, node: S.Attr) -> list:
        bits = _NAMED_BITS.get(node.base.lower(), {})
        if node.attr not in bits:
            raise self.error(f"unknown named bit '{node.base}.{node.attr}'", node)
        return ["lit", hex(bits[node.attr])]

    def unary(self, node: S.Unary) -> list:
        op = _UNARY.get(node.op)
        if op is None:
            raise self.error(f"unsupported operator '{node.op}'", node)
        return [op, self.form(node.operand)]

    def binary(self, node: S.Binary) -> list:
        if node.op not in ARITH and node.op not in COMPARE and node.op not in ("and", "or"):
            raise self.error(f"unsupported operator '{node.op}'", node)
        return [node.op, self.form(node.left), self.form(node.right)]

    def symbol(self, node: S.SymbolRef) -> list:
        name, optional, percpu = node.name, node.optional, node.percpu
        key = f"symbol {name}{'?' if optional else ''}{' percpu' if percpu else ''}"

        def read(env: _Env) -> int:
            g = env.runner.xen.guest
            if percpu or (name in g.percpu and name not in g.symbols):
                if name not in g.percpu:
                    raise self.error(f"no per-CPU symbol '{name}'", node)
                return g.percpu_base[env.vcpu] + g.percpu[name]
            addr = g.symbols.get(name)
            if addr is None:
                if optional:
                    return 0
                raise self.error(f"unknown symbol '{name}' in this guest", node)
            return addr
        self.readers.setdefault(key, read)
        return ["field", key]

    def register(self, node: S.Name) -> list:
        name = node.name

        def read(env: _Env) -> int:
            v = env.runner.xen.vcpu(env.vcpu)
            try:
                return v.get(name)
            except KeyError:
                pass
            index = _MSR_NAMES.get(name) or _MSR_NAMES.get(name.upper())
            if index is not None:
                return v.msrs.get(index, 0)
            raise self.error(f"unknown register or name '{name}'", node)
        self.readers.setdefault(name, read)
        return ["field", name]


_UNARY = {"-": "neg", "~": "inv", "not": "not"}
_FORMS: dict[type, Callable[[_FormBuilder, Any], list]] = {
    S.Num: _FormBuilder.number, S.Attr: _FormBuilder.named_bit, S.Unary: _FormBuilder.unary,
    S.Binary: _FormBuilder.binary, S.SymbolRef: _FormBuilder.symbol, S.Name: _FormBuilder.register,
}


def _expression(value: Any, path: str, pos: tuple[int, int], what: str, quoted: bool = False) -> Compiled:
    if isinstance(value, bool):
        raise ScenarioError(f"{what}: expected a number or an expression, got {value}", path, *pos)
    if isinstance(value, int):
        v = value & _MASK if value >= 0 else value
        return lambda env: v
    if not isinstance(value, str):
        raise ScenarioError(f"{what}: expected a number or an expression", path, *pos)
    diags = Diagnostics()
    col = pos[1] + (1 if quoted else 0)
    tree = parse_expression(value, Span(path, pos[0], col), diags)
    if tree is None or diags.has_errors:
        d = next(iter(diags), None)
        if d is not None and d.span is not None:
            raise ScenarioError(f"{what}: {d.message}", path, d.span.line, d.span.col)
        raise ScenarioError(f"{what}: cannot parse '{value}'", path, *pos)
    return _compile(tree, path, pos)


# --------------------------------------------------------------------------- the model

@dataclass
class Step:
    index: int
    op: str
    vcpu: int
    args: dict[str, Any]                      # raw values as written
    exprs: dict[str, Compiled]
    line: int
    col: int
    body: list["Step"] = field(default_factory=list)   # for loop
    count: Compiled | None = None
    msr: int | None = None
    cr: str | None = None
    source: str | None = None                 # reload: the policy or plan file (beside the scenario)


@dataclass
class Scenario:
    name: str
    path: str
    layout: str
    symbols: str | None
    kaslr_slide: int
    memory: int
    vcpus: int
    profile: str
    policy: str | None
    steps: list[Step]
    expect: list[Any]
    guest_extra: dict[str, Any] = field(default_factory=dict)

    @property
    def reloads(self) -> bool:
        """Whether a step (or a step inside one) reloads the enforcer's plan."""
        return any(s.op == "reload" for s in _walk(self.steps))


@dataclass
class StepResult:
    """What one step did. ``took_effect`` is the guest-side verdict (allow when
    true); ``events`` counts the vm_event requests it caused; ``requests`` /
    ``responses`` are their raw bytes; ``faults`` the exceptions the guest got;
    ``paused``: the step's vCPU was still paused when the step ended."""

    index: int
    op: str
    vcpu: int
    took_effect: bool
    events: int
    requests: list[bytes]
    responses: list[bytes]
    faults: list[GuestFault]
    livelock: bool
    paused: bool
    value: Any = None
    note: str = ""
    iterations: int = 1
    line: int | None = None
    frames: tuple[int, ...] = ()        # guest frames a data access or fetch of a top-level step touched

    @property
    def verdict(self) -> str:
        return "allow" if self.took_effect else "deny"


def load_scenario(path: str | Path) -> Scenario:
    p = Path(path)
    try:
        text = p.read_text("utf-8")
    except OSError as exc:
        raise ScenarioError(f"cannot read: {exc.strerror}", str(p)) from None
    except UnicodeDecodeError:
        raise ScenarioError("not UTF-8 text", str(p)) from None
    return load_scenario_text(text, str(p))


def load_scenario_text(text: str, path: str = "<scenario>") -> Scenario:
    doc = _load_yaml(text, path)
    if not isinstance(doc, _PMap):
        raise ScenarioError("a scenario is a mapping (scenario:, guest:, steps:)", path, *getattr(doc, "pos", (1, 1)))
    known = {"scenario", "guest", "policy", "steps", "expect", "description"}
    for key in doc:
        if key not in known:
            raise ScenarioError(f"unknown key '{key}' (known: {', '.join(sorted(known))})", path,
                                *doc.key_pos[key])
    base = Path(path).parent
    guest = doc.get("guest") or _PMap()
    if not isinstance(guest, _PMap):
        raise ScenarioError("guest: must be a mapping", path, *doc.value_pos["guest"])
    gknown = {"layout", "symbols", "kaslr_slide", "memory", "vcpus", "profile", "phys_slide",
              "page_offset_base"}
    for key in guest:
        if key not in gknown:
            raise ScenarioError(f"unknown guest key '{key}' (known: {', '.join(sorted(gknown))})", path,
                                *guest.key_pos[key])

    def gint(key: str, default: int) -> int:
        value = guest.get(key, default)
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise ScenarioError(f"guest.{key}: expected a number", path, *guest.value_pos[key])
        try:
            number = parse_size(value) if key == "memory" else int(value, 0) if isinstance(value, str) else value
        except ValueError as exc:
            raise ScenarioError(f"guest.{key}: {exc}", path, *guest.value_pos[key]) from None
        if key == "memory" and not 0 < number <= MAX_MEMORY:
            raise ScenarioError(f"guest.memory: {value} is outside 1 byte .. {MAX_MEMORY >> 30}G (the simulator "
                                "holds all of it)", path, *guest.value_pos[key])
        return number

    policy = doc.get("policy")
    symbols = guest.get("symbols")
    if symbols is not None:
        if not isinstance(symbols, str) or (policy is not None and not isinstance(policy, str)):
            key = "guest.symbols" if not isinstance(symbols, str) else "policy"
            where = guest.value_pos["symbols"] if key == "guest.symbols" else doc.value_pos["policy"]
            raise ScenarioError(f"{key}: must be a file name", path, *where)
        # Next to the scenario, else next to its policy (where a policy's own symbol file lives).
        cand = base / symbols
        if not _exists(cand) and policy:
            beside_policy = (base / policy).parent / symbols
            if _exists(beside_policy):
                cand = beside_policy
        symbols = str(cand)
    steps_node = doc.get("steps")
    if not isinstance(steps_node, _PList):
        raise ScenarioError("steps: must be a list", path, *(doc.value_pos.get("steps") or doc.pos))
    steps = _steps(steps_node, path, [0])
    expect = doc.get("expect") or []
    extra = {k: guest[k] for k in ("phys_slide", "page_offset_base") if k in guest}
    return Scenario(
        name=str(doc.get("scenario") or Path(path).stem), path=path,
        layout=str(guest.get("layout", "linux-x86_64")), symbols=symbols,
        kaslr_slide=gint("kaslr_slide", 0), memory=gint("memory", 256 << 20),
        vcpus=gint("vcpus", 1), profile=str(guest.get("profile", "x86_64")),
        policy=os.path.normpath(base / policy) if policy else None, steps=steps, expect=list(expect),
        guest_extra={k: (int(v, 0) if isinstance(v, str) else v) for k, v in extra.items()})


def _steps(items: _PList, path: str, counter: list[int]) -> list[Step]:
    out = []
    for item, pos in zip(items, items.item_pos):
        out.append(_step(item, pos, path, counter))
    return out


def _step(item: Any, pos: tuple[int, int], path: str, counter: list[int]) -> Step:
    if not isinstance(item, _PMap):
        raise ScenarioError("a step is a mapping with an 'op'", path, *pos)
    op = item.get("op")
    if op not in OPS:
        where = item.value_pos.get("op", pos)
        raise ScenarioError(f"unknown op '{op}' (one of {', '.join(OPS)})", path, *where)
    required, optional = OPS[op]
    for key in required:
        if key not in item and not (op in ("loop", "parallel") and key == "steps"):
            raise ScenarioError(f"op {op} needs '{key}'", path, *pos)
    for key in item:
        if key not in required and key not in optional and key not in _COMMON:
            raise ScenarioError(f"op {op} takes no '{key}'", path, *item.key_pos[key])
    vcpu = item.get("vcpu", 0)
    if isinstance(vcpu, bool) or not isinstance(vcpu, int) or vcpu < 0:
        raise ScenarioError("vcpu: expected a vCPU number", path, *item.value_pos.get("vcpu", pos))
    index = counter[0]
    counter[0] += 1
    exprs: dict[str, Compiled] = {}
    for key in _EXPR_KEYS:
        if key in item:
            exprs[key] = _expression(item[key], path, item.value_pos[key], f"{op}.{key}",
                                     item.quoted.get(key, False))
    step = Step(index, op, vcpu, dict(item), exprs, pos[0], pos[1])
    if "via" in item and item["via"] not in WRITE_ROUTES:
        raise ScenarioError(f"via: '{item['via']}' is not one of {', '.join(WRITE_ROUTES)}", path,
                            *item.value_pos["via"])
    if op == "write_cr":
        cr = str(item["cr"]).lower()
        if cr not in ("cr0", "cr3", "cr4", "xcr0"):
            raise ScenarioError(f"cr: '{item['cr']}' is not cr0, cr3, cr4 or xcr0", path, *item.value_pos["cr"])
        step.cr = cr
    if op == "wrmsr":
        msr = item["msr"]
        if isinstance(msr, int) and not isinstance(msr, bool):
            step.msr = msr
        elif isinstance(msr, str) and (msr.upper() in _MSR_NAMES):
            step.msr = _MSR_NAMES[msr.upper()]
        elif isinstance(msr, str):
            try:
                step.msr = int(msr, 0)
            except ValueError:
                raise ScenarioError(f"msr: unknown MSR '{msr}'", path, *item.value_pos["msr"]) from None
        else:
            raise ScenarioError("msr: expected an MSR name or number", path, *item.value_pos["msr"])
    if op == "reload":
        given = [k for k in ("policy", "plan") if k in item]
        if len(given) != 1 or not isinstance(item[given[0]], str) or not item[given[0]]:
            raise ScenarioError("reload needs one of 'policy: FILE' or 'plan: FILE'", path, *pos)
        step.source = os.path.normpath(Path(path).parent / item[given[0]])
    if op == "loop":
        body = item.get("steps")
        if not isinstance(body, _PList) or not body:
            raise ScenarioError("loop: 'steps' must be a non-empty list", path, *item.value_pos.get("steps", pos))
        step.count = exprs.get("count") or exprs.get("times")
        if step.count is None:
            raise ScenarioError("loop needs 'count'", path, *pos)
        key = "count" if "count" in item else "times"
        if isinstance(item[key], int):   # a literal: checked now (an expression is checked when run)
            _check_loop_count(item[key], path, item.value_pos[key])
        inner = [0]
        step.body = _steps(body, path, inner)
        _check_nested_loops(step, path)
        for s in step.body:
            if "vcpu" not in s.args:
                s.vcpu = vcpu
    if op == "parallel":
        body = item.get("steps")
        if not isinstance(body, _PList) or not body:
            raise ScenarioError("parallel: 'steps' must be a non-empty list", path,
                                *item.value_pos.get("steps", pos))
        step.body = _steps(body, path, [0])
        seen: set[int] = set()
        if sum(1 for s in step.body if s.op == "reload") > 1:
            raise ScenarioError("parallel: one reload at most", path, *pos)
        for s in step.body:
            if s.op in ("loop", "parallel"):
                raise ScenarioError(f"parallel runs one operation per vCPU, not a {s.op}", path, s.line, s.col)
            if s.op == "reload":
                continue                     # the enforcer's, not a vCPU's: it runs with the events in flight
            if s.vcpu in seen:
                raise ScenarioError(f"parallel: vCPU {s.vcpu} has two operations (one per vCPU)", path,
                                    s.line, s.col)
            seen.add(s.vcpu)
    return step


def _check_loop_count(count: int, path: str, pos: tuple[int | None, int | None]) -> int:
    if not 1 <= count <= MAX_LOOP_COUNT:
        raise ScenarioError(f"loop: count {count if abs(count) < 10 ** 20 else 'of ' + str(len(str(count))) + ' digits'} "
                            f"is outside 1..{MAX_LOOP_COUNT:,}", path, *pos)
    return count


def _check_nested_loops(step: Step, path: str) -> None:
    """Nested literal counts multiply: each bounded alone can still run for hours together."""
    def most(s: Step) -> int:
        if s.op != "loop":
            return 1
        count = s.args.get("count", s.args.get("times"))
        times = count if isinstance(count, int) else 1
        return times * max((most(b) for b in s.body), default=1)
    total = most(step)
    if total > MAX_LOOP_COUNT:
        raise ScenarioError(f"loop: nested loops run {total:,} iterations; at most {MAX_LOOP_COUNT:,}",
                            path, step.line, step.col)


# --------------------------------------------------------------------------- running

_LAYOUT_SYMBOLS = {"linux-x86_64": "a System.map or ISF", "windows-x86_64": "a Windows ISF",
                   "linux-arm64": "an arm64 System.map"}


def build_scenario(scenario: Scenario, *, profile: str | None = None, **xen_options: Any) -> SimulatedXen:
    """The guest the scenario describes, under a fresh `SimulatedXen`."""
    kwargs: dict[str, Any] = {"memory": scenario.memory, "vcpus": scenario.vcpus}
    needs = _LAYOUT_SYMBOLS.get(scenario.layout)
    if needs is not None and scenario.symbols is None:
        raise ScenarioError(f"the {scenario.layout} layout needs guest.symbols ({needs})", scenario.path)
    if scenario.layout in ("windows-x86_64", "linux-arm64") and scenario.guest_extra:
        raise ScenarioError(f"guest.{', guest.'.join(scenario.guest_extra)}: not used by the {scenario.layout} "
                            "layout", scenario.path)
    if scenario.layout == "linux-x86_64":
        kwargs.update(symbols=scenario.symbols, kaslr_slide=scenario.kaslr_slide, **scenario.guest_extra)
    elif scenario.layout == "windows-x86_64":
        # A Windows ISF's addresses are RVAs: the slide is ntoskrnl's image base.
        kwargs.update(symbols=scenario.symbols, image_base=scenario.kaslr_slide)
    elif scenario.layout == "linux-arm64":
        if (profile or scenario.profile) != "arm64":
            raise ScenarioError(f"the linux-arm64 layout runs under the arm64 profile, not "
                                f"{profile or scenario.profile} (add 'profile: arm64' to guest:)", scenario.path)
        kwargs.update(symbols=scenario.symbols, kaslr_slide=scenario.kaslr_slide)
    try:
        guest = build_guest(scenario.layout, **kwargs)
    except (ValueError, OSError, SymbolFileError) as exc:
        raise ScenarioError(f"guest: {exc}", scenario.path) from None
    return SimulatedXen(guest, profile or scenario.profile, **xen_options)


class ScenarioRunner:
    """Runs a scenario's steps; keeps the start state for ``unchanged`` checks."""

    def __init__(self, scenario: Scenario, xen: SimulatedXen | None = None,
                 responder: Responder | None = None) -> None:
        self.scenario = scenario
        self.xen = xen if xen is not None else build_scenario(scenario)
        self.responder = responder
        # Runs a `reload` step (the enforcer's: policy tests set it), given the top-level step it is part
        # of; returns whether the new plan took.
        self.reloader: Callable[[Step, int], bool] | None = None
        self._top = 0
        self.results: list[StepResult] = []
        for step in _walk(scenario.steps):
            if step.vcpu >= len(self.xen.guest.vcpus):
                raise ScenarioError(f"step uses vCPU {step.vcpu} but the guest has "
                                    f"{len(self.xen.guest.vcpus)}", scenario.path, step.line, step.col)
        self.initial_registers = [self.xen.get_registers(i) for i in range(len(self.xen.guest.vcpus))]
        self.initial_msrs = [dict(v.msrs) for v in self.xen.guest.vcpus]
        self.initial_memory: MemorySnapshot = self.xen.guest.memory.snapshot()

    # -- state for expect: checks
    def read_memory(self, va: int, size: int, *, vcpu: int = 0, initial: bool = False) -> bytes:
        """Bytes at ``va`` as vCPU ``vcpu``'s current view shows them (or as they were at the start)."""
        if not initial:
            return self.xen.read_guest(vcpu, va, size)
        regs = self.initial_registers[vcpu]
        pa = self.xen.guest.walk(regs.get("cr3", regs.get("ttbr0")), va).pa    # an arm64 guest walks from TTBR0
        return self.initial_memory.read(pa, size)

    def register(self, vcpu: int, name: str, *, initial: bool = False) -> int:
        if initial:
            regs = self.initial_registers[vcpu]
            if name in regs:
                return regs[name]
            index = _MSR_NAMES.get(name.upper())
            if index is not None:
                return self.initial_msrs[vcpu].get(index, 0)
            raise KeyError(name)
        v = self.xen.vcpu(vcpu)
        try:
            return v.get(name)
        except KeyError:
            index = _MSR_NAMES.get(name.upper())
            if index is None:
                raise
            return v.msrs.get(index, 0)

    def evaluate(self, text: str | int, vcpu: int = 0) -> int:
        return _expression(text, self.scenario.path, (1, 1), "expression")(_Env(self, vcpu))

    # -- running
    def run(self) -> list[StepResult]:
        for step in self.scenario.steps:
            self.results.append(self.run_step(step))
        self.settle()
        return self.results

    def start_step(self, step: Step, *, record: bool = False) -> Op:
        """Start one step (not a loop) and return its operation without driving a responder: for a
        workload whose events are answered by an enforcer in another process (runtime/sim/host.py)."""
        if step.op in ("loop", "parallel"):
            raise ValueError("start_step runs one operation; expand loops first")
        op = self._make_op(step, record=record)
        self.xen.execute(step.vcpu, op)
        return op

    def loop_count(self, step: Step) -> int:
        assert step.count is not None
        return _check_loop_count(step.count(_Env(self, step.vcpu)), self.scenario.path, (step.line, step.col))

    def run_step(self, step: Step) -> StepResult:
        self._top = step.index
        if step.op == "loop":
            return self._run_loop(step)
        if step.op == "parallel":
            return self._run_parallel(step, record=True)
        if step.op == "reload":
            return self._run_reload(step)
        res, op = self._run_single(step, record=True)
        if op.kind in ("read", "write", "rmw", "exec") and op.va is not None:
            res.frames = self._frames(step.vcpu, op.va, op.size if op.kind != "exec" else 1)
        return res

    def _frames(self, vcpu: int, va: int, size: int) -> tuple[int, ...]:
        g, cr3 = self.xen.guest, self.xen.vcpu(vcpu).cr3
        out = []
        for a in sorted({va, va + max(size, 1) - 1}):
            try:
                out.append(g.walk(cr3, a).pa >> 12)
            except TranslationFault:
                pass
        return tuple(dict.fromkeys(out))

    def _run_loop(self, step: Step) -> StepResult:
        count = self.loop_count(step)
        res = StepResult(step.index, "loop", step.vcpu, True, 0, [], [], [], False, False,
                         iterations=count, line=step.line)
        for i in range(count):
            for inner in step.body:
                r = self._run_inner(inner, record=i < LOOP_KEEP_RAW)
                res.events += r.events
                res.took_effect = res.took_effect and r.took_effect
                res.livelock = res.livelock or r.livelock
                if len(res.faults) < 64:
                    res.faults.extend(r.faults[:64 - len(res.faults)])
                if i < LOOP_KEEP_RAW:
                    res.requests.extend(r.requests)
                    res.responses.extend(r.responses)
        res.paused = step.vcpu in self.xen.paused_vcpus()
        return res

    def _run_reload(self, step: Step) -> StepResult:
        """The enforcer replaces its plan (`took_effect`: the new plan took; a failed one keeps the old)."""
        if self.reloader is None:
            raise ValueError("a reload step needs an enforcer in this process (policyc test, run --guest sim:)")
        took = self.reloader(step, self._top)
        return StepResult(step.index, "reload", step.vcpu, took, 0, [], [], [], False, False,
                          note=f"reload {step.source}: " + ("the new plan enforces" if took else
                                                           "failed, the old plan still enforces"),
                          line=step.line)

    def _run_parallel(self, step: Step, record: bool) -> StepResult:
        """Each vCPU starts its operation before any event is answered, as vCPUs run at once: the
        events meet on the ring and the responder gets them in batches. A reload among them runs
        once every operation has started: their events are in flight across the switch."""
        ops = []
        for inner in step.body:
            if inner.op != "reload":
                op = self._make_op(inner, record=record)
                ops.append((inner, self.xen.execute(inner.vcpu, op)))
        reloads = [self._run_reload(inner) for inner in step.body if inner.op == "reload"]
        for inner, op in ops:
            self._drive(inner.vcpu, op)
        res = StepResult(step.index, "parallel", step.vcpu, True, 0, [], [], [], False, False, line=step.line)
        if reloads:
            res.note = reloads[0].note
        for inner, op in ops:
            r = self._result(inner, op)
            res.events += r.events
            res.took_effect = res.took_effect and r.took_effect
            res.livelock = res.livelock or r.livelock
            res.faults.extend(r.faults)
            res.requests.extend(r.requests)
            res.responses.extend(r.responses)
            res.paused = res.paused or r.paused
        return res

    def _run_inner(self, step: Step, record: bool) -> StepResult:
        if step.op == "loop":
            return self._run_loop(step)
        if step.op == "parallel":
            return self._run_parallel(step, record)
        if step.op == "reload":
            return self._run_reload(step)
        return self._run_single(step, record)[0]

    def _run_single(self, step: Step, record: bool) -> tuple[StepResult, Op]:
        pre = self._make_executable(step, record) if step.op == "exec" else None
        op = self._make_op(step, record=record)
        self._drive(step.vcpu, self.xen.execute(step.vcpu, op))
        res = self._result(step, op)
        if pre is not None:
            res.events += pre.events
            res.requests[:0] = pre.requests
            res.responses[:0] = pre.responses
            res.note = "; ".join(n for n in (pre.note, res.note) if n)
        return res, op

    def _make_executable(self, step: Step, record: bool) -> Op | None:
        """``exec`` with ``via: auto`` (the default) at a page the guest maps non-executable: the
        attacker first clears NX in the page's leaf entry, with a store through the direct map as
        set_memory_x does (a watched page-table frame traps it), then jumps there. ``via: va``
        fetches as the tables are (the guest's own #PF)."""
        if step.args.get("via", "auto") == "va":
            return None
        g = self.xen.guest
        if g.direct_map_base is None or not self.xen.capabilities().arch.startswith("x86_64"):
            return None
        v = self.xen.vcpu(step.vcpu)
        va = step.exprs["va"](_Env(self, step.vcpu))
        try:
            w = g.walk(v.cr3, va)
        except TranslationFault:
            return None
        if w.executable:
            return None
        entry = g.memory.read_u64(w.pte_address)
        rip = step.exprs["rip"](_Env(self, step.vcpu)) if "rip" in step.exprs else None
        op = Op("write", step.vcpu, va=g.direct_map_base + w.pte_address, size=8, value=entry & ~(1 << 63),
                rip=rip, record=record)
        op.note = f"NX cleared first in the entry mapping {va:#x} (a guest store to {w.pte_address:#x})"
        self._drive(step.vcpu, self.xen.execute(step.vcpu, op))
        return op

    def _make_op(self, step: Step, record: bool) -> Op:
        env = _Env(self, step.vcpu)
        e = step.exprs
        val = lambda key, default=None: e[key](env) if key in e else default  # noqa: E731
        v = self.xen.vcpu(step.vcpu)
        if "cr3" in e:
            v.cr3 = val("cr3")
        for gpr in ("rax", "rbx", "rcx", "rdx"):       # a guest_request's arguments
            if gpr in e:
                v.gpr[gpr] = val(gpr)
        kw: dict[str, Any] = {"rip": val("rip"), "insn_len": val("insn_length"), "record": record}
        op = step.op
        if op in ("read", "write", "rmw"):
            kw.update(va=val("va"), size=val("size", 8), value=val("value", 1 if op == "rmw" else 0))
            if op != "read":
                kw["va"], kw["note"] = self._route_write(step, kw["va"], kw["size"])
        elif op == "exec":
            kw.update(va=val("va"))
        elif op == "int3":
            if "va" in e:
                kw["rip"] = val("va")
        elif op == "write_cr":
            kw.update(reg=step.cr, value=val("value"))
        elif op == "wrmsr":
            kw.update(msr=step.msr, value=val("value"))
        elif op in ("lidt", "lgdt"):
            kw.update(base=val("base"), limit=val("limit", 0xFFF if op == "lidt" else 0x7F))
        elif op in ("lldt", "ltr"):
            kw.update(base=val("base"))           # the selector loaded
        elif op == "cpuid":
            kw.update(leaf=val("leaf", 0), subleaf=val("subleaf", 0))
        elif op == "remap":
            kw.update(va=val("va"), to_pa=val("to_pa"))
        note = kw.pop("note", "")
        made = Op(op, step.vcpu, **kw)
        made.note = note
        return made

    def _route_write(self, step: Step, va: int, size: int) -> tuple[int, str]:
        """Where a kernel-mode store to ``va`` goes. A scenario's ``write`` is what an attacker in the
        guest's ring 0 makes happen: ``via: auto`` (the default) stores through ``va`` when the
        guest's own page tables allow it, else, as rootkits do since Linux pinned CR0.WP
        (shared/research/real-kernels-and-attacks.md), through the writable direct-map alias of the
        same frames. Either way the store reaches the same guest frames, so EPT sees the same
        write. ``via: va`` always stores through ``va`` (a read-only mapping with CR0.WP set is the
        guest's own #PF, no event); ``via: alias`` always takes the alias."""
        route = step.args.get("via", "auto")
        g = self.xen.guest
        if route == "va" or g.direct_map_base is None or not self.xen.capabilities().arch.startswith("x86_64"):
            return va, ""
        v = self.xen.vcpu(step.vcpu)
        wp = bool(v.cr0 & (1 << 16))
        try:
            first = g.walk(v.cr3, va)
            last = g.walk(v.cr3, va + max(size, 1) - 1)
        except TranslationFault:
            return va, ""          # unmapped: the guest's own fault, whatever the route
        writable = first.writable and last.writable
        if route == "auto" and (writable or not wp):
            return va, ""
        if last.pa - first.pa != max(size, 1) - 1:
            return va, ""          # the alias of a store split over two frames is not one store
        alias = g.direct_map_base + first.pa
        why = "" if route == "alias" else ": the guest maps it read-only and CR0.WP is set"
        return alias, f"stored through the direct-map alias {alias:#x} of {va:#x}{why}"

    def _drive(self, vcpu: int, op: Op) -> None:
        """Hand control to the responder while the step cannot finish on its own."""
        xen = self.xen
        responder = self.responder
        while True:
            pending = xen.unconsumed_requests()
            if op.done and not (pending and xen.is_paused(vcpu)):
                break
            if responder is None or pending == 0:
                break
            before = (xen.responses_consumed, pending)
            responder(xen)
            if (xen.responses_consumed, xen.unconsumed_requests()) == before:
                break

    def settle(self) -> None:
        """Let the responder answer whatever is still on the ring (async events)."""
        xen = self.xen
        if self.responder is None:
            return
        for _ in range(1024):
            pending = xen.unconsumed_requests()
            if not pending:
                break
            before = (xen.responses_consumed, pending)
            self.responder(xen)
            if (xen.responses_consumed, xen.unconsumed_requests()) == before:
                break

    def _result(self, step: Step, op: Op) -> StepResult:
        paused = self.xen.is_paused(step.vcpu)
        note = op.note
        if not op.started:
            note = note or "the vCPU is paused: the instruction never ran"
        return StepResult(step.index, step.op, step.vcpu, op.took_effect and op.done, op.events,
                          op.requests, op.responses, list(op.faults), op.livelock, paused,
                          op.result, note, 1, step.line)


def _walk(steps: list[Step]) -> Iterator[Step]:
    for s in steps:
        yield s
        yield from _walk(s.body)


def run_scenario(scenario: Scenario | str | Path, responder: Responder | None = None,
                 **xen_options: Any) -> ScenarioRunner:
    """Load (if needed), build and run a scenario; the runner holds the results."""
    if not isinstance(scenario, Scenario):
        scenario = load_scenario(scenario)
    runner = ScenarioRunner(scenario, build_scenario(scenario, **xen_options), responder)
    runner.run()
    return runner
