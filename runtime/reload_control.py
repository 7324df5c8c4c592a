"""How a running `policyc run` is asked to reload: SIGHUP, `policyc reload --pid`, `--socket`.

`ReloadControl.poll(enforcer)` is called from the answering loop (never from a signal handler: a
reload pauses the guest and touches the backend, which only the loop may do). It reloads when

* SIGHUP arrived (`kill -HUP PID`): from the file `policyc run` was given (edited in place), or
  from the path a `policyc reload --pid PID FILE` left in the request file beside the result;
* a client connected to the control socket (`policyc run --control-socket PATH`): one JSON line
  `{"reload": FILE or null}` in, one JSON line (`ReloadResult.as_dict()`) out.

After each reload over SIGHUP the result is written (atomically) to the result file, with the
request's id, so `policyc reload --pid` can wait for it and exit 0 (the new plan enforces, or it
was already the running one) or 1 (the old plan still enforces). Both files live in the state
directory (`$XDG_RUNTIME_DIR/policyc`, or --state-dir), named by the enforcer's pid.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import time
import uuid
from pathlib import Path
from typing import Any, Callable

from .state_record import write_json_atomically
from .reload import ReloadResult, reload_from_file

__all__ = ["ReloadControl", "request_reload", "ask_socket", "request_path", "result_path"]

SOCKET_TIMEOUT = 5.0            # seconds a control client has to send its request line
MAX_REQUEST = 64 * 1024


def request_path(state_dir: Path, pid: int) -> Path:
    return state_dir / f"reload-{pid}.request"


def result_path(state_dir: Path, pid: int) -> Path:
    return state_dir / f"reload-{pid}.result"


class ReloadControl:
    """SIGHUP and the control socket of one `policyc run` (module docstring)."""

    def __init__(self, source: str, target: str | None, *, state_dir: Path, symbols_dir: str | None = None,
                 audit: bool = False, socket_path: str | None = None,
                 report: Callable[[ReloadResult], None] | None = None) -> None:
        self.source = source
        self.target = target
        self.symbols_dir = symbols_dir
        self.audit = audit
        self.state_dir = state_dir
        self.report = report
        self.pid = os.getpid()
        self._hup = False
        self._server: socket.socket | None = None
        self.socket_path = socket_path
        if socket_path is not None:
            self._server = _listen(socket_path)

    def install_signal(self) -> None:
        """SIGHUP asks for a reload (it would end the process otherwise)."""
        signal.signal(signal.SIGHUP, self._on_hup)

    def _on_hup(self, _signum: int, _frame: Any) -> None:
        self._hup = True

    def poll(self, enforcer: Any) -> None:
        """Reload now if a SIGHUP or a control client asked for it (from the answering loop)."""
        if self._hup:
            self._hup = False
            ident, path = self._take_request()
            result = self._reload(enforcer, path)
            write_json_atomically(result_path(self.state_dir, self.pid), {"id": ident, **result.as_dict()})
        if self._server is not None:
            self._serve_one(enforcer)

    def close(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
            try:
                os.unlink(self.socket_path)  # type: ignore[arg-type]
            except OSError:
                pass
        for path in (request_path(self.state_dir, self.pid), result_path(self.state_dir, self.pid)):
            try:
                path.unlink()
            except OSError:
                pass

    # ------------------------------------------------------------------ helpers
    def _reload(self, enforcer: Any, path: str | None) -> ReloadResult:
        result = reload_from_file(enforcer, path or self.source, self.target, symbols_dir=self.symbols_dir,
                                  audit=self.audit)
        if self.report is not None:
            self.report(result)
        return result

    def _take_request(self) -> tuple[str | None, str | None]:
        path = request_path(self.state_dir, self.pid)
        try:
            data = json.loads(path.read_text())
            path.unlink()
        except (OSError, ValueError):
            return None, None                  # a plain `kill -HUP`: the file run was given
        return str(data.get("id")), data.get("path") if isinstance(data.get("path"), str) else None

    def _serve_one(self, enforcer: Any) -> None:
        assert self._server is not None
        try:
            conn, _ = self._server.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            return
        with conn:
            conn.settimeout(SOCKET_TIMEOUT)
            try:
                line = _read_line(conn)
                request = json.loads(line) if line else {}
                path = request.get("reload") if isinstance(request, dict) else None
                result = self._reload(enforcer, path if isinstance(path, str) else None)
                conn.sendall((json.dumps(result.as_dict()) + "\n").encode())
            except (OSError, ValueError) as exc:
                try:
                    conn.sendall((json.dumps({"result": "failed", "stage": "request",
                                              "error": f"bad control request: {exc}"}) + "\n").encode())
                except OSError:
                    pass


def request_reload(pid: int, path: str | None, state_dir: Path, *, timeout: float = 60.0) -> dict[str, Any]:
    """`policyc reload --pid`: leave the request, send SIGHUP, wait for the result with its id.
    Raises ProcessLookupError (no such process), PermissionError, TimeoutError."""
    ident = uuid.uuid4().hex
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    write_json_atomically(request_path(state_dir, pid), {"id": ident, "path": os.path.abspath(path) if path else None})
    os.kill(pid, signal.SIGHUP)
    deadline = time.monotonic() + timeout
    result = result_path(state_dir, pid)
    while time.monotonic() < deadline:
        try:
            data = json.loads(result.read_text())
        except (OSError, ValueError):
            data = None
        if isinstance(data, dict) and data.get("id") == ident:
            return data
        time.sleep(0.05)
    raise TimeoutError(f"no answer from pid {pid} within {timeout:.0f} s (is it a `policyc run` whose state "
                       f"directory is {state_dir}?)")


def ask_socket(socket_path: str, path: str | None, *, timeout: float = 60.0) -> dict[str, Any]:
    """`policyc reload --socket`: one request line, one result line. Raises OSError, ValueError."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(socket_path)
        s.sendall((json.dumps({"reload": os.path.abspath(path) if path else None}) + "\n").encode())
        return json.loads(_read_line(s))


def _listen(path: str) -> socket.socket:
    """A non-blocking listening socket at `path`, 0600. A socket file an earlier run left is replaced;
    one a live run answers on is not (OSError)."""
    if Path(path).is_socket():
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            try:
                probe.connect(path)
            except OSError:
                os.unlink(path)                # nobody answers: left by a run that ended
            else:
                raise OSError(f"{path}: another policyc run answers on this control socket")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)                      # 0600: whoever may reload may change the protection
    try:
        s.bind(path)
    finally:
        os.umask(old)
    s.listen(4)
    s.setblocking(False)
    return s


def _read_line(conn: socket.socket) -> str:
    buf = b""
    while b"\n" not in buf and len(buf) < MAX_REQUEST:
        chunk = conn.recv(4096)
        if not chunk:
            break
        buf += chunk
    return buf.split(b"\n", 1)[0].decode("utf-8")
