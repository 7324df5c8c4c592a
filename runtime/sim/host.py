"""A simulated host in a process of its own, so that the guest outlives the enforcer.

On a real host the guest keeps running when the enforcer is killed; with the
in-process simulator it would die with it. This module serves a scenario's
`SimulatedXen` over a Unix socket (multiprocessing.managers), while a
workload thread runs the scenario's steps, over and over if asked, each
waiting while its vCPU is paused for whichever enforcer is attached. The
enforcer connects with `policyc run --guest simhost:SOCKET`, and after a
SIGKILL `policyc recover --guest simhost:SOCKET` reaches the same guest.
The tests of teardown and recovery use it; it is also a way to watch
`policyc run` work on a guest that does not stop.

    python -m policyc.runtime.sim.host SCENARIO --socket PATH [--repeat N | --forever]

It prints ``ready`` on stdout once it serves. Every call runs under one lock
(the simulator is single-threaded). The socket is created with the process's
umask and the manager's fixed key: a test harness for one user, not a
service.

What differs from real Xen: a process that did not attach the ring can still
reach it (real Xen removes the ring page from the physmap, XEN-SEMANTICS §7),
so recovery finds the dead agent's requests and answers them; the
disable / re-enable path is tested in tests/test_install.py.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import signal
import sys
import threading
import time
from multiprocessing.managers import BaseManager
from typing import Any, Iterator

from .scenario import ScenarioError, ScenarioRunner, Step, build_scenario, load_scenario
from .xen import SimulatedXen

__all__ = ["HostedXen", "connect", "serve", "AUTHKEY"]

AUTHKEY = b"policyc-simhost"
_POLL = 0.0005

# The Backend protocol and the optional methods install and recover look for.
_FORWARDED = (
    "capabilities", "close", "reattach", "pause", "unpause", "paused_vcpus", "is_paused", "set_access",
    "get_access", "populated_frames", "altp2m_set_state", "altp2m_get_state", "create_view", "destroy_view",
    "switch_view", "current_view", "change_gfn", "add_frame", "remove_frame", "monitor_write_ctrlreg",
    "monitor_control_registers",
    "monitor_mov_to_msr", "monitor", "monitors", "read_physical", "write_physical", "get_registers",
    "set_registers", "inject_exception", "take_requests", "put_responses", "notify", "single_stepping",
    "unconsumed_requests", "domain_identity",
)


class HostedXen:
    """The served object: the Backend calls of `SimulatedXen` under a lock, plus workload control."""

    def __init__(self, xen: SimulatedXen, runner: ScenarioRunner, *, repeat: int | None) -> None:
        self._xen = xen
        self._runner = runner
        self._lock = threading.RLock()
        self._repeat = repeat
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.iterations = 0
        self.operations = 0
        self.waiting = False
        self.error: str | None = None

    # -- the Backend, forwarded under the lock (methods are made below the class)
    def populated_frames(self) -> list[int]:            # a list: a generator cannot cross the socket
        with self._lock:
            return list(self._xen.populated_frames())

    def monitors(self) -> dict:
        with self._lock:
            return dict(self._xen.monitors())

    def wait(self, timeout: float) -> bool:
        """Block until a request is on the ring (True) or `timeout` passes (False)."""
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                if self._xen.wait(0):
                    return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(_POLL)

    # -- workload
    def start_workload(self) -> None:
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._work, name="workload", daemon=True)
        self._thread.start()

    def stop_workload(self, timeout: float = 10.0) -> bool:
        """Stop after the current operation; True when the workload thread ended."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            return not self._thread.is_alive()
        return True

    def status(self) -> dict[str, Any]:
        with self._lock:
            return {"iterations": self.iterations, "operations": self.operations, "waiting": self.waiting,
                    "started": self._thread is not None,
                    "running": self._thread is not None and self._thread.is_alive(),
                    "paused_vcpus": sorted(self._xen.paused_vcpus()), "error": self.error,
                    "responses_consumed": self._xen.responses_consumed}

    def snapshot(self, ignore_registers: tuple[str, ...] = ("rip", "pc")) -> dict[str, Any]:
        """`state_snapshot` with memory as a digest and registers without `ignore_registers` (the
        workload's own instructions move rip; its reads load rax)."""
        with self._lock:
            snap = self._xen.state_snapshot(memory=True)
            mem = snap.pop("memory")
            h = hashlib.sha256()
            zero = bytes(len(next(iter(mem.frames.values()), b"")))
            for gfn in sorted(mem.frames):
                if mem.frames[gfn] != zero:      # as MemorySnapshot compares: unpopulated reads as zeros
                    h.update(gfn.to_bytes(8, "little"))
                    h.update(mem.frames[gfn])
            snap["memory"] = h.hexdigest()
            snap["registers"] = tuple(tuple(kv for kv in regs if kv[0] not in ignore_registers)
                                      for regs in snap["registers"])
            return snap

    def _work(self) -> None:
        n = 0
        try:
            while not self._stop.is_set() and (self._repeat is None or n < self._repeat):
                for step in self._flat(self._runner.scenario.steps):
                    if self._stop.is_set():
                        return
                    with self._lock:
                        op = self._runner.start_step(step)
                    while True:
                        with self._lock:
                            if op.done or self._xen.crashed:
                                self.waiting = False
                                break
                            self.waiting = True
                        if self._stop.is_set():
                            return
                        time.sleep(_POLL)
                    with self._lock:
                        self.operations += 1
                n += 1
                with self._lock:
                    self.iterations = n
        except Exception as exc:  # noqa: BLE001 - reported through status()
            self.error = f"{type(exc).__name__}: {exc}"

    def _flat(self, steps: list[Step]) -> Iterator[Step]:
        for s in steps:
            if s.op == "loop":
                for _ in range(self._runner.loop_count(s)):
                    yield from self._flat(s.body)
            elif s.op == "parallel":
                yield from (b for b in s.body if b.op != "reload")
            elif s.op != "reload":      # the enforcer's step: here it reloads on SIGHUP or `policyc reload`
                yield s


def _forward(name: str) -> Any:
    def call(self: HostedXen, *args: Any, **kwargs: Any) -> Any:
        with self._lock:
            return getattr(self._xen, name)(*args, **kwargs)
    call.__name__ = name
    call.__doc__ = f"SimulatedXen.{name}, under the host's lock."
    return call


for _name in _FORWARDED:
    if _name not in HostedXen.__dict__:
        setattr(HostedXen, _name, _forward(_name))


class _Manager(BaseManager):
    pass


def serve(scenario_path: str, socket_path: str, *, repeat: int | None, start: bool = True) -> None:
    """Serve until SIGTERM/SIGINT."""
    scenario = load_scenario(scenario_path)
    xen = build_scenario(scenario)
    hosted = HostedXen(xen, ScenarioRunner(scenario, xen), repeat=repeat)
    _Manager.register("host", callable=lambda: hosted)
    try:
        os.unlink(socket_path)
    except FileNotFoundError:
        pass
    manager = _Manager(address=socket_path, authkey=AUTHKEY)
    server = manager.get_server()

    def bye(_signum: int, _frame: Any) -> None:
        hosted.stop_workload(1.0)
        try:
            os.unlink(socket_path)
        finally:
            os._exit(0)

    signal.signal(signal.SIGTERM, bye)
    signal.signal(signal.SIGINT, bye)
    if start:
        hosted.start_workload()
    print("ready", flush=True)
    server.serve_forever()


def connect(socket_path: str) -> Any:
    """A proxy for the hosted simulator: a Backend, plus start/stop_workload, status, snapshot."""

    class _Client(BaseManager):
        pass

    _Client.register("host")
    m = _Client(address=socket_path, authkey=AUTHKEY)
    try:
        m.connect()
    except (OSError, EOFError) as exc:
        raise ConnectionError(f"no simulated host at {socket_path}: {exc}") from None
    return m.host()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m policyc.runtime.sim.host",
                                description="Serve a scenario's simulated guest on a Unix socket while its "
                                            "steps run; an enforcer attaches with --guest simhost:SOCKET.")
    p.add_argument("scenario")
    p.add_argument("--socket", required=True)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--repeat", type=int, default=1, help="run the steps this many times (default 1)")
    g.add_argument("--forever", action="store_true", help="run the steps until stopped")
    p.add_argument("--no-start", action="store_true", help="wait for start_workload() before running steps")
    args = p.parse_args(argv)
    try:
        serve(args.scenario, args.socket, repeat=None if args.forever else args.repeat, start=not args.no_start)
    except ScenarioError as exc:
        print(f"policyc simhost: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
