"""Running under systemd: `policyc run` speaks the notify protocol (to a socket this test owns,
as systemd would), and the shipped unit passes `systemd-analyze verify`."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from policyc.runtime.service import Notifier, unit_text

ROOT = Path(__file__).resolve().parents[1]
KERNEL_INTEGRITY = ROOT / "examples" / "policies" / "linux-kernel-integrity.vmi"
STEADY = ROOT / "tests" / "data" / "scenarios" / "steady.yaml"


def _messages(sock: socket.socket, until: str, timeout: float = 60.0) -> list[str]:
    got: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            msg = sock.recv(4096).decode()
        except socket.timeout:
            break
        got.append(msg)
        if until in msg:
            return got
    raise AssertionError(f"no {until} in {got}")


def test_run_notifies_ready_after_protection_watchdog_and_stopping(tmp_path):
    from policyc.runtime.sim.host import connect

    notify = tmp_path / "notify.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(str(notify))
    host_sock = str(tmp_path / "host.sock")
    host_proc = subprocess.Popen([sys.executable, "-m", "policyc.runtime.sim.host", str(STEADY), "--socket",
                                  host_sock, "--forever", "--no-start"], stdout=subprocess.PIPE, text=True)
    enf = None
    try:
        assert host_proc.stdout.readline().strip() == "ready"
        host = connect(host_sock)
        env = {k: v for k, v in os.environ.items() if k != "WATCHDOG_PID"}
        env.update(NOTIFY_SOCKET=str(notify), WATCHDOG_USEC="200000")
        enf = subprocess.Popen([sys.executable, "-m", "policyc", "run", str(KERNEL_INTEGRITY), "--guest",
                                f"simhost:{host_sock}", "--state-dir", str(tmp_path / "state")],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        first = _messages(listener, "READY=1")
        # READY only once protection is in place: the guest's monitors are already installed
        assert host.monitors() != {}
        assert first[-1].startswith("READY=1\nSTATUS=enforcing linux-kernel-integrity (sha256:")
        host.start_workload()
        pings = _messages(listener, "WATCHDOG=1")
        time.sleep(0.5)
        enf.send_signal(signal.SIGTERM)
        rest = _messages(listener, "STOPPING=1")
        assert enf.wait(30) == 0, enf.stderr.read()
        pings += rest
        assert sum(m == "WATCHDOG=1" for m in pings) >= 3      # about every 0.1 s while answering
        assert "teardown clean" in enf.stderr.read()
    finally:
        if enf is not None and enf.poll() is None:
            enf.kill()
        host_proc.terminate()
        host_proc.wait(10)
        listener.close()


def test_notifier_outside_systemd_does_nothing_and_survives_a_gone_socket(tmp_path):
    n = Notifier({})
    assert not n.enabled
    n.ready("x"); n.watchdog(); n.stopping()
    gone = Notifier({"NOTIFY_SOCKET": str(tmp_path / "nobody.sock"), "WATCHDOG_USEC": "1000"})
    gone.ready("x")
    gone.watchdog()
    assert gone.errors == 2          # counted, never raised: enforcement goes on


def test_watchdog_pings_at_half_the_interval(tmp_path):
    now = [0.0]
    notify = tmp_path / "notify.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(str(notify))
    listener.setblocking(False)
    n = Notifier({"NOTIFY_SOCKET": str(notify), "WATCHDOG_USEC": "1000000"}, clock=lambda: now[0])
    sent: list[str] = []
    try:
        for t in (0.0, 0.1, 0.49, 0.5, 0.9, 1.0):
            now[0] = t
            n.watchdog()
            try:
                sent.append(f"{t}: " + listener.recv(4096).decode())
            except BlockingIOError:
                pass
    finally:
        n.close()
        listener.close()
    assert sent == ["0.0: WATCHDOG=1", "0.5: WATCHDOG=1", "1.0: WATCHDOG=1"]
    # a watchdog meant for another process (WATCHDOG_PID) is not ours to ping
    assert Notifier({"NOTIFY_SOCKET": "/x", "WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "1"}).watchdog_every == 0


def test_the_unit_verifies(tmp_path):
    if shutil.which("systemd-analyze") is None:
        print("SKIP: systemd-analyze is not installed")
        pytest.skip("systemd-analyze is not installed")
    unit = tmp_path / "policyc@.service"
    unit.write_text(unit_text())
    p = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "Type=notify" in unit.read_text() and "WatchdogSec=" in unit.read_text()
    out = subprocess.run([sys.executable, "-m", "policyc", "service-unit"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout == unit_text()
