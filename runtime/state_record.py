"""The install-state record: the journal of an installation on disk, so that `recover` can undo what
a killed enforcer left (written atomically, 0600 in a 0700 directory), where it lives, and whose
domain it belongs to.
"""

from __future__ import annotations

import glob
import json
import os
import re
import tempfile
import time
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

__all__ = ["STATE_FORMAT", "StateRecord", "default_state_dir", "state_path_for", "load_record",
           "remove_stray_temporaries", "domain_identity", "other_domain", "pid_alive"]

STATE_FORMAT = "policyc.install-state/1"


def default_state_dir() -> Path:
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime and os.path.isdir(runtime):
        return Path(runtime) / "policyc"
    return Path(tempfile.gettempdir()) / f"policyc-{os.getuid()}"


def state_path_for(guest: str, state_dir: str | Path | None = None) -> Path:
    """Where the state record of `guest` lives (the name made file-safe)."""
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", guest).lstrip(".") or "guest"
    return (Path(state_dir) if state_dir is not None else default_state_dir()) / f"{safe}.json"


def _runs(prior: Mapping[int, str]) -> list[list]:
    """{gfn: access} as [[first gfn, count, access], ...] (big maps are mostly runs)."""
    out: list[list] = []
    for gfn in sorted(prior):
        acc = prior[gfn]
        if out and out[-1][0] + out[-1][1] == gfn and out[-1][2] == acc:
            out[-1][1] += 1
        else:
            out.append([gfn, 1, acc])
    return out


def _unruns(runs: Iterable[Sequence]) -> dict[int, str]:
    return {g: acc for first, count, acc in runs for g in range(first, first + count)}


def _encode(entry: Mapping[str, Any]) -> dict:
    out = dict(entry)
    for key in ("prior",):
        if key in out and isinstance(out[key], dict):
            out[key] = {"runs": _runs(out[key])}
    for key in ("views", "restricted"):
        if key in out and isinstance(out[key], dict):
            out[key] = {str(v): a for v, a in out[key].items()}
    return out


def _decode(entry: Mapping[str, Any]) -> dict:
    out = dict(entry)
    if isinstance(out.get("prior"), dict) and "runs" in out["prior"]:
        out["prior"] = _unruns(out["prior"]["runs"])
    for key in ("views", "restricted"):
        if isinstance(out.get(key), dict):
            out[key] = {int(v): a for v, a in out[key].items()}
    return out


def write_json_atomically(path: Path, data: Any) -> None:
    """`data` as JSON at `path`, whole or not at all (temp file, fsync, rename): 0600 in a 0700 directory."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


class StateRecord:
    """The on-disk state record: written atomically (temp file + rename), 0600 in a 0700 directory."""

    def __init__(self, path: Path, guest: str, plan: Mapping[str, Any], domain: Mapping[str, Any] | None) -> None:
        self.path = path
        self.data: dict[str, Any] = {
            "format": STATE_FORMAT, "guest": guest, "pid": os.getpid(), "started": time.time(),
            "plan": (plan.get("policy") or {}).get("name"), "plan_hash": plan.get("content_hash"),
            "domain": dict(domain) if domain is not None else None,
            "phase": "installing", "paused": 0, "view_map": {}, "journal": [],
        }

    def save(self, journal: Sequence[Mapping[str, Any]]) -> None:
        self.data["journal"] = [_encode(e) for e in journal]
        write_json_atomically(self.path, self.data)

    def delete(self) -> None:
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass


def remove_stray_temporaries(path: Path) -> None:
    """Temporary records a killed `StateRecord.save` left between mkstemp and the rename."""
    try:
        strays = list(path.parent.glob(glob.escape(path.name) + ".*"))
    except OSError:
        return
    for stray in strays:
        try:
            stray.unlink()
        except OSError:
            pass


def domain_identity(backend: Any) -> dict[str, Any] | None:
    """The backend's identity of its domain (Xen: domid and UUID), or None for one that has none."""
    identify = getattr(backend, "domain_identity", None)
    return dict(identify()) if callable(identify) else None


def other_domain(recorded: Any, current: dict[str, Any] | None) -> str | None:
    """Why a journal must not be applied to this domain, or None when it belongs to it."""
    if recorded == current:
        return None
    if recorded is None:
        return ("the journal names no domain (an older policyc wrote it), so it cannot be told apart from "
                "another guest that took the same name")
    return (f"the journal belongs to domain {_describe_domain(recorded)}, but this guest is "
            f"{_describe_domain(current)}: another guest took the name")


def _describe_domain(identity: Any) -> str:
    if not isinstance(identity, Mapping):
        return "(unknown)"
    return ", ".join(f"{k} {v}" for k, v in identity.items() if k != "kind")


def load_record(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    if data.get("format") != STATE_FORMAT:
        raise ValueError(f"{path} is not a policyc install-state record")
    data["journal"] = [_decode(e) for e in data.get("journal", [])]
    return data


def pid_alive(pid: int) -> bool:
    """Whether the process that wrote a record (its pid) still runs."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
