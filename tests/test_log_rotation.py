"""Rotation of the decision log by size and by age, between batches: under a storm every request
has its one line across the files, and no line is torn."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from policyc.runtime.log_rotation import Rotation, parse_duration, parse_size
from policyc.runtime.output_file import OutputFile

from helpers import run_storm_on_simhost

ROOT = Path(__file__).resolve().parents[1]
KERNEL_INTEGRITY = ROOT / "examples" / "policies" / "linux-kernel-integrity.vmi"


@pytest.mark.parametrize("how", [["--log-rotate-size", "64K"], ["--log-rotate-every", "0.2s"],
                                 ["--log-format", "ocsf", "--log-rotate-size", "256K"]], ids=["size", "age", "ocsf"])
def test_rotation_under_a_storm_keeps_one_whole_line_per_request(tmp_path, how):
    requests = run_storm_on_simhost(tmp_path, 400, ["--log", str(tmp_path / "log.jsonl"), *how, "--log-keep", "10000"])
    assert requests > 1000
    files = sorted(tmp_path.glob("log.jsonl*"))
    assert len(files) >= 3, files                # rotated more than once
    ids = []
    for f in files:
        text = f.read_text()
        assert text.endswith("\n") or not text, f
        ids += _decision_ids(text)              # a torn line would not parse
    assert len(ids) == len(set(ids)) == requests
    # in order: FILE.N is the oldest; the newest records are in FILE
    newest_first = [tmp_path / "log.jsonl"] + [tmp_path / f"log.jsonl.{n}" for n in range(1, len(files))]
    ordered = [i for f in reversed(newest_first) for i in _decision_ids(f.read_text())]
    assert [int(i.rsplit(".", 1)[1]) for i in ordered] == sorted(int(i.rsplit(".", 1)[1]) for i in ordered)


def _decision_ids(text: str) -> list[str]:
    """The decision of each record (JSON Lines), or of each activity event (OCSF; findings follow theirs)."""
    out = []
    for line in text.splitlines():
        rec = json.loads(line)
        if "class_uid" not in rec:
            out.append(rec["decision_id"])
        elif rec["class_uid"] != 2004:
            out.append(rec["metadata"]["uid"])
    return out


def test_rotation_moves_the_descriptor_the_native_writer_holds_to_the_new_file(tmp_path):
    path = tmp_path / "log.jsonl"
    out = OutputFile(path, "the decision log")
    now = [0.0]
    rot = Rotation(out, max_bytes=10, every=5.0, keep=2, clock=lambda: now[0])
    fd = out.fileno()                  # what the native engine writes whole batches to
    os.write(fd, b"1\n")
    assert not rot.check()             # neither big nor old enough
    out.write("22222222\n")            # pending in the stream: flushed before the size is looked at
    assert rot.check() and path.read_text() == "" and (tmp_path / "log.jsonl.1").read_text() == "1\n22222222\n"
    os.write(fd, b"3\n")               # the same descriptor number, now the fresh file
    assert path.read_text() == "3\n"
    now[0] = 6.0
    assert rot.check()                 # old enough and not empty
    os.write(fd, b"4\n")
    now[0] = 12.0
    assert rot.check()
    assert [p.name for p in sorted(tmp_path.iterdir())] == ["log.jsonl", "log.jsonl.1", "log.jsonl.2"]
    assert (tmp_path / "log.jsonl.2").read_text() == "3\n"     # the oldest beyond keep=2 is gone
    now[0] = 30.0
    assert not rot.check()             # an empty file is not rotated for its age
    out.close()
    assert not rot.check()


def test_a_rename_that_fails_keeps_the_file_and_says_so(tmp_path):
    path = tmp_path / "d" / "log.jsonl"
    path.parent.mkdir()
    out = OutputFile(path, "the decision log")
    out.write("x" * 20 + "\n")
    rot = Rotation(out, max_bytes=10)
    (tmp_path / "d" / "log.jsonl.1").mkdir()      # rename over a directory fails
    (tmp_path / "d" / "log.jsonl.1" / "keep").write_text("")
    rot.keep = 1
    assert not rot.check()
    assert rot.errors == 1 and "cannot rotate" in rot.last_error
    out.write("y\n")
    out.flush()
    assert path.read_text().endswith("y\n")       # still writing to the same file
    out.close()


@pytest.mark.parametrize("text,value", [("100M", 100 << 20), ("512K", 512 << 10), ("1G", 1 << 30), ("4096", 4096),
                                        ("10MiB", 10 << 20)])
def test_sizes(text, value):
    assert parse_size(text) == value


@pytest.mark.parametrize("text,value", [("30s", 30), ("15m", 900), ("1h", 3600), ("1d", 86400), ("0.5", 0.5)])
def test_durations(text, value):
    assert parse_duration(text) == value


@pytest.mark.parametrize("flags,says", [
    (["--log-rotate-size", "lots"], "expected a size"),
    (["--log-rotate-every", "0h"], "expected a duration"),
    (["--log-rotate-size", "1M"], "rotate a --log FILE"),
])
def test_rotation_flags_are_checked_before_anything_runs(flags, says):
    p = subprocess.run([sys.executable, "-m", "policyc", "run", str(KERNEL_INTEGRITY), "--guest", "simhost:/nowhere",
                        *flags], capture_output=True, text=True)
    assert p.returncode == 2 and says in p.stderr and "Traceback" not in p.stderr
