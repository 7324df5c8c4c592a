"""Xen's side of the ring replaying recorded requests in C, behind an installed guest.

`ReplayBackend(backend, requests, total)` is the backend it wraps (a
`SimulatedXen` the plan is installed on: binding, traps and teardown go to it)
with the monitor ring swapped for a private one that `vm_ring_replay`
(native/ring.c) keeps full: on every `notify` it takes the published
responses (each must unpause a vCPU that waits for one, as Xen checks) and
puts the next recorded requests, cycling through them, until `total` were put.
No guest runs, so the enforcer's own cost per event is what a benchmark or a
storm test measures; the simulator's guest is what the recorded requests came
from.
"""

from __future__ import annotations

from typing import Any, Iterable, Sequence

from ...native import abi
from ...native.abi import extension

__all__ = ["ReplayBackend", "record_requests"]


def record_requests(plan: Any, symbols: Any, scenario: Any, state_dir: Any, **xen_options: Any) -> list[bytes]:
    """The requests the scenario's guest raises under the plan, in order (the Python engine answers);
    `xen_options` go to `build_scenario`."""
    from ..enforce import Enforcer
    from .scenario import ScenarioRunner, build_scenario

    xen = build_scenario(scenario, **xen_options)
    out: list[bytes] = []
    enforcer = Enforcer(plan, xen, symbols, guest="record", state_dir=state_dir,
                        observer=lambda pairs, reqs: out.extend(bytes(r) for r in reqs))
    enforcer.start()
    try:
        ScenarioRunner(scenario, xen, lambda _x: enforcer.service()).run()
    finally:
        enforcer.stop()
    return out


class ReplayBackend:
    """A backend whose ring is fed with recorded requests (see the module docstring)."""

    def __init__(self, backend: Any, requests: Sequence[bytes], total: int) -> None:
        if not requests:
            raise ValueError("nothing to replay")
        ffi, lib = extension()
        self._inner = backend
        self.total = total
        self.ring = abi.Ring()
        self._reqs = ffi.new("uint8_t[]", len(requests) * abi.EVENT_SIZE)
        ffi.memmove(self._reqs, b"".join(bytes(r) for r in requests), len(requests) * abi.EVENT_SIZE)
        self._state = ffi.new("struct vm_ring_replay *")
        self._state.reqs = ffi.cast("vm_event_request_t *", self._reqs)
        self._state.nreqs = len(requests)
        self._state.front = ring_front = self.ring._front
        self._state.limit = total
        self._front = ring_front
        self._lib = lib
        self._notify = (ffi.addressof(lib, "vm_ring_replay_notify"), ffi.cast("void *", self._state))
        self._wait = (ffi.addressof(lib, "vm_ring_replay_wait"), ffi.cast("void *", self._state))
        self.feed()

    def __getattr__(self, name: str) -> Any:          # install, teardown, capabilities: the guest's
        return getattr(self._inner, name)

    # -- what Xen's side of the ring did
    @property
    def put(self) -> int:
        return int(self._state.next)

    @property
    def answered(self) -> int:
        return int(self._state.answered)

    @property
    def wrong(self) -> int:
        """Responses that unpaused no waiting vCPU."""
        return int(self._state.wrong)

    def paused_vcpus(self) -> frozenset[int]:
        """vCPUs still waiting for a response."""
        return frozenset(v for v in range(256) if self._state.paused[v])

    def done(self) -> bool:
        return self.put >= self.total and self.ring.unconsumed_requests == 0

    def feed(self) -> int:
        return int(self._lib.vm_ring_replay(self.ring._front, self._state, self.total))

    # -- the monitor's side, as the backend protocol has it
    def native_ring(self) -> abi.Ring:
        return self.ring

    def native_notify(self) -> tuple[Any, Any]:
        """The kick as a C function and its argument: a native monitor calls it after each batch."""
        return self._notify

    def native_wait(self) -> tuple[Any, Any]:
        """The wait as a C function and its argument: the producer puts what it has at once."""
        return self._wait

    def take_requests(self, limit: int = 8) -> list[bytes]:
        return [r.raw for r in self.ring.take_requests(limit)]

    def put_responses(self, responses: Iterable[bytes]) -> None:
        self.ring.put_responses(responses)
        self.ring.push_responses()

    def notify(self) -> None:
        self.feed()

    def wait(self, timeout: float) -> bool:
        return self.ring.unconsumed_requests > 0
