"""The simulator checked against real Xen in every CI run (runtime/sim/replay_live.py).

tests/data/live-replay/ keeps cuts of recordings made on live Xen by the lab (tests/lab/, `policyc run
--record` in its dom0, with the decision records): each is replayed through SimulatedXen under the lab
policy it enforced, and the simulator must send the same requests and get the same verdicts (but for
differences documented in docs/XEN-SEMANTICS.md). The other tests alter a recording and check that the
comparison sees it, and replay recordings the simulator made itself.
"""

from __future__ import annotations

import base64
import json
import struct
from pathlib import Path

import pytest

from policyc.native.constants import RS_SINGLESTEP
from policyc.plan_source import load_plan_source
from policyc.runtime.sim.replay_live import DOCUMENTED, load_sample, replay_live, replay_live_files, request_fields

HERE = Path(__file__).resolve().parent
SAMPLE_DIR = HERE / "data" / "live-replay"
SAMPLES = sorted(SAMPLE_DIR.glob("*.json"))


def _compiled(sample: dict):
    """The policy as it was when the sample was recorded (kept beside it: the lab's own may have moved
    on with its guest)."""
    return load_plan_source(str(SAMPLE_DIR / sample["policy"]), sample.get("target"))


def _replay(path: Path, tmp_path: Path, alter=None) -> dict:
    sample = json.loads(path.read_text())
    if alter is not None:
        alter(sample)
        path = tmp_path / path.name
        path.write_text(json.dumps(sample))
    trace, decisions = load_sample(path, tmp_path)
    compiled = _compiled(sample)
    return replay_live(trace, decisions, compiled.plan, compiled.symbols).summary()


def _requests(sample: dict) -> list[tuple[dict, int]]:
    """(the trace record, index in its batch) of every request, in order."""
    return [(rec, i) for rec in sample["trace"] if "requests" in rec for i in range(len(rec["requests"]))]


def _edit_request(sample: dict, n: int, offset: int, fmt: str, value: int) -> None:
    rec, i = _requests(sample)[n]
    raw = bytearray(base64.b64decode(rec["requests"][i]))
    struct.pack_into(fmt, raw, offset, value)
    rec["requests"][i] = base64.b64encode(bytes(raw)).decode()


def _first(sample: dict, reason: str) -> int:
    for n, (rec, i) in enumerate(_requests(sample)):
        if request_fields(base64.b64decode(rec["requests"][i]))["reason"] == reason:
            return n
    raise LookupError(reason)


def test_there_are_live_samples() -> None:
    # one from each lab host kind: AMD SVM (QEMU) and Intel VT-x with MTF (Bochs 3.0)
    names = [p.name for p in SAMPLES]
    assert any("qemu" in n for n in names) and any("bochs3" in n for n in names), names


@pytest.mark.parametrize("path", SAMPLES, ids=[p.stem for p in SAMPLES])
def test_live_recording_replays_the_same(path: Path, tmp_path: Path) -> None:
    sample = json.loads(path.read_text())
    s = _replay(path, tmp_path)
    assert s["requests"] == len(sample["decisions"]) == sample["requests"] > 100, s
    assert s["ok"], json.dumps(s["differences"], indent=1)
    documented = sum(k["count"] for k in s["differences"].values())
    assert s["matched"] + s["different"] == s["requests"] and documented == sum(
        k["count"] for kind, k in s["differences"].items() if kind in DOCUMENTED)


def _bochs3() -> Path:
    path = next((p for p in SAMPLES if "bochs3" in p.name), None)
    if path is None:
        pytest.skip("no Bochs 3.0 sample in tests/data/live-replay")
    return path


def test_an_altered_gfn_is_seen(tmp_path: Path) -> None:
    path = _bochs3()
    n = _first(json.loads(path.read_text()), "mem_access")
    s = _replay(path, tmp_path, lambda smp: _edit_request(smp, n, 24, "<Q", 0x7777))   # u.mem_access.gfn
    assert not s["ok"] and s["differences"], s
    ex = [k["examples"][0] for k in s["differences"].values()]
    assert any(e["request"] == n for e in ex), ex


def test_an_altered_cr_value_is_seen(tmp_path: Path) -> None:
    path = next(p for p in SAMPLES if "qemu" in p.name)
    sample = json.loads(path.read_text())
    n = _first(sample, "write_ctrlreg")
    s = _replay(path, tmp_path, lambda smp: _edit_request(smp, n, 24, "<I", 3))     # u.write_ctrlreg.index
    assert not s["ok"] and ("write_ctrlreg.index" in s["differences"] or "no_request" in s["differences"]), s


def test_an_altered_verdict_is_seen(tmp_path: Path) -> None:
    path = next(p for p in SAMPLES if "qemu" in p.name)

    def alter(smp: dict) -> None:
        smp["decisions"][5]["response_flags"] = ["VCPU_PAUSED"]
        smp["decisions"][6]["rule"] = "another_rule"
    s = _replay(path, tmp_path, alter)
    assert set(s["differences"]) >= {"verdict.rule"} and not s["ok"], s
    assert s["differences"]["verdict.rule"]["examples"][0]["request"] == 6
    assert s["matched"] <= s["requests"] - 2


def test_a_request_the_simulator_would_not_send_is_seen(tmp_path: Path) -> None:
    path = next(p for p in SAMPLES if "qemu" in p.name)

    def alter(smp: dict) -> None:        # a singlestep request no guest step of this host makes
        rec, i = _requests(smp)[3]
        raw = bytearray(base64.b64decode(rec["requests"][i]))
        struct.pack_into("<I", raw, 8, RS_SINGLESTEP)
        rec["requests"][i] = base64.b64encode(bytes(raw)).decode()
    s = _replay(path, tmp_path, alter)
    assert "live_only" in s["differences"] and not s["ok"], s


@pytest.mark.parametrize("name", ["rootkit-remaps-syscall-table", "linux-descriptors-and-msrs",
                                  "linux-syscall-tracing", "windows-kernel-integrity"])
def test_the_simulators_own_recording_replays_exactly(name: str, tmp_path: Path) -> None:
    """A recording the simulator made (`policyc run --guest sim:S --record`) derived back into guest steps
    gives the same requests and verdicts: the derivation of steps is right where nothing else differs."""
    from policyc.cli import main
    from policyc.runtime.sim.scenario import load_scenario

    scenario = HERE.parent / "examples" / "scenarios" / f"{name}.yaml"
    policy = load_scenario(scenario).policy
    trace, log = tmp_path / "t.jsonl", tmp_path / "d.jsonl"
    assert main(["run", policy, "--guest", f"sim:{scenario}", "--record", str(trace), "--log", str(log)]) == 0
    s = replay_live_files(str(trace), str(log), policy)
    assert s["exact"] and s["requests"] == s["matched"] > 0, s
