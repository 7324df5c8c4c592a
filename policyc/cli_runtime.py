"""The `policyc` commands that touch a guest: run, test, replay, recover.

Guests are named by a scheme:

* ``sim:SCENARIO``: the built-in simulator, in this process: the scenario's
  guest is built, the policy enforced while the scenario's steps run, then
  torn down. SCENARIO is a scenario file, or the name of one in
  examples/scenarios/.
* ``simhost:SOCKET``: a simulated guest served by another process
  (``python -m policyc.runtime.sim.host``), which outlives the enforcer: for
  `recover`, and for watching `run` on a guest that keeps running.
* ``xen:NAME|DOMID``: a Xen domain (the libxenctrl backend).

Exit codes: 0 clean, 1 a test failed or enforcement went wrong (teardown
errors), 2 usage errors and inputs that cannot be used (a policy that does
not compile, a guest the plan cannot be bound to: nothing is installed).
"""

from __future__ import annotations

import argparse
import json
import os
import stat
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from .cli_bundle import add_bundle_run_arguments
from .cli_outputs import RunOutputs, add_output_arguments
from .cli_shared import is_scenario_file
from .diagnostics import Diagnostics
from .plan_source import Compiled, PlanSourceError, load_plan_source

__all__ = ["add_runtime_commands", "host_refusal"]

EXIT_OK, EXIT_PROBLEMS, EXIT_USAGE = 0, 1, 2
SCENARIO_SUFFIXES = (".yaml", ".yml")
RUN_TURN_S = 0.25            # `policyc run`: the longest the answering loop stays in one native call
BUNDLED_SCENARIOS = Path("examples") / "scenarios"


def add_runtime_commands(sub: Any) -> None:
    run = sub.add_parser("run", help="enforce a policy on a guest: bind, install, answer every event, tear down",
                         description="Enforce a policy on a guest. With --guest sim:SCENARIO the scenario's "
                                     "simulated guest runs its steps under the policy and each step's outcome "
                                     "is shown; the guest is torn down to exactly its prior state.")
    run.add_argument("policy", metavar="POLICY", nargs="?",
                     help="policy file, or a compiled trap plan (.json, from `policyc compile`: what CI "
                          "reviewed runs as it is; its symbol files are looked for beside it or in "
                          "--symbols, checked by their SHA-256) (default with sim: the scenario's own policy)")
    run.add_argument("--guest", required=True, metavar="GUEST",
                     help="sim:SCENARIO, simhost:SOCKET or xen:NAME|DOMID")
    run.add_argument("--target", metavar="ARCH", help="override the policy's target (x86_64, x86_64-nomtf, x86_64-svm, arm64)")
    run.add_argument("--audit", action="store_true", help="answer every event with allow; log what would be denied")
    run.add_argument("--symbols", metavar="DIR", help="where a plan's symbol files are (default: beside the plan)")
    run.add_argument("--slide", type=_address, metavar="ADDRESS", help="the slide of the plan's relocatable "
                     "addresses, given instead of found from the guest (xen: and simhost: guests; e.g. 0 for a "
                     "guest without KASLR and without the symbols to find it with)")
    add_bundle_run_arguments(run)
    run.add_argument("--log", metavar="FILE", help="decision log, JSON Lines ('-' for stdout)")
    run.add_argument("--alerts", metavar="FILE", help="alert stream, JSON Lines ('-' for stderr)")
    run.add_argument("--record", metavar="TRACE", help="record the request stream for `policyc replay`")
    run.add_argument("--state-dir", metavar="DIR", help="where install keeps its journal (for `recover`)")
    run.add_argument("--on-log-failure", choices=("fail-closed", "allow-and-count", "stop"), default="fail-closed",
                     help="when --log or --alerts cannot be written (disk full, EIO, a closed pipe): "
                          "fail-closed (default) keeps deciding by the policy, denies included; allow-and-count "
                          "answers allow from then on; stop tears down and exits. Every request is answered "
                          "and the decisions not recorded are counted, in each mode; the run exits 1")
    run.add_argument("--budget", type=float, metavar="EVENTS", help="a global budget of events per second "
                     "decided in full, to keep the ring from filling in a storm; past it events are answered "
                     "as --over-budget says and counted (default: no budget)")
    run.add_argument("--over-budget", choices=("then", "allow"), default="then",
                     help="events past --budget: 'then' (default, for security) runs each matching rule's "
                          "`then` as if past its own rate limit, a rule without one keeps its verdict and "
                          "drops its messages; 'allow' answers allow (recorded as would-deny)")
    run.add_argument("--control-socket", metavar="PATH", help="listen on this Unix socket (0600) for "
                     "`policyc reload --socket PATH`; SIGHUP (`policyc reload --pid`) reloads without it "
                     "(simhost: and xen: guests)")
    run.add_argument("-v", "--verbose", action="store_true", help="show every decision under its step")
    add_output_arguments(run)
    run.set_defaults(run=_cmd_run)

    rl = sub.add_parser("reload", help="make a running `policyc run` enforce a new plan, with no gap",
                        description="Ask a running `policyc run` (simhost: or xen: guest) to reload: from FILE "
                                    "(a policy or a compiled plan), else from the file it was started with, "
                                    "edited in place. The new plan is compiled, bound and built beside the "
                                    "running one, then switched to; if anything fails the running plan keeps "
                                    "enforcing. Exit 0 when the new plan enforces (or was the running one), 1 "
                                    "when the reload failed and the old plan still enforces, 2 when the run "
                                    "could not be asked.")
    target = rl.add_mutually_exclusive_group(required=True)
    target.add_argument("--pid", type=int, metavar="PID", help="the run's process id (SIGHUP)")
    target.add_argument("--socket", metavar="PATH", help="the run's --control-socket")
    rl.add_argument("file", metavar="FILE", nargs="?", help="the policy or compiled plan to enforce now")
    rl.add_argument("--state-dir", metavar="DIR", help="the run's --state-dir (with --pid)")
    rl.add_argument("--timeout", type=float, default=60.0, metavar="SECONDS", help="how long to wait (default 60)")
    rl.set_defaults(run=_cmd_reload)

    test = sub.add_parser("test", help="run scenario files with expect: against their policies (CI)",
                          description="Run scenario files (YAML with scenario:, steps:, expect:) on the simulator "
                                      "under their policy and check every expectation. Directories are searched "
                                      "for scenario files. Exit 1 when an expectation fails.")
    test.add_argument("paths", nargs="*", metavar="PATH",
                      help=f"scenario files or directories (default: {BUNDLED_SCENARIOS} if present, else .)")
    test.add_argument("--policy", metavar="POLICY", help="test this policy instead of each scenario's own")
    test.add_argument("--format", choices=("text", "json"), default="text")
    test.add_argument("-v", "--verbose", action="store_true", help="show the decision trace of every step")
    test.add_argument("--coverage", action="store_true",
                      help="report which rules fired, conditions true/false and region pages touched (with "
                           "--format json: the report alone, shaped like OPA's)")
    test.add_argument("--fail-under", type=float, metavar="PERCENT",
                      help="with --coverage: exit 1 when fewer than PERCENT of the rules fired")
    test.set_defaults(run=_cmd_test)

    rep = sub.add_parser("replay", help="re-decide a recorded request stream with a policy",
                         description="Re-decide every request of a trace (`policyc run --record`) with a policy: "
                                     "for forensics, and with --baseline to see which decisions a policy change "
                                     "alters (exit 1 with --exit-code when any does).")
    rep.add_argument("trace", metavar="TRACE")
    rep.add_argument("--policy", required=True, metavar="POLICY")
    rep.add_argument("--baseline", metavar="POLICY", help="compare with the decisions of this policy")
    rep.add_argument("--target", metavar="ARCH", help="override the policies' target")
    rep.add_argument("--log", metavar="FILE", help="write the replayed decision log here ('-' for stdout)")
    rep.add_argument("--exit-code", action="store_true", help="exit 1 when the baseline's decisions differ")
    rep.set_defaults(run=_cmd_replay)

    rec = sub.add_parser("recover", help="clean up after an enforcer that was killed outright",
                         description="Restore a guest from the journal a killed enforcer left: answer or release "
                                     "paused vCPUs, remove traps, views, breakpoints and monitors, unpause.")
    rec.add_argument("--guest", required=True, metavar="GUEST", help="simhost:SOCKET or xen:NAME|DOMID")
    rec.add_argument("--state-dir", metavar="DIR", help="where the enforcer kept its journal")
    rec.set_defaults(run=_cmd_recover)

    unit = sub.add_parser("service-unit", help="print the systemd unit policyc@.service (one instance per guest)",
                          description="Print the systemd template unit that runs `policyc run` for one Xen guest "
                                      "(Type=notify: ready once protection is in place, watchdog pings from the "
                                      "answering loop). Install it with: policyc service-unit > "
                                      "/etc/systemd/system/policyc@.service")
    unit.set_defaults(run=_cmd_service_unit)


def host_refusal(plan: dict, backend: Any, guest: str, policy: str) -> str | None:
    """Why `plan` (compiled from `policy`) must not be installed on `backend`'s host `guest`, in one
    line naming what to do, or None when it may: another architecture, no mem_access for a plan that
    restricts memory (with the host's reason, which install's own refusal lacks), or VT-x without the
    monitor trap flag for a plan that single-steps."""
    from .targets import runs_on

    caps = backend.capabilities()
    planned = plan["target"]["arch"]
    if not runs_on(planned, caps.arch):
        return (f"{policy} is compiled for {planned}, which does not run on {guest} ({caps.arch}); "
                f"compile it for the host with --target {caps.arch}")
    views = [v for v in plan.get("views", ()) if v.get("ranges")]
    if views and not caps.mem_access:
        why = (getattr(backend, "capability_notes", None) or {}).get("mem_access")
        return (f"the plan restricts memory access ({sum(len(v['ranges']) for v in views)} range(s)); "
                f"{guest} ({caps.arch}) lacks the capability mem_access" + (f": {why}" if why else ""))
    if caps.arch == "x86_64" and not caps.singlestep and "singlestep" in (plan.get("monitors") or {}):
        return (f"{guest} has VT-x without single-stepping (no monitor trap flag), which this {planned} "
                "plan needs to step over allowed accesses and breakpoints: use --target x86_64-nomtf")
    return None


# --------------------------------------------------------------------------- shared

class _Usage(Exception):
    """A usage problem: one line, exit 2."""


def _compile(policy: str, target: str | None, *, audit: bool = False, command: str,
             warnings: bool = True, symbols_dir: str | None = None) -> Compiled:
    """`load_plan_source` for a command: its diagnostics shown, a failure a usage error (exit 2)."""
    from .cli_shared import emit_diagnostics
    from .diagnostics import Severity

    try:
        compiled = load_plan_source(policy, target, audit=audit, symbols_dir=symbols_dir)
    except PlanSourceError as exc:
        emit_diagnostics([d for d in exc.diagnostics if warnings or d.severity is Severity.ERROR], "text")
        see = " (see above)" if exc.diagnostics else ""
        raise _Usage(f"{exc}{see}: nothing was installed" if exc.unusable else str(exc)) from None
    emit_diagnostics([d for d in compiled.diagnostics if warnings or d.severity is Severity.ERROR], "text")
    return compiled


def _use_bundle(args: argparse.Namespace, scheme: str) -> None:
    """`run --bundle`: the verified bundle's plan and symbols stand in for POLICY and --symbols; a URL
    on a guest that keeps running is polled (`args.bundle_polled`, started once protection is in place)."""
    from .bundle import BundleError, is_url
    from .cli_bundle import resolve_bundle

    if args.policy is not None:
        raise _Usage("give a POLICY or --bundle, not both")
    if not args.trust:
        raise _Usage("--bundle needs --trust KEYFILE (the public key the bundle must be signed with)")
    polled = is_url(args.bundle) and scheme != "sim" and args.bundle_poll > 0
    try:
        resolved = resolve_bundle(args.bundle, args.trust, args.bundle_cache, last_good_first=polled)
    except BundleError as exc:
        raise _Usage(f"--bundle {args.bundle}: {exc}: nothing was installed") from None
    args.policy, args.symbols = resolved.plan, resolved.symbols
    args.bundle_polled = resolved if polled else None
    print(f"policyc run: {resolved.how}", file=sys.stderr)


def _bundle_poller(args: argparse.Namespace, outputs: Any) -> Any:
    """The poller of a --bundle URL (runtime/bundle_poll.py), started; None when the run does not poll."""
    resolved = getattr(args, "bundle_polled", None)
    if resolved is None:
        return None
    from .runtime.bundle_poll import BundlePoller

    def report(bundle: Any, result: Any) -> None:
        print(f"policyc run: bundle revision {bundle.revision}: {result.describe()}", file=sys.stderr, flush=True)

    poller = BundlePoller(args.bundle, resolved.trusted, resolved.store, resolved.bundle, every=args.bundle_poll,
                          etag=resolved.etag, target=args.target, audit=args.audit,
                          first_now=not resolved.fetched, report=report)
    outputs.watch_bundle(poller)
    poller.start()
    return poller


def _address(text: str) -> int:
    """A 64-bit address, decimal or 0x-hex (argparse turns the ValueError into a usage error)."""
    value = int(text, 0)
    if not 0 <= value < 1 << 64:
        raise ValueError(text)
    return value


_address.__name__ = "address"          # argparse names the type in its error: "invalid address value"


def _guest(spec: str) -> tuple[str, str]:
    scheme, sep, rest = spec.partition(":")
    if not sep or not rest or scheme not in ("sim", "simhost", "xen"):
        raise _Usage(f"--guest {spec}: expected sim:SCENARIO, simhost:SOCKET or xen:NAME|DOMID")
    return scheme, rest


def _open_xen(spec: str, *, ring: bool) -> Any:
    """Attach to xen:NAME|DOMID; every way it can fail is one line (exit 2), never a traceback."""
    from .runtime.backend import BackendError
    from .runtime.xen_backend import XenBackend
    from .runtime.xen_libs import XenUnavailable

    try:
        return XenBackend.open(spec, ring=ring)
    except XenUnavailable as exc:
        raise _Usage(f"--guest xen:{spec}: {exc.message}") from None
    except BackendError as exc:
        raise _Usage(f"--guest xen:{spec}: cannot attach: {exc}") from None


def _scenario_path(name: str) -> Path:
    p = Path(name)
    if p.is_file():
        return p
    for cand in (BUNDLED_SCENARIOS / name, BUNDLED_SCENARIOS / f"{name}.yaml"):
        if cand.is_file():
            return cand
    have = sorted(f.stem for f in BUNDLED_SCENARIOS.glob("*.yaml")) if BUNDLED_SCENARIOS.is_dir() else []
    hint = f" (bundled: {', '.join(have)})" if have else ""
    raise _Usage(f"no scenario '{name}'{hint}")


def _open_out(target: str | None, default_stream: Any, role: str = "the decision log") -> Any:
    """An output stream that fails whole, names itself in its error and never leaves a torn record
    (runtime/output_file.py); '-' is `default_stream`."""
    from .runtime.output_file import OutputFile

    if target is None:
        return None
    if target == "-":
        return default_stream
    try:
        return OutputFile(target, role)
    except OSError as exc:
        raise _Usage(f"cannot open {role} '{target}': {exc.strerror}") from None


def _recorder(path: str | None, plan: dict, guest: str) -> Any:
    from .runtime.trace import TraceRecorder

    if path is None:
        return None
    try:
        return TraceRecorder(path, plan=plan, guest=guest)
    except OSError as exc:
        raise _Usage(f"cannot write the trace '{path}': {exc.strerror}") from None


def _distinct_outputs(args: argparse.Namespace, inputs: Sequence[str | None]) -> None:
    """Refuse outputs that are one file, or that are an input: `--record` truncates its file, and a
    decision log appended to the policy (or to the trace being replayed) destroys it."""
    outputs = [(flag, getattr(args, attr, None)) for flag, attr in
               (("--log", "log"), ("--alerts", "alerts"), ("--record", "record"))]
    outputs = [(flag, path) for flag, path in outputs if path not in (None, "-")]
    seen: list[tuple[str, str]] = []
    for flag, path in outputs:
        for other_flag, other in seen:
            if _same_regular_file(path, other):
                raise _Usage(f"{flag} and {other_flag} name the same file '{path}': give each its own")
        for given in inputs:
            if given is not None and _same_regular_file(path, given):
                raise _Usage(f"{flag} '{path}' is the input file '{given}': it would be overwritten")
        seen.append((flag, path))


def _same_regular_file(a: str, b: str) -> bool:
    """Whether two paths are one regular file (or would be: a path not created yet, resolved).
    Devices and FIFOs may be shared (two streams to /dev/stderr)."""
    try:
        sa, sb = os.stat(a), os.stat(b)
    except OSError:
        return os.path.realpath(a) == os.path.realpath(b)
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino) and stat.S_ISREG(sa.st_mode)


def _output_failures(log: Any, recorder: Any, enforcer: Any) -> list[str]:
    """What could not be written during the run, one line each (empty when everything was)."""
    out = []
    unlogged = getattr(enforcer, "unlogged", 0)
    if unlogged:
        out.append(f"{unlogged} decision(s) answered but not recorded: "
                   f"{getattr(enforcer, 'log_error', None) or 'the log could not be written'}")
    if recorder is not None and getattr(recorder, "error", None) is not None:
        out.append(f"trace incomplete: {recorder.error} (it ends at its last whole record)")
    return out


def _print_reloads(enforcer: Any, out: Any) -> None:
    """The run summary's reload lines: each reload tried, and how many took."""
    from .runtime.reload import reload_results_summary

    if not enforcer.reloads:
        return
    for r in enforcer.reloads:
        print("  " + r.describe(), file=out)
    print(reload_results_summary(enforcer.reloads), file=out)


def _budget(per_second: float, over_budget: str, clock: Any) -> Any:
    from .runtime.budget import Budget

    return Budget(per_second, clock, over_budget=over_budget)


def _print_overload(enforcer: Any, out: Any) -> None:
    """The run summary's overload lines: the global budget, and how often the ring was full."""
    c = enforcer.counters()
    if enforcer.budget is not None:
        print(enforcer.budget.describe(), file=out)
    stalls = getattr(enforcer.backend, "ring_full_stalls", None)
    print(f"ring_full: {c['ring_full_seen']} ring read(s) found all {enforcer.ring_slots} slots taken"
          + (f"; {stalls} vCPU stall(s) waiting for a slot" if isinstance(stalls, int) else ""), file=out)
    if c["events_lost"]:
        print("events lost (no policy decided them): " + ", ".join(
            f"{n} {_LOST_WORDS.get(reason, reason)}" for reason, n in sorted(enforcer.events_lost.items())), file=out)


_LOST_WORDS = {"teardown": "request(s) after the last batch, released undecided at teardown"}


def _usage_guard(fn: Any) -> Any:
    def run(args: argparse.Namespace) -> int:
        try:
            return fn(args)
        except _Usage as exc:
            print(f"policyc {args.command}: {exc}", file=sys.stderr)
            return EXIT_USAGE
    return run


def _step_label(step: Any) -> str:
    a = {k: hex(v) if isinstance(v, int) and not isinstance(v, bool) and k != "vcpu" else v
         for k, v in step.args.items()}
    op = step.op
    if op in ("read", "write", "rmw", "exec"):
        detail = str(a.get("va"))
        if op != "exec" and "value" in a:
            detail += f" = {a['value']}"
    elif op == "wrmsr":
        detail = f"{a.get('msr')} = {a.get('value')}"
    elif op == "write_cr":
        detail = f"{a.get('cr')} = {a.get('value')}"
    elif op in ("lidt", "lgdt"):
        detail = str(a.get("base"))
    elif op == "remap":
        detail = f"{a.get('va')} -> {a.get('to_pa')}"
    elif op == "loop":
        detail = f"x{step.args.get('count', step.args.get('times'))}"
    else:
        detail = ""
    return f"{op} {detail}".strip()


# --------------------------------------------------------------------------- run

@_usage_guard
def _cmd_run(args: argparse.Namespace) -> int:
    scheme, where = _guest(args.guest)
    if args.budget is not None and not args.budget > 0:
        raise _Usage(f"--budget {args.budget:g}: a positive number of events per second")
    if args.slide is not None and scheme == "sim":
        raise _Usage("--slide: a simulated guest's slide is its scenario's")
    if not args.bundle_poll >= 0:
        raise _Usage(f"--bundle-poll {args.bundle_poll:g}: a number of seconds (0: do not poll)")
    if args.bundle is not None:
        _use_bundle(args, scheme)
    args.outputs = RunOutputs(args, scheme, _Usage, _open_out)
    try:
        if scheme == "sim":
            return _run_sim(args, _scenario_path(where))
        if scheme == "xen":
            return _run_xen(args, where)
        return _run_simhost(args, where)
    finally:
        args.outputs.close()


def _run_sim(args: argparse.Namespace, scenario_path: Path) -> int:
    from .runtime.enforce import EnforcerError
    from .runtime.policy_test import describe_decision, run_on_simulator, teardown_differences
    from .runtime.sim.scenario import ScenarioError, load_scenario

    try:
        scenario = load_scenario(scenario_path)
    except ScenarioError as exc:
        raise _Usage(str(exc)) from None
    policy = args.policy or scenario.policy
    if policy is None:
        raise _Usage(f"{scenario_path} names no policy: give one")
    _distinct_outputs(args, [policy, str(scenario_path)])
    compiled = _compile(policy, args.target or scenario.profile, audit=args.audit, command="run",
                        symbols_dir=args.symbols)
    plan = compiled.plan
    log = args.outputs.decision_log(plan, f"sim:{scenario.name}")
    recorder = _recorder(args.record, plan, f"sim:{scenario.name}")
    out = sys.stdout if args.log != "-" else sys.stderr
    mode = plan["policy"].get("mode", "enforce")
    print(f"policy {plan['policy']['name']} ({mode}, {plan['target']['arch']}) on sim:{scenario.name}, "
          f"{scenario.vcpus} vCPU(s)", file=out)

    def on_step(res: Any, decisions: list) -> None:
        step = scenario.steps[res.index]
        deciding = next((d for d in decisions if d.rule), None)
        if res.took_effect:
            outcome = "allowed"
        else:
            outcome = "DENIED" if deciding is not None and deciding.verdict == "deny" else "refused by the guest"
        if deciding is not None and deciding.would_deny:
            outcome = "allowed (would deny)"
        tail = ""
        if deciding is not None:
            msgs = [m for d in decisions for m in d.messages]
            from .runtime.decision_log import render_template
            first = next((m for m in msgs), None)
            tail = f"  {deciding.rule}"
            if first is not None:
                tail += f": {first.severity} {render_template(first.template, deciding.event)}"
        elif res.events == 0:
            tail = "  (no event)"
        elif any((d.note or "").startswith("page-table write") for d in decisions):
            tail = "  (page-table write: the binding followed it)"
        else:
            tail = f"  ({res.events} event{'s' * (res.events != 1)}, no rule)"
        if res.faults and not res.took_effect:
            tail += f"  [guest {', '.join(f.name for f in res.faults)}]"
        print(f"  step {res.index:<2} vcpu {res.vcpu}  {_step_label(step):<48} {outcome}{tail}", file=out)
        if args.verbose:
            for d in decisions:
                print("      " + describe_decision(d).replace("\n", "\n      "), file=out)
            if res.note:
                print(f"      note: {res.note}", file=out)

    def on_start(enforcer: Any) -> None:
        bound = enforcer.bound
        frames = {g for r in plan.get("regions", {}) for g, _f, _l in bound.region_frames(r)}
        how = {"lstar": "LSTAR", "idt": "the IDT", "given": "the operator"}
        found = [how[k] for k in ("lstar", "idt", "given") if k in bound.slide_evidence]
        print(f"bound: slide {bound.slide:#x} found from {' and '.join(found) or 'the guest'}; "
              f"{len(plan.get('regions', {}))} region(s) on {len(frames)} frame(s), "
              f"{len(bound.breakpoints)} breakpoint(s), {len(bound.pt_frames)} page-table frame(s) watched",
              file=out)
        if (kernel := _kernel_build_line(bound)) is not None:
            print(kernel, file=out)

    try:
        run = run_on_simulator(scenario, plan, compiled.symbols, log=log, recorder=recorder, on_start=on_start,
                               on_step=on_step, on_log_failure=args.on_log_failure,
                               budget=(args.budget, args.over_budget) if args.budget is not None else None)
    except (EnforcerError, ScenarioError) as exc:
        log.close()
        raise _Usage(str(exc)) from None
    log.close()
    diff, note = teardown_differences(run)
    enf = run.enforcer
    clean = "the domain is as it was before install" + (f", but for: {note}" if note else "")
    print(f"teardown: {clean if not diff else 'NOT CLEAN: ' + '; '.join(diff)}"
          f"; requests {enf.requests}, responses {enf.responses}, decision records {enf.records}", file=out)
    print(log.summary(), file=out)
    _print_reloads(enf, out)
    _print_overload(enf, out)
    if args.record:
        print(f"recorded {recorder.batches if recorder else 0} batch(es) to {args.record}", file=out)
    lost = _output_failures(log, recorder, enf) + args.outputs.report()
    for line in lost:
        print(f"NOT RECORDED: {line}", file=out)
    if enf.stop_requested:
        print(f"STOPPED after step {run.results[-1].index if run.results else 0} of {len(scenario.steps)} "
              f"(--on-log-failure stop): {enf.log_error}", file=out)
    return EXIT_OK if not diff and not lost and enf.requests == enf.responses else EXIT_PROBLEMS


def _run_simhost(args: argparse.Namespace, socket_path: str) -> int:
    from .runtime.sim.host import connect

    if args.policy is None:
        raise _Usage("give a policy to enforce on a simhost guest")
    try:
        host = connect(socket_path)
    except ConnectionError as exc:
        raise _Usage(str(exc)) from None

    def finished() -> bool:
        st = host.status()       # the workload ran to its end and nothing waits on the ring
        return st["started"] and not st["running"] and not host.unconsumed_requests()

    return _run_backend(args, host, f"simhost:{socket_path}", finished)


def _run_xen(args: argparse.Namespace, spec: str) -> int:
    if args.policy is None:
        raise _Usage("give a policy to enforce on a Xen guest")
    backend = _open_xen(spec, ring=True)
    try:
        # The journal is keyed by the domain's name (stable across reboots, unlike its domid), so
        # `recover --guest xen:NAME` and `xen:DOMID` find the same record.
        return _run_backend(args, backend, f"xen:{backend.name}", lambda: not backend.domain_alive())
    finally:
        backend.release()


def _kernel_build_line(bound: Any) -> str | None:
    """What binding checked of the guest kernel's build (its linux_banner), for the operator."""
    banner = bound.slide_evidence.get("linux_banner")
    if banner is None:
        return None
    how = "matches the symbol file" if banner["compared"] else "read (the symbol file records none to compare)"
    return f"guest kernel: linux_banner at {banner['address']} {how}: {banner['banner']!r}"


def _run_backend(args: argparse.Namespace, backend: Any, guest: str, finished_now: Any) -> int:
    """Compile (the policy's target, or --target), check it runs on the backend's host, enforce until
    `finished_now()` (checked once a second) or a signal, tear down. Shared by simhost: and xen:."""
    import signal as _signal

    from .runtime.decision_log import Progress
    from .runtime.enforce import Enforcer, EnforcerError
    from .runtime.service import Notifier

    _distinct_outputs(args, [args.policy])
    # The policy's own target (or --target), checked against the host: a plan is never quietly
    # recompiled for another target than the one its author chose and tested.
    t_compile = time.monotonic()
    compiled = _compile(args.policy, args.target, audit=args.audit, command="run",
                        symbols_dir=args.symbols)
    compile_seconds = time.monotonic() - t_compile
    plan = compiled.plan
    if (refusal := host_refusal(plan, backend, guest, args.policy)) is not None:
        raise _Usage(refusal)
    outputs = args.outputs
    log = outputs.decision_log(plan, guest, _identity(backend))
    recorder = _recorder(args.record, plan, guest)
    enforcer = Enforcer(plan, backend, compiled.symbols, guest=guest, log=log, recorder=recorder,
                        state_dir=args.state_dir, slide=args.slide)
    enforcer.on_log_failure = args.on_log_failure
    if args.budget is not None:
        enforcer.budget = _budget(args.budget, args.over_budget, enforcer.clock)
    # Signals arriving before the loop's own handlers are in place must not kill a half-made install
    # (a SIGHUP then is a reload asked for early: the loop does it once it runs).
    _signal.signal(_signal.SIGTERM, _signal.default_int_handler)
    control = _reload_control(args)
    try:
        enforcer.start()
    except EnforcerError as exc:
        outputs.failed(str(exc))
        control.close()
        log.close()
        raise _Usage(str(exc)) from None
    except KeyboardInterrupt:
        control.close()
        return 130
    outputs.protected(enforcer, backend, plan)
    poller = _bundle_poller(args, outputs)
    phases = {"compile": compile_seconds, **enforcer.startup_seconds}
    print(f"enforcing {plan['policy']['name']} on {guest} (pid {os.getpid()}); SIGINT or SIGTERM to stop, "
          "SIGHUP to reload", file=sys.stderr)
    if (kernel := _kernel_build_line(enforcer.bound)) is not None:
        print(kernel, file=sys.stderr)
    print("in place after " + ", ".join(f"{k} {v:.2f} s" for k, v in phases.items()) +
          f" ({sum(phases.values()):.2f} s)", file=sys.stderr, flush=True)
    notifier = Notifier()
    notifier.ready(f"enforcing {plan['policy']['name']} ({plan['content_hash'][:19]}) on {guest}")
    next_status = [time.monotonic() + 1.0]

    def finished() -> bool:
        notifier.watchdog()          # called from the answering loop: a stuck loop stops the pings
        outputs.on_turn()
        control.poll(enforcer)
        if poller is not None:
            poller.poll(enforcer)
        if time.monotonic() < next_status[0]:
            return False
        next_status[0] = time.monotonic() + 1.0      # is the guest still there: once a second
        done = bool(finished_now())
        if done:
            notifier.stopping("the guest is gone: tearing down")
            outputs.unprotected("the guest is gone")
        return done

    progress = Progress(sys.stderr) if sys.stderr.isatty() else None
    try:
        # A turn of Python every quarter second while events flow (the answering loop stays in C
        # between turns; a signal ends the wait at once). At 20 turns a second the emulated lab's
        # policyc took 0.65-0.74 ms of dom0 CPU an event against xen-access's 0.57-0.64 with fewer
        # system calls an event than it (tests/lab/README.md): the turns were what was left.
        enforcer.run(finished, wait=RUN_TURN_S, progress=progress)
    except Exception as exc:  # noqa: BLE001 - teardown already ran (run_with_teardown)
        print(f"policyc run: stopped by an error after teardown: {exc}", file=sys.stderr)
        notifier.stopping(f"stopped by an error: {exc}")
        outputs.unprotected(f"stopped by an error: {exc}")
        log.close()
        return EXIT_PROBLEMS
    finally:
        control.close()
        if poller is not None:
            poller.close()
    outputs.unprotected()
    notifier.stopping("torn down")
    notifier.close()
    log.close()
    return _backend_summary(enforcer, log, recorder, backend, outputs)


def _backend_summary(enforcer: Any, log: Any, recorder: Any, backend: Any, outputs: Any) -> int:
    """What a simhost: or xen: run prints once torn down (stderr), and its exit code."""
    errors = enforcer.installation.teardown_errors if enforcer.installation else []
    print(log.summary(), file=sys.stderr)
    _print_reloads(enforcer, sys.stderr)
    _print_overload(enforcer, sys.stderr)
    c = enforcer.counters()
    verified = enforcer.installation.verified if enforcer.installation else {"frames": 0, "bytes": 0}
    print(f"requests {c['requests']}, responses {c['responses']}, decision records {c['records']}; teardown "
          f"{'clean' if not errors else 'FAILED: ' + '; '.join(errors)} ({verified['frames']} frames read back at "
          f"their access before install, {verified['bytes']} breakpoint sites at their original bytes)",
          file=sys.stderr)
    holds = getattr(backend, "deny_holds", None)
    if holds and holds["checked"]:
        print(f"register-write denies: {holds['checked']}, {holds['held']} held until the vCPU had left its pCPU "
              f"(longest {holds['max_wait_ms']} ms), {holds['unconfirmed']} sent unconfirmed", file=sys.stderr)
    lost = _output_failures(log, recorder, enforcer) + outputs.report()
    for line in lost:
        print(f"NOT RECORDED: {line}", file=sys.stderr)
    if enforcer.stop_requested:
        print(f"STOPPED (--on-log-failure stop): {enforcer.log_error}", file=sys.stderr)
    return EXIT_OK if not errors and not lost else EXIT_PROBLEMS


def _identity(backend: Any) -> dict:
    """The guest's identity (its Xen UUID) for the records that name it; {} when the backend has none."""
    try:
        return dict(backend.domain_identity())
    except Exception:  # noqa: BLE001 - a record without the UUID beats no run
        return {}


def _reload_control(args: argparse.Namespace) -> Any:
    """SIGHUP and --control-socket for a run that has started enforcing (runtime/reload_control.py)."""
    from .runtime.state_record import default_state_dir
    from .runtime.reload_control import ReloadControl

    def report(result: Any) -> None:
        print("policyc run: " + result.describe(), file=sys.stderr, flush=True)

    state_dir = Path(args.state_dir) if args.state_dir else default_state_dir()
    try:
        control = ReloadControl(args.policy, args.target, state_dir=state_dir, symbols_dir=args.symbols,
                                audit=args.audit, socket_path=args.control_socket, report=report)
    except OSError as exc:
        print(f"policyc run: no control socket: {exc}; SIGHUP still reloads", file=sys.stderr)
        control = ReloadControl(args.policy, args.target, state_dir=state_dir, symbols_dir=args.symbols,
                                audit=args.audit, report=report)
    control.install_signal()
    return control


@_usage_guard
def _cmd_reload(args: argparse.Namespace) -> int:
    from .runtime.state_record import default_state_dir
    from .runtime.reload_control import ask_socket, request_reload

    if args.file is not None and not Path(args.file).is_file():
        raise _Usage(f"no such policy or plan file: {args.file}")
    try:
        if args.socket is not None:
            answer = ask_socket(args.socket, args.file, timeout=args.timeout)
        else:
            state_dir = Path(args.state_dir) if args.state_dir else default_state_dir()
            answer = request_reload(args.pid, args.file, state_dir, timeout=args.timeout)
    except ProcessLookupError:
        raise _Usage(f"no process {args.pid}") from None
    except (OSError, TimeoutError, ValueError) as exc:
        raise _Usage(f"cannot ask the run to reload: {exc}") from None
    result = answer.get("result")
    if result == "failed":
        print(f"reload FAILED ({answer.get('stage')}): {answer.get('error')}; the old plan "
              f"{str(answer.get('old_plan'))[:19]}… still enforces", file=sys.stderr)
        return EXIT_PROBLEMS
    if result == "unchanged":
        print(f"plan {str(answer.get('new_plan'))[:19]}… is the one running; nothing changed")
    else:
        print(f"reloaded: plan {str(answer.get('old_plan'))[:19]}… -> {str(answer.get('new_plan'))[:19]}… "
              f"in {answer.get('seconds')} s")
        for late in answer.get("released_late") or ():
            print(f"  not released yet (teardown removes it): {late}")
    return EXIT_OK


def _cmd_service_unit(args: argparse.Namespace) -> int:
    from .runtime.service import unit_text

    sys.stdout.write(unit_text())
    return EXIT_OK


# --------------------------------------------------------------------------- test

@_usage_guard
def _cmd_test(args: argparse.Namespace) -> int:
    from .runtime.decision_log import DecisionLog
    from .runtime.enforce import EnforcerError
    from .runtime.policy_test import check_expectations, describe_decision, run_on_simulator
    from .runtime.sim.scenario import ScenarioError, load_scenario

    if args.fail_under is not None and not args.coverage:
        raise _Usage("--fail-under needs --coverage")
    coverage = _new_coverage() if args.coverage else None
    paths = args.paths or ([str(BUNDLED_SCENARIOS)] if BUNDLED_SCENARIOS.is_dir() else ["."])
    files = _scenario_files(paths)
    if not files:
        raise _Usage(f"no scenario files under {', '.join(paths)}")
    reports = []
    failed = 0
    total = 0
    for path in files:
        entry: dict[str, Any] = {"scenario": str(path), "results": []}
        reports.append(entry)
        try:
            scenario = load_scenario(path)
            policy = args.policy or scenario.policy
            if policy is None:
                raise ScenarioError("names no policy (policy:), and none was given with --policy", str(path))
            entry["policy"] = policy
            compiled = _compile(policy, scenario.profile, command="test", warnings=False)
            run = run_on_simulator(scenario, compiled.plan, compiled.symbols,
                                   log=DecisionLog(None, plan_hash=compiled.plan.get("content_hash", "")))
            results = check_expectations(run)
            if coverage is not None:
                coverage.add(str(path), policy, compiled.plan, run)
        except (ScenarioError, _Usage, EnforcerError) as exc:
            entry["error"] = str(exc)
            failed += 1
            total += 1
            continue
        entry["name"] = scenario.name
        entry["target"] = compiled.plan["target"]["arch"]
        for r in results:
            total += 1
            failed += not r.passed
            item: dict[str, Any] = {"expectation": r.label, "passed": r.passed}
            if r.expectation is not None and r.expectation.line:
                item["line"] = r.expectation.line
            if r.detail:
                item["detail"] = r.detail
            if (not r.passed or args.verbose) and r.step is not None:
                res = run.results[r.step]
                item["trace"] = [describe_decision(d) for d in run.step_decisions(r.step)]
                item["step"] = {"op": _step_label(scenario.steps[r.step]), "line": res.line,
                                "verdict": res.verdict, "events": res.events, "note": res.note,
                                "faults": [f.name for f in res.faults]}
            entry["results"].append(item)
    if coverage is not None:
        _add_unrun_policies(coverage, paths)
    if args.format == "json" and coverage is not None:
        print(json.dumps({**coverage.report(), "expectations": total, "failed": failed}, indent=2))
    elif args.format == "json":
        print(json.dumps({"scenarios": reports, "expectations": total, "failed": failed}, indent=2))
    else:
        _print_test_report(reports, args.verbose)
        scen_failed = sum(1 for e in reports if "error" in e or any(not r["passed"] for r in e["results"]))
        print(f"{len(reports)} scenario(s), {total} expectation(s): "
              + ("all passed" if not failed else f"{failed} failed in {scen_failed} scenario(s)"))
        if coverage is not None:
            sys.stdout.write(coverage.render_text())
    if coverage is not None and args.fail_under is not None and coverage.percent < args.fail_under:
        print(f"policyc test: coverage {coverage.percent:.1f}% is under --fail-under {args.fail_under:g}%",
              file=sys.stderr)
        return EXIT_PROBLEMS
    return EXIT_OK if not failed else EXIT_PROBLEMS


def _new_coverage():
    from .runtime.coverage import Coverage

    return Coverage()


def _add_unrun_policies(coverage, paths: Sequence[str]) -> None:
    """Policies under the tested paths that no scenario ran: their rules are uncovered too."""
    from .check import check_policy
    from .cli_shared import policy_files, policy_roots
    from .source import display_path

    files, _skipped, _problems = policy_files([p for p in paths if Path(p).is_dir()])
    for path in policy_roots(files):
        model = check_policy(path, Diagnostics())
        if model is not None:
            coverage.add_unrun(display_path(path), [(r.name, r.span.file, r.span.line) for r in model.rules])


def _print_test_report(reports: list[dict], verbose: bool) -> None:
    for e in reports:
        if "error" in e:
            print(f"ERROR {e['scenario']}: {e['error']}")
            continue
        bad = [r for r in e["results"] if not r["passed"]]
        print(f"{'FAIL' if bad else 'ok  '}  {e['scenario']}: {e['name']} under {e['policy']} ({e['target']})")
        for r in e["results"]:
            if r["passed"] and not verbose:
                continue
            where = f" (line {r['line']})" if "line" in r else ""
            print(f"      {'ok  ' if r['passed'] else 'FAIL'}  {r['expectation']}{where}")
            if not r["passed"] and r.get("detail"):
                print(f"            {r['detail']}")
            if "step" in r and (not r["passed"] or verbose):
                s = r["step"]
                print(f"            step: {s['op']} (line {s['line']}): {s['verdict']}, {s['events']} event(s)"
                      + (f", guest {', '.join(s['faults'])}" if s["faults"] else "")
                      + (f"; {s['note']}" if s["note"] else ""))
                for t in r.get("trace", []) or ["(no decision: the step caused no event)"]:
                    print("            " + t.replace("\n", "\n            "))


def _scenario_files(paths: Sequence[str]) -> list[Path]:
    out: list[Path] = []
    for raw in paths:
        p = Path(raw)
        if p.is_file():
            out.append(p)
        elif p.is_dir():
            out += [f for f in sorted(p.rglob("*")) if f.suffix in SCENARIO_SUFFIXES and is_scenario_file(f)]
        else:
            raise _Usage(f"no such file or directory: {raw}")
    return list(dict.fromkeys(out))


# --------------------------------------------------------------------------- replay

@_usage_guard
def _cmd_replay(args: argparse.Namespace) -> int:
    from .runtime.decision_log import DecisionLog
    from .runtime.replay import ReplayError, compare, replay
    from .runtime.trace import TraceError, read_trace

    try:
        trace = read_trace(args.trace)
    except TraceError as exc:
        raise _Usage(str(exc)) from None
    target = args.target or trace.capabilities.arch
    new = _compile(args.policy, target, command="replay")
    _distinct_outputs(args, [args.trace, args.policy, args.baseline])
    log = DecisionLog(_open_out(args.log, sys.stdout), None, new.plan.get("content_hash", ""))
    out = sys.stdout if args.log != "-" else sys.stderr
    try:
        result = replay(trace, new.plan, new.symbols, log=log)
        base = None
        if args.baseline:
            old = _compile(args.baseline, target, command="replay")
            base = replay(trace, old.plan, old.symbols)
    except ReplayError as exc:
        raise _Usage(str(exc)) from None
    except OSError as exc:      # the replayed decision log cannot be written (it ends at a whole record)
        raise _Usage(str(exc)) from None
    finally:
        log.close()
    print(f"replayed {len(result.decisions)} request(s) from {trace.path} (recorded on {trace.header.get('guest')}, "
          f"plan {str(trace.header.get('plan_hash'))[:19]}…) with {new.plan['policy']['name']}"
          + (f"; {result.rebinds} rebind(s) followed" if result.rebinds else ""), file=out)
    for note in result.notes:
        print(f"  note: {note}", file=out)
    print(log.summary(), file=out)
    if base is None:
        return EXIT_OK
    changes = compare(base, result)
    print(f"against {args.baseline}: {len(changes)} decision(s) differ", file=out)
    for c in changes[:200]:
        print("  " + c.describe(), file=out)
    if len(changes) > 200:
        print(f"  ... and {len(changes) - 200} more", file=out)
    return EXIT_PROBLEMS if args.exit_code and changes else EXIT_OK


# --------------------------------------------------------------------------- recover

@_usage_guard
def _cmd_recover(args: argparse.Namespace) -> int:
    scheme, where = _guest(args.guest)
    if scheme == "sim":
        raise _Usage("a sim: guest lives inside the enforcer's process and ends with it: nothing to recover")
    if scheme == "xen":
        # No ring at attach: a dead enforcer's ring still holds the domain (enable would fail with
        # EBUSY); recover disables it and enables a fresh one itself (XEN-SEMANTICS §7).
        backend = _open_xen(where, ring=False)
        try:
            return _recover_report(backend, f"xen:{backend.name}", args.state_dir)
        finally:
            backend.release()
    from .runtime.sim.host import connect
    try:
        backend = connect(where)
    except ConnectionError as exc:
        raise _Usage(str(exc)) from None
    return _recover_report(backend, args.guest, args.state_dir)


def _recover_report(backend: Any, guest: str, state_dir: str | None) -> int:
    from .runtime.recover import recover_guest
    from .runtime.state_record import state_path_for

    path = state_path_for(guest, state_dir)
    report = recover_guest(backend, guest, state_dir)
    if not report.found:
        print(f"nothing to recover for {guest}: no journal at {path}")
        return EXIT_OK
    if report.not_this_domain:
        print(f"policyc recover: not applying {path} to {guest}: {report.not_this_domain}. Nothing was "
              "changed; the journal stays (remove it once its own domain is gone)", file=sys.stderr)
        return EXIT_PROBLEMS
    print(f"recovered {guest} from {path}:")
    if report.answered:
        print(f"  answered {report.answered} request(s) left on the ring")
    if report.ring_reenabled:
        print(f"  reset the monitor ring and released vCPU(s) {report.unpaused_vcpus}")
    for item in report.undone:
        print(f"  undid {item}")
    for item in report.cannot:
        print(f"  cannot: {item}")
    for err in report.errors:
        print(f"  ERROR: {err}")
    print("the guest is as it was before install" if report.clean else
          f"recovery is incomplete; the journal stays at {path}")
    return EXIT_OK if report.clean else EXIT_PROBLEMS
