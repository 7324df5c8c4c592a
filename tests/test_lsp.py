"""`policyc lsp` driven over stdio by a JSON-RPC client written here, as an editor would drive it."""

from __future__ import annotations

import json
import os
import queue
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("pygls", reason="policyc lsp needs pygls (pip install 'policyc[lsp]')")
pytest.importorskip("lsprotocol", reason="policyc lsp needs lsprotocol (pip install 'policyc[lsp]')")

from policyc.authoring import SymbolIndex, analyze, complete  # noqa: E402
from policyc.symbols import SymbolTable, Symbol  # noqa: E402

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "policies"
SYSTEM_MAP = EXAMPLES / "linux-6.1.System.map"
DEBIAN_ISF = Path("/work/shared/data/debian12-6.1.0-56-amd64.json.xz")

MISSPELLED = f'''policy "typo" {{
    target xen >= 4.17 on x86_64
    symbols "{SYSTEM_MAP}"

    region syscalls = symbol sys_cal_table size 4096

    rule protect: on write to syscalls {{
        deny
    }}
}}
'''


class Client:
    """Just enough of an LSP client: Content-Length framing, requests matched by id, notifications queued."""

    def __init__(self, cwd: Path) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "policyc", "lsp"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=cwd)
        self.next_id = 0
        self.responses: dict[int, dict] = {}
        self.notifications: queue.Queue = queue.Queue()
        self.arrived = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        stream = self.proc.stdout
        while True:
            length = None
            while True:
                line = stream.readline()
                if not line:
                    return
                if line in (b"\r\n", b"\n"):
                    break
                name, _, value = line.decode().partition(":")
                if name.lower() == "content-length":
                    length = int(value)
            message = json.loads(stream.read(length))
            if "id" in message and "method" not in message:
                with self.arrived:
                    self.responses[message["id"]] = message
                    self.arrived.notify_all()
            elif "id" in message:  # a request from the server (e.g. workDoneProgress): answer it
                self._send({"jsonrpc": "2.0", "id": message["id"], "result": None})
            else:
                self.notifications.put(message)

    def _send(self, message: dict) -> None:
        body = json.dumps(message).encode()
        self.proc.stdin.write(b"Content-Length: %d\r\n\r\n" % len(body) + body)
        self.proc.stdin.flush()

    def request(self, method: str, params: dict, timeout: float = 60) -> object:
        self.next_id += 1
        rid = self.next_id
        self._send({"jsonrpc": "2.0", "id": rid, "method": method, "params": params})
        with self.arrived:
            if not self.arrived.wait_for(lambda: rid in self.responses, timeout):
                raise AssertionError(f"no answer to {method} in {timeout} s")
            response = self.responses.pop(rid)
        assert "error" not in response, response
        return response["result"]

    def notify(self, method: str, params: dict) -> None:
        self._send({"jsonrpc": "2.0", "method": method, "params": params})

    def diagnostics(self, uri: str, timeout: float = 120) -> list[dict]:
        deadline = time.monotonic() + timeout
        while True:
            message = self.notifications.get(timeout=max(0.01, deadline - time.monotonic()))
            if message["method"] == "textDocument/publishDiagnostics" and message["params"]["uri"] == uri:
                return message["params"]["diagnostics"]

    def close(self) -> None:
        try:
            self.request("shutdown", None, timeout=10)
            self.notify("exit", None)
            self.proc.wait(timeout=10)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture
def client(tmp_path):
    c = Client(tmp_path)
    result = c.request("initialize", {"processId": os.getpid(), "rootUri": tmp_path.as_uri(), "capabilities": {}})
    caps = result["capabilities"]
    for capability in ("hoverProvider", "completionProvider", "definitionProvider", "documentFormattingProvider",
                       "codeActionProvider"):
        assert caps.get(capability), capability
    c.notify("initialized", {})
    yield c
    c.close()


def _open(client: Client, path: Path, text: str) -> list[dict]:
    path.write_text(text)
    client.notify("textDocument/didOpen", {"textDocument": {"uri": path.as_uri(), "languageId": "policyc",
                                                            "version": 1, "text": text}})
    return client.diagnostics(path.as_uri())


def _apply(text: str, edits: list[dict]) -> str:
    """Apply LSP text edits (0-based, end exclusive), last first."""
    lines = text.splitlines(keepends=True)
    offsets = [0]
    for line in lines:
        offsets.append(offsets[-1] + len(line))
    def offset(pos: dict) -> int:
        return offsets[min(pos["line"], len(lines))] + pos["character"]
    for e in sorted(edits, key=lambda e: offset(e["range"]["start"]), reverse=True):
        text = text[:offset(e["range"]["start"])] + e["newText"] + text[offset(e["range"]["end"]):]
    return text


def test_misspelled_symbol_is_diagnosed_fixed_by_the_code_action_and_cleared(client, tmp_path):
    path = tmp_path / "typo.vmi"
    uri = path.as_uri()
    diagnostics = _open(client, path, MISSPELLED)
    unknown = [d for d in diagnostics if d["code"] == "PC302"]
    assert len(unknown) == 1, diagnostics
    d = unknown[0]
    # `symbol sys_cal_table` on line 5 (0-based 4), exactly as `policyc check` spans it.
    line = MISSPELLED.splitlines()[4]
    assert d["range"] == {"start": {"line": 4, "character": line.index("symbol")},
                          "end": {"line": 4, "character": line.index(" size")}}
    assert "did you mean 'sys_call_table'" in d["message"] and d["severity"] == 1

    sent = {k: v for k, v in d.items() if k != "data"}  # as a client that keeps no `data` sends it back
    actions = client.request("textDocument/codeAction", {
        "textDocument": {"uri": uri}, "range": d["range"], "context": {"diagnostics": [sent]}})
    assert actions and actions[0]["title"] == "Replace with 'sys_call_table'"
    fixed = _apply(MISSPELLED, actions[0]["edit"]["changes"][uri])
    assert "symbol sys_call_table size 4096" in fixed

    client.notify("textDocument/didChange", {"textDocument": {"uri": uri, "version": 2},
                                             "contentChanges": [{"text": fixed}]})
    assert client.diagnostics(uri) == []


def test_hover_definition_and_formatting(client, tmp_path):
    path = tmp_path / "ok.vmi"
    uri = path.as_uri()
    text = MISSPELLED.replace("sys_cal_table", "sys_call_table").replace("deny", "deny\n\n")
    assert _open(client, path, text) == []
    use = next(i for i, line in enumerate(text.splitlines()) if "on write to syscalls" in line)
    column = text.splitlines()[use].index("syscalls") + 2

    shown = client.request("textDocument/hover", {"textDocument": {"uri": uri},
                                                  "position": {"line": use, "character": column}})
    value = shown["contents"]["value"]
    assert "**region** `syscalls`" in value and "symbol sys_call_table" in value
    assert "size 0x1000, 2 pages" in value  # sys_call_table is at ...0360: 4096 bytes span two pages

    rule = client.request("textDocument/hover", {"textDocument": {"uri": uri}, "position": {"line": use, "character": 10}})
    assert "vm_event MEM_ACCESS" in rule["contents"]["value"] and "traps w" in rule["contents"]["value"]

    region_line = 4
    symbol = client.request("textDocument/hover", {"textDocument": {"uri": uri}, "position": {
        "line": region_line, "character": text.splitlines()[region_line].index("sys_call_table") + 3}})
    from policyc.symbols import load_symbol_table
    address = load_symbol_table(SYSTEM_MAP).lookup("sys_call_table").address
    assert f"address {address:#x} before the slide, .data (in linux-6.1.System.map)" in symbol["contents"]["value"]

    where = client.request("textDocument/definition", {"textDocument": {"uri": uri},
                                                       "position": {"line": use, "character": column}})
    assert where["uri"] == uri and where["range"]["start"]["line"] == 4

    edits = client.request("textDocument/formatting", {"textDocument": {"uri": uri},
                                                       "options": {"tabSize": 4, "insertSpaces": True}})
    assert edits and _apply(text, edits) == MISSPELLED.replace("sys_cal_table", "sys_call_table")


def test_capability_errors_of_the_target_are_diagnosed(client, tmp_path):
    # arm64 has no control-register trigger: the checker says so for the policy's own target.
    path = tmp_path / "arm.vmi"
    text = 'policy "arm" {\n    target xen >= 4.17 on arm64\n\n    rule wp: on write cr0 {\n        deny\n    }\n}\n'
    diagnostics = _open(client, path, text)
    assert any(d["code"] == "PC418" and d["range"]["start"]["line"] == 3 for d in diagnostics), diagnostics


@pytest.mark.skipif(not DEBIAN_ISF.is_file(), reason=f"the Debian ISF is not at {DEBIAN_ISF}")
def test_symbol_completion_on_the_debian_isf_is_under_100_ms(client, tmp_path):
    path = tmp_path / "debian.vmi"
    uri = path.as_uri()
    text = (f'policy "debian" {{\n    target xen >= 4.17 on x86_64\n    symbols "{DEBIAN_ISF}"\n\n'
            f'    region syscalls = symbol sys_c\n}}\n')
    _open(client, path, text)  # the first analysis loads the 160,000-symbol table
    position = {"line": 4, "character": len("    region syscalls = symbol sys_c")}
    times = []
    for _ in range(5):
        start = time.perf_counter()
        result = client.request("textDocument/completion", {"textDocument": {"uri": uri}, "position": position})
        times.append(time.perf_counter() - start)
    labels = [item["label"] for item in result["items"]]
    assert "sys_call_table" in labels and all(label.startswith("sys_c") for label in labels)
    median = statistics.median(times)
    print(f"completion of 'sys_c' on the Debian ISF: median {median * 1000:.1f} ms over {len(times)} requests")
    assert median < 0.1


def test_prefix_completion_is_by_bisection_and_says_when_cut_short():
    table = SymbolTable("t.map", "system.map", "linux",
                        {n: Symbol(n, 0xffffffff81000000 + i, "T") for i, n in
                         enumerate(["sys_a", "sys_b", "sys_c", "sys_ca", "sysfs", "t"])})
    assert SymbolIndex(table).starting_with("sys_c", 10) == (["sys_c", "sys_ca"], False)
    assert SymbolIndex(table).starting_with("sys", 2) == (["sys_a", "sys_b"], True)
    assert SymbolIndex(table).starting_with("zz", 5) == ([], False)


def test_completion_offers_language_names_in_a_policy(tmp_path):
    path = tmp_path / "p.vmi"
    text = MISSPELLED.replace("sys_cal_table", "sys_call_table") + "\n"
    analysis = analyze(text, path)
    line = 8  # "        deny": complete at its start, nothing typed yet
    names = {c.label: c.kind for c in complete(analysis, line, 9)[0]}
    assert names["syscalls"] == "region" and names["LSTAR"] == "msr" and names["cr0"] == "register"
    assert names["deny"] == "keyword" and names["cr4.SMEP"] == "field"


def test_yaml_policies_get_the_same_diagnostics_and_quick_fix_ranges():
    from policyc.lsp import to_lsp_diagnostic

    path = EXAMPLES / "linux-kernel-integrity.yaml"
    text = path.read_text().replace("symbol: sys_call_table", "symbol: sys_cal_table")
    analysis = analyze(text, path)
    [d] = [to_lsp_diagnostic(x, analysis) for x in analysis.diagnostics]
    line = next(i for i, s in enumerate(text.splitlines()) if "sys_cal_table" in s)
    start = text.splitlines()[line].index("sys_cal_table")
    assert d["code"] == "PC302" and d["data"] == {"replacements": ["sys_call_table"],
                                                   "name_range": [line, start, line, start + len("sys_cal_table")]}


def test_include_problems_show_on_the_include_and_definitions_cross_files(tmp_path):
    from policyc.authoring import definition, hover
    from policyc.lsp import to_lsp_diagnostic

    (tmp_path / "shared.vmi").write_text('include "deeper.vmi"\n')
    (tmp_path / "deeper.vmi").write_text("region r = symbol no_such_symbol size 8\n")
    text = (f'policy "p" {{\n    target xen >= 4.17 on x86_64\n    symbols "{SYSTEM_MAP}"\n'
            f'    include "shared.vmi"\n\n    rule x: on write to r {{\n        deny\n    }}\n}}\n')
    analysis = analyze(text, tmp_path / "p.vmi")
    [d] = [to_lsp_diagnostic(x, analysis) for x in analysis.diagnostics]
    assert d["code"] == "PC302" and d["range"][:2] == (3, 4)  # on `include "shared.vmi"`, the way to it
    assert d["message"].startswith(f"{tmp_path / 'deeper.vmi'}:1:12: unknown symbol 'no_such_symbol'")
    use = text.splitlines()[5].index(" r {") + 2
    assert definition(analysis, 6, use) == (tmp_path / "deeper.vmi", analysis.named("r")[1].span)
    assert definition(analysis, 4, 6)[0] == tmp_path / "shared.vmi"
    assert "region r = symbol no_such_symbol size 8" in hover(analysis, 6, use)


def test_without_pygls_the_command_says_what_to_install(monkeypatch, capsys):
    from policyc.cli import main

    monkeypatch.setitem(sys.modules, "pygls.lsp.server", None)  # as if pygls were not installed
    assert main(["lsp"]) == 2
    assert "pip install 'policyc[lsp]'" in capsys.readouterr().err


def test_every_did_you_mean_hint_is_a_fix_on_the_misspelled_name():
    from policyc.lsp import to_lsp_diagnostic

    path = EXAMPLES / "linux-kernel-integrity.vmi"
    text = path.read_text().replace("on write to syscalls, idt", "on write to syscals, idt").replace(
        "msr LSTAR", "msr LSTR")
    analysis = analyze(text, path)
    lines = text.splitlines()
    fixes = {}
    for d in (to_lsp_diagnostic(x, analysis) for x in analysis.diagnostics):
        line, start, _, end = d["data"]["name_range"]
        fixes[lines[line][start:end]] = d["data"]["replacements"][0]
    assert fixes == {"syscals": "syscalls", "LSTR": "LSTAR"}


def test_hover_names_bits_msrs_and_registers():
    from policyc.authoring import hover

    path = EXAMPLES / "linux-kernel-integrity.vmi"
    analysis = analyze(path.read_text(), path)
    lines = analysis.text.splitlines()
    def at(word: str) -> str | None:
        line = next(i for i, s in enumerate(lines, 1) if word in s)
        return hover(analysis, line, lines[line - 1].index(word) + 2)
    assert at("cr4.SMAP") == "**bit** `cr4.SMAP` = `0x200000`"  # bit 21 (SMEP is 20)
    assert at("LSTAR") == "**MSR** `LSTAR` = `0xc0000082`"
    assert at("NR_SYSCALLS").startswith("**const** `NR_SYSCALLS`")
