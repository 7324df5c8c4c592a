"""What the simulated domain holds: access codes, the operations a guest executes (`Op`), one p2m
(`P2M`: the host's or an altp2m view) and Xen's per-vCPU state (`VState`).
"""

from __future__ import annotations

from collections import deque
from typing import Any

from ..backend import ACCESS_VALUES
from .guest import GuestFault, VCpu
from .xen_profiles import INSN_LENGTH

R, W, X = 1, 2, 4
ACC_CODE = {name: i for i, name in enumerate(ACCESS_VALUES)}
A_N, A_R, A_W, A_RW, A_X, A_RX, A_WX, A_RWX, A_RX2RW, A_N2RWX, A_DEFAULT = range(11)
ALLOWED = (0, R, W, R | W, X, R | X, W | X, R | W | X, R | X, 0)
# W without R is an EPT misconfiguration on VMX [doc §3, table].
MISCONFIG_X86 = frozenset({A_W, A_WX})

MASK64 = (1 << 64) - 1
A64_OA = 0x0000_FFFF_FFFF_F000         # output-address bits of an AArch64 descriptor (47:12)

PHASE_EXEC, PHASE_FINISH = 0, 1


class Op:
    """One guest instruction and what became of it.

    ``took_effect``: did the instruction's architectural effect happen (the
    write landed, the register was loaded, the code at ``va`` ran...).
    ``requests`` / ``responses``: raw 400-byte events it caused / that
    answered them (when ``record`` is set; ``events`` counts either way).
    ``faults``: exceptions the guest received. ``livelock``: the instruction
    re-faulted identically `livelock_limit` times and the simulator gave up.
    """

    __slots__ = ("kind", "vcpu", "va", "size", "value", "rip", "insn_len", "reg", "msr",
                 "base", "limit", "leaf", "subleaf", "to_pa", "done", "phase", "took_effect",
                 "events", "requests", "responses", "faults", "livelock", "result", "attempts",
                 "last_key", "same", "record", "started", "emulated", "note")

    def __init__(self, kind: str, vcpu: int = 0, *, va: int | None = None, size: int = 8,
                 value: int = 0, rip: int | None = None, insn_len: int | None = None,
                 reg: str | None = None, msr: int | None = None, base: int = 0, limit: int = 0,
                 leaf: int | None = None, subleaf: int = 0, to_pa: int | None = None,
                 record: bool = True) -> None:
        if kind not in INSN_LENGTH:
            raise ValueError(f"unknown operation '{kind}'")
        self.kind = kind
        self.vcpu = vcpu
        self.va = va
        self.size = size
        self.value = value
        self.rip = rip
        self.insn_len = INSN_LENGTH[kind] if insn_len is None else insn_len
        self.reg = reg
        self.msr = msr
        self.base = base
        self.limit = limit
        self.leaf = leaf
        self.subleaf = subleaf
        self.to_pa = to_pa
        self.record = record
        self.done = False
        self.phase = PHASE_EXEC
        self.took_effect = False
        self.events = 0
        self.requests: list[bytes] = []
        self.responses: list[bytes] = []
        self.faults: list[GuestFault] = []
        self.livelock = False
        self.result: Any = None
        self.attempts = 0
        self.last_key: Any = None
        self.same = 0
        self.started = False
        self.emulated = False
        self.note = ""

    def __repr__(self) -> str:
        state = "done" if self.done else "pending"
        return (f"Op({self.kind}, vcpu={self.vcpu}, {state}, took_effect={self.took_effect}, "
                f"events={self.events}{', livelock' if self.livelock else ''})")


class P2M:
    """One p2m: the host's (index None) or an altp2m view.

    ``access``: gfn -> access code for entries that exist (for a view: the
    populated entries; a missing one is populated from the host on first
    use [xen arch/x86/mm/p2m.c p2m_altp2m_get_or_propagate]). ``frame``:
    gfn -> backing gfn where `change_gfn` remapped it. ``default``: the
    p2m's default_access.
    """

    __slots__ = ("index", "access", "frame", "default")

    def __init__(self, index: int | None, default: int) -> None:
        self.index = index
        self.access: dict[int, int] = {}
        self.frame: dict[int, int] = {}
        self.default = default


class VState:
    """Xen's per-vCPU state (what `struct vcpu` and `arch_vm_event` hold)."""

    __slots__ = ("v", "index", "queue", "pause", "blocked", "waiting", "view", "single_step",
                 "fast_ss", "set_gprs", "set_pc", "emulate", "do_write", "inject", "inject_sw", "last_op")

    def __init__(self, v: VCpu) -> None:
        self.v = v
        self.index = v.index
        self.queue: deque[Op] = deque()
        self.pause = 0                 # vm_event_pause_count
        self.blocked = False           # "black eye" from the ring throttle
        self.waiting: tuple | None = None   # sleeping on the ring's wait queue
        self.view = 0                  # altp2m index (when altp2m is active)
        self.single_step = False
        self.fast_ss: int | None = None
        self.set_gprs: tuple | None = None
        self.set_pc: int | None = None
        self.emulate: tuple | None = None   # (flags, data)
        self.do_write: dict[str, Any] = {}  # deferred CR/MSR writes (op 4)
        self.inject: GuestFault | None = None
        self.inject_sw = False         # the injection is a software exception (int3 re-injected)
        self.last_op: Op | None = None


