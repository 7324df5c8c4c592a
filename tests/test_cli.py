"""The `policyc` command line: exit codes, output formats, what a user sees.

Exit codes (policyc/cli.py): 0 clean (warnings allowed), 1 problems found,
2 usage errors. Runs go through `policyc.cli.main` in-process; one test runs
the installed command to prove the process exit status is main()'s.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from policyc.cli import main

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "examples" / "policies"
EXAMPLE = EXAMPLES / "linux-kernel-integrity.vmi"
SYSTEM_MAP = EXAMPLES / "linux-6.1.System.map"

SUBCOMMANDS = ("check", "fmt", "schema", "compile", "explain", "diff")

GOOD = '''policy "good" {
    target xen >= 4.17 on x86_64
    symbols "linux-6.1.System.map"

    region syscalls = symbol sys_call_table size 8 * 451

    rule protect_syscalls: on write to syscalls {
        deny
        alert critical "sys_call_table write at {gla:#x} from {rip:#x}"
    }
}
'''

# Line 8, column 40: 'sycalls' (7 characters) is no region.
BROKEN = '''policy "broken" {
    target xen >= 4.17 on x86_64
    symbols "linux-6.1.System.map"

    region syscalls = symbol sys_call_table size 8 * 451

    # a typo in the region name
    rule protect_syscalls: on write to sycalls {
        deny
    }
}
'''

# ia32_sys_call_table is gone from 6.1.85+ kernels and absent from the map: a warning (PC303), no error.
WARNS = '''policy "warns" {
    target xen >= 4.17 on x86_64
    symbols "linux-6.1.System.map"

    region syscalls = symbol sys_call_table size 8 * 451
    region compat_syscalls = symbol? ia32_sys_call_table size 8 * 451

    rule protect_syscalls: on write to syscalls, compat_syscalls {
        deny
    }
}
'''


def run(capsys, *args: str) -> tuple[int, str, str]:
    try:
        rc = main(list(args))
    except BaseException as exc:  # noqa: BLE001 - main() must return, never raise
        out, err = capsys.readouterr()
        pytest.fail(f"policyc {' '.join(args)} raised {exc!r}\nstdout:\n{out}\nstderr:\n{err}")
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    return rc, out, err


@pytest.fixture
def work(tmp_path: Path) -> Path:
    shutil.copy(SYSTEM_MAP, tmp_path)
    (tmp_path / "good.vmi").write_text(GOOD, encoding="utf-8")
    (tmp_path / "broken.vmi").write_text(BROKEN, encoding="utf-8")
    (tmp_path / "warns.vmi").write_text(WARNS, encoding="utf-8")
    return tmp_path


# ---------------------------------------------------------------- exit codes

def test_clean_example_exits_0(capsys):
    rc, out, err = run(capsys, "check", str(EXAMPLE))
    assert rc == 0
    assert "checked 1 policy: 0 errors, 0 warnings" in err


def test_clean_example_json_is_an_empty_list(capsys):
    rc, out, err = run(capsys, "check", str(EXAMPLE), "--format", "json")
    assert rc == 0
    assert json.loads(out) == {"diagnostics": []}
    assert err == ""


def test_broken_policy_exits_1(capsys, work):
    rc, out, err = run(capsys, "check", str(work / "broken.vmi"))
    assert rc == 1
    assert "1 error" in err


@pytest.mark.parametrize("args", [
    ["check", "--no-such-flag", "{good}"],
    ["check", "{missing}"],
    ["check", "{good}", "{missing}"],
    ["check", "--target", "riscv64", "{good}"],
    ["check", "--target", "x86-64", "{good}"],
    ["check", "--format", "xml", "{good}"],
    ["check"],
    ["no-such-command"],
    [],
    ["compile", "--target", "riscv64", "{good}"],
], ids=["unknown-flag", "missing-file", "one-of-two-missing", "unknown-target", "target-typo", "unknown-format",
        "no-paths", "unknown-command", "no-command", "compile-unknown-target"])
def test_usage_errors_exit_2(capsys, work, args):
    args = [a.format(good=work / "good.vmi", missing=work / "nope.vmi") for a in args]
    rc, out, err = run(capsys, *args)
    assert rc == 2
    assert err.strip(), "a usage error says what is wrong"
    assert out == ""


def test_missing_file_is_named(capsys, work):
    rc, out, err = run(capsys, "check", str(work / "nope.vmi"))
    assert rc == 2
    assert "nope.vmi" in err


def test_unknown_target_lists_the_targets(capsys, work):
    rc, out, err = run(capsys, "check", "--target", "riscv64", str(work / "good.vmi"))
    assert rc == 2
    assert "riscv64" in err and "x86_64" in err and "arm64" in err


def test_target_override_is_applied(capsys, work):
    # On arm64 a control-register trigger does not exist: the override must reach the checker.
    (work / "cr0.vmi").write_text('policy "cr0" {\n    target xen >= 4.17 on x86_64\n'
                                  '    rule wp_guard: on write cr0 where cleared(cr0.WP) {\n        deny\n    }\n}\n')
    assert run(capsys, "check", str(work / "cr0.vmi"))[0] == 0
    rc, out, err = run(capsys, "check", "--target", "arm64", str(work / "cr0.vmi"), "--format", "json")
    assert rc == 1
    assert "PC418" in {d["code"] for d in json.loads(out)["diagnostics"]}


def test_the_installed_command_exits_with_mains_status(work):
    exe = shutil.which("policyc")
    cmd = [exe] if exe else [sys.executable, "-c", "import sys; from policyc.cli import main; sys.exit(main())"]
    for args, want in ((["check", str(EXAMPLE)], 0), (["check", str(work / "broken.vmi")], 1),
                       (["check", "--no-such-flag", str(EXAMPLE)], 2)):
        proc = subprocess.run(cmd + args, capture_output=True, text=True, timeout=120)
        assert proc.returncode == want, (args, proc.stderr)
        assert "Traceback" not in proc.stderr


# ---------------------------------------------------------------- formats

def test_json_format_parses_and_locates(capsys, work):
    rc, out, err = run(capsys, "check", str(work / "broken.vmi"), "--format", "json")
    assert rc == 1
    assert err == "", "json goes to stdout alone"
    diags = json.loads(out)["diagnostics"]
    assert len(diags) == 1
    d = diags[0]
    assert d["code"] == "PC300" and d["severity"] == "error"
    assert (d["line"], d["column"]) == (8, 40)
    assert Path(d["file"]).resolve() == (work / "broken.vmi").resolve()
    assert "sycalls" in d["message"]
    assert "syscalls" in d.get("hint", "")


def test_sarif_format_is_sarif_2_1_0(capsys, work):
    rc, out, err = run(capsys, "check", str(work / "broken.vmi"), str(work / "warns.vmi"), "--format", "sarif")
    assert rc == 1
    log = json.loads(out)
    assert log["version"] == "2.1.0" and "sarif" in log["$schema"]
    run0 = log["runs"][0]
    assert run0["tool"]["driver"]["name"] == "policyc"
    results = run0["results"]
    by_rule = {r["ruleId"]: r for r in results}
    assert by_rule["PC300"]["level"] == "error" and by_rule["PC303"]["level"] == "warning"
    region = by_rule["PC300"]["locations"][0]["physicalLocation"]["region"]
    assert (region["startLine"], region["startColumn"]) == (8, 40)
    rules = run0["tool"]["driver"]["rules"]
    for r in results:
        assert rules[r["ruleIndex"]]["id"] == r["ruleId"]


def test_text_shows_location_source_line_and_caret(capsys, work, monkeypatch):
    monkeypatch.chdir(work)
    rc, out, err = run(capsys, "check", "broken.vmi")
    assert rc == 1
    assert out == "", "text goes to stderr"
    lines = err.splitlines()
    assert lines[0] == "error[PC300]: unknown region 'sycalls'"
    assert "--> broken.vmi:8:40" in lines[1]
    source = next(i for i, line in enumerate(lines) if re.match(r"\s*8 \| ", line))
    prefix = re.match(r"\s*8 \| ", lines[source]).group(0)
    assert lines[source][len(prefix):] == "    rule protect_syscalls: on write to sycalls {"
    caret_line = lines[source + 1]
    assert caret_line.index("^") - len(prefix) == 40 - 1, "the caret sits under column 40"
    assert caret_line.strip().strip("|").strip() == "^" * len("sycalls")
    assert any("hint" in line and "syscalls" in line for line in lines)
    assert "checked 1 policy: 1 error, 0 warnings" in err


def test_quiet_drops_the_summary(capsys, work):
    rc, out, err = run(capsys, "check", "-q", str(work / "broken.vmi"))
    assert rc == 1
    assert "error[PC300]" in err and "checked" not in err
    rc, out, err = run(capsys, "check", "-q", str(work / "good.vmi"))
    assert (rc, err) == (0, "")


# ---------------------------------------------------------------- warnings and --strict

def test_warning_alone_exits_0_and_strict_makes_it_1(capsys, work):
    rc, out, err = run(capsys, "check", str(work / "warns.vmi"), "--format", "json")
    diags = json.loads(out)["diagnostics"]
    assert rc == 0
    assert [(d["code"], d["severity"], d["line"]) for d in diags] == [("PC303", "warning", 6)]
    assert "ia32_sys_call_table" in diags[0]["message"]
    rc, out, err = run(capsys, "check", "--strict", str(work / "warns.vmi"))
    assert rc == 1
    assert "warning[PC303]" in err
    assert run(capsys, "check", "--strict", str(work / "good.vmi"))[0] == 0


# ---------------------------------------------------------------- directories

def test_directory_of_good_policies_exits_0(capsys, tmp_path):
    shutil.copy(SYSTEM_MAP, tmp_path)
    (tmp_path / "a.vmi").write_text(GOOD, encoding="utf-8")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "linux-6.1.System.map").write_bytes(SYSTEM_MAP.read_bytes())
    (tmp_path / "sub" / "b.vmi").write_text(GOOD.replace('"good"', '"good-b"'), encoding="utf-8")
    (tmp_path / "notes.txt").write_text("not a policy", encoding="utf-8")
    rc, out, err = run(capsys, "check", str(tmp_path))
    assert rc == 0, err
    assert "checked 2 policies: 0 errors, 0 warnings" in err


def test_directory_with_one_broken_policy_exits_1_and_names_only_it(capsys, work):
    rc, out, err = run(capsys, "check", str(work), "--format", "json")
    assert rc == 1
    files = {Path(d["file"]).name for d in json.loads(out)["diagnostics"] if d["severity"] == "error"}
    assert files == {"broken.vmi"}


def test_directory_skips_include_only_files(capsys, tmp_path):
    shutil.copy(SYSTEM_MAP, tmp_path)
    (tmp_path / "common.vmi").write_text("region syscalls = symbol sys_call_table size 8 * 451\n", encoding="utf-8")
    (tmp_path / "main.vmi").write_text(
        'policy "main" {\n    target xen >= 4.17 on x86_64\n    symbols "linux-6.1.System.map"\n'
        '    include "common.vmi"\n    rule protect_syscalls: on write to syscalls {\n        deny\n    }\n}\n',
        encoding="utf-8")
    rc, out, err = run(capsys, "check", str(tmp_path))
    assert rc == 0, err
    assert "checked 1 policy" in err


def test_check_in_two_processes_reports_what_one_process_reports(capsys, tmp_path):
    shutil.copy(SYSTEM_MAP, tmp_path)
    shutil.copytree(REPO / "tests" / "broken", tmp_path / "broken")
    (tmp_path / "common.vmi").write_text("region syscalls = symbol sys_call_table size 8 * 451\n", encoding="utf-8")
    (tmp_path / "orphan.vmi").write_text("region lonely = symbol sys_call_table size 8\n", encoding="utf-8")
    for i in range(6):
        (tmp_path / f"p{i}.vmi").write_text(GOOD.replace('"good"', f'"p{i}"').replace(
            "    region syscalls", '    include "common.vmi"\n    region other' if i % 2 else "    region syscalls"),
            encoding="utf-8")
    runs = {}
    for jobs in ("1", "2", "0"):
        for fmt in ("json", "text"):
            runs[jobs, fmt] = run(capsys, "check", str(tmp_path), "-j", jobs, "--format", fmt)
    for fmt in ("json", "text"):
        assert runs["1", fmt] == runs["2", fmt] == runs["0", fmt]
    rc, out, err = runs["1", "json"]
    errors = {Path(d["file"]).name for d in json.loads(out)["diagnostics"] if d["severity"] == "error"}
    assert rc == 1 and "orphan.vmi" in errors and "common.vmi" not in errors and not any(f.startswith("p") for f in errors)
    assert "policies" in runs["1", "text"][2]


def test_jobs_must_be_a_count(capsys):
    rc, out, err = run(capsys, "check", "-j", "-1", str(EXAMPLE))
    assert rc == 2 and "0 (one per CPU) or more" in err


def test_examples_directory_is_clean(capsys):
    rc, out, err = run(capsys, "check", str(EXAMPLES), "--format", "json")
    assert rc == 0, out
    assert all(d["severity"] != "error" for d in json.loads(out)["diagnostics"])


def test_non_policy_file_is_skipped_and_counted(capsys, work):
    rc, out, err = run(capsys, "check", str(work / "good.vmi"), str(work / "linux-6.1.System.map"))
    assert rc == 0
    assert "1 non-policy file skipped" in err


# ---------------------------------------------------------------- schema and help

def test_schema_prints_json_schema(capsys):
    try:
        import policyc.yaml_form  # noqa: F401
    except ImportError:
        pytest.skip("the YAML front end is not there yet")
    rc, out, err = run(capsys, "schema")
    assert rc == 0
    schema = json.loads(out)
    assert "$schema" in schema
    assert schema.get("type") == "object" or "properties" in schema or "$defs" in schema


def test_help_exits_0(capsys):
    rc, out, err = run(capsys, "--help")
    assert rc == 0
    for name in SUBCOMMANDS:
        assert name in out


def test_version_exits_0(capsys):
    rc, out, err = run(capsys, "--version")
    assert rc == 0
    assert re.search(r"policyc \d+\.\d+", out + err)


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_each_subcommand_help_exits_0(capsys, command):
    rc, out, err = run(capsys, command, "--help")
    assert rc == 0
    assert out.startswith("usage: policyc " + command)


# ---------------------------------------------------------------- hostile symbol files

RULE_ON_IDT = ('policy "p" {{\n    target xen >= 4.17 on x86_64\n    symbols "{symbols}"\n'
               '    region idt = symbol idt_table size 4096\n'
               '    rule idt_guard: on write to idt {{\n        deny\n    }}\n}}\n')
ISF_HEAD = '{"metadata": {"format": "6.2.0"}, "base_types": {}, "enums": {}, '


@pytest.mark.parametrize("content", [
    ISF_HEAD + '"symbols": {"idt_table": {"address": 1}}, "user_types": {"cred": {"size": "abc", "fields": {}}}}',
    ISF_HEAD + '"symbols": {"idt_table": {"address": 1}}, '
               '"user_types": {"cred": {"size": 8, "fields": {"uid": {"offset": 4, "type": "int"}}}}}',
    ISF_HEAD + '"symbols": {"idt_table": {"address": 1}}, "user_types": {"cred": {"size": 8, "fields": [1, 2]}}}',
    ISF_HEAD + '"symbols": {"idt_table": {"address": 1}}, "user_types": [["cred"]]}',
    ISF_HEAD + '"symbols": {"idt_table": {"address": "0xffffffff83313000"}}}',
    ISF_HEAD + '"symbols": []}',
    "ffffffff83313000 b\n",
    "zzzz b idt_table\n",
], ids=["isf-size-string", "isf-field-type-string", "isf-fields-list", "isf-user-types-list",
        "isf-address-string", "isf-symbols-list", "map-short-line", "map-bad-address"])
def test_malformed_symbol_files_are_diagnostics(capsys, tmp_path, content):
    (tmp_path / "bad.symbols").write_text(content, encoding="utf-8")
    (tmp_path / "p.vmi").write_text(RULE_ON_IDT.format(symbols="bad.symbols"), encoding="utf-8")
    rc, out, err = run(capsys, "check", str(tmp_path / "p.vmi"), "--format", "json")
    assert rc == 1
    codes = {d["code"] for d in json.loads(out)["diagnostics"]}
    assert "PC304" in codes, codes


def _limited_memory() -> None:  # pragma: no cover - runs in the child
    import resource
    resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))


@pytest.mark.skipif(sys.platform != "linux", reason="needs /dev/zero, mkfifo and RLIMIT_AS")
@pytest.mark.parametrize("special", ["/dev/zero", "fifo"])
def test_special_files_as_symbol_files_are_refused(tmp_path, special):
    """`symbols` reads whatever path it is given; a device or a pipe never ends. The child runs with
    1 GiB of address space and a timeout, so a failure here cannot take the machine down."""
    import os

    if special == "fifo":
        os.mkfifo(tmp_path / "pipe.map")
        special = "pipe.map"
    (tmp_path / "p.vmi").write_text(RULE_ON_IDT.format(symbols=special), encoding="utf-8")
    exe = shutil.which("policyc")
    cmd = [exe] if exe else [sys.executable, "-c", "import sys; from policyc.cli import main; sys.exit(main())"]
    try:
        proc = subprocess.run(cmd + ["check", "--format", "json", str(tmp_path / "p.vmi")], capture_output=True,
                              text=True, timeout=15, preexec_fn=_limited_memory)
    except subprocess.TimeoutExpired:
        pytest.fail(f"policyc check hangs on symbols \"{special}\"")
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert proc.returncode == 1
    assert "PC304" in {d["code"] for d in json.loads(proc.stdout)["diagnostics"]}


# ---------------------------------------------------------------- several files in one run

CONFLICT = '''policy "conflict" {
    target xen >= 4.17 on x86_64
    symbols "linux-6.1.System.map"

    region syscalls = symbol sys_call_table size 8 * 451

    rule let_ftrace_patch: on write to syscalls {
        allow
    }
    rule protect_syscalls: on write to syscalls {
        deny
    }
}
'''


def test_each_file_of_a_run_is_checked_as_if_alone(capsys, work):
    """A run over several files reports, for each, what checking it alone reports, in any order:
    an error in one file must not hide another file's problems (PC503 here comes from lowering)."""
    (work / "conflict.vmi").write_text(CONFLICT, encoding="utf-8")
    files = [str(work / "broken.vmi"), str(work / "conflict.vmi"), str(work / "warns.vmi")]

    def keys(*paths):
        rc, out, err = run(capsys, "check", *paths, "--format", "json")
        return {(d["code"], Path(d["file"]).name, d["line"]) for d in json.loads(out)["diagnostics"]}

    alone = set().union(*(keys(f) for f in files))
    assert ("PC503", "conflict.vmi", 10) in alone
    assert keys(*files) == alone
    assert keys(*reversed(files)) == alone


def test_unwritable_output_and_directory_input_are_clear_errors(capsys, tmp_path):
    policy = str(Path(__file__).resolve().parent.parent / "examples" / "policies" / "linux-kernel-integrity.vmi")
    target = tmp_path / "missing" / "plan.json"
    rc, out, err = run(capsys, "compile", policy, "-o", str(target))
    assert rc == 1 and "cannot write" in err and "Traceback" not in err
    assert not target.parent.exists()
    rc, out, err = run(capsys, "compile", str(tmp_path))
    assert rc == 1 and "is a directory" in err and "Traceback" not in err


def test_compile_output_writes_through_special_files_and_symlinks(capsys, tmp_path):
    """`-o` replaces a regular file atomically, but never a FIFO, a device or a symlink."""
    import os
    import stat
    import threading

    policy = str(EXAMPLE)
    rc, expected, _ = run(capsys, "compile", policy)
    assert rc == 0

    rc, out, _ = run(capsys, "compile", policy, "-o", "-")
    assert rc == 0 and out == expected

    regular = tmp_path / "plan.json"
    regular.write_text("old", encoding="utf-8")
    regular.chmod(0o640)
    assert run(capsys, "compile", policy, "-o", str(regular))[0] == 0
    assert regular.read_text(encoding="utf-8") == expected
    assert stat.S_IMODE(regular.stat().st_mode) == 0o640
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plan.json"]   # no temporary left

    link = tmp_path / "link.json"
    link.symlink_to(regular.name)
    regular.write_text("old", encoding="utf-8")
    assert run(capsys, "compile", policy, "-o", str(link))[0] == 0
    assert link.is_symlink() and regular.read_text(encoding="utf-8") == expected

    fifo = tmp_path / "plan.fifo"
    os.mkfifo(fifo)
    received: list[bytes] = []
    reader = threading.Thread(target=lambda: received.append(fifo.read_bytes()))
    reader.start()
    assert run(capsys, "compile", policy, "-o", str(fifo))[0] == 0
    reader.join(10)
    assert stat.S_ISFIFO(fifo.stat().st_mode) and received == [expected.encode()]

    devnull = Path(os.devnull)
    assert run(capsys, "compile", policy, "-o", os.devnull)[0] == 0
    assert stat.S_ISCHR(devnull.stat().st_mode)


def test_fmt_write_follows_a_symlink_to_the_policy(capsys, work):
    real = work / "good.vmi"
    real.write_text(GOOD.replace("    deny", "  deny"), encoding="utf-8")
    link = work / "link.vmi"
    link.symlink_to(real.name)
    rc, _, err = run(capsys, "fmt", "-w", str(link))
    assert rc == 0, err
    assert link.is_symlink()
    assert real.read_text(encoding="utf-8") == GOOD


def test_an_include_that_is_a_symlink_loop_is_a_diagnostic(capsys, work):
    (work / "loop.vmi").symlink_to("loop.vmi")
    (work / "good.vmi").write_text(GOOD.replace('    symbols', '    include "loop.vmi"\n    symbols'), encoding="utf-8")
    for target in (work / "good.vmi", work):
        rc, _, err = run(capsys, "check", str(target))
        assert rc == 1
        assert "error[PC308]: included file 'loop.vmi' is a symbolic link loop" in err
    rc, _, err = run(capsys, "check", str(work / "loop.vmi"))
    assert rc == 2 and "symbolic link to nothing (or a loop)" in err


@pytest.mark.parametrize("command", ["check", "fmt"])
def test_a_directory_without_policies_is_a_usage_error(capsys, tmp_path, command):
    (tmp_path / "notes.txt").write_text("no policy here", encoding="utf-8")
    rc, _, err = run(capsys, command, str(tmp_path))
    assert rc == 2 and f"no policy files (.vmi, .yaml, .yml) under {tmp_path}" in err


def test_the_installed_check_and_compile_flush_everything_before_ending_the_process(tmp_path):
    # As a program, check and compile end the process without the interpreter's teardown: what they
    # printed must still all arrive, and the status must be main()'s.
    policyc = shutil.which("policyc", path=str(Path(sys.executable).parent))
    if policyc is None:
        pytest.skip("the policyc command is not installed next to this interpreter")
    plan = subprocess.run([policyc, "compile", str(EXAMPLE)], capture_output=True, text=True, cwd=EXAMPLES)
    golden = REPO / "tests" / "golden" / "plans" / "linux-kernel-integrity.x86_64.plan.json"
    assert plan.returncode == 0 and plan.stdout == golden.read_text(encoding="utf-8")
    broken = subprocess.run([policyc, "check", "--format", "json", str(REPO / "tests" / "broken")],
                            capture_output=True, text=True)
    assert broken.returncode == 1 and json.loads(broken.stdout)["diagnostics"]
