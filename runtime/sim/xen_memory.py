"""Data accesses and fetches: the page walk of each access (x86 and AArch64 stage 1) with a stage-2
permission check per page touched, the store, and the rootkit remap of a page-table entry.
"""

from __future__ import annotations

import struct

from ..guest_memory import FRAME_MASK, FRAME_SHIFT, FRAME_SIZE
from .guest import GuestFault, TranslationFault
from .guest_arm64 import EC_PC_ALIGN, Arm64TranslationFault
from .xen_state import A64_OA, ALLOWED, A_WX, A_X, MASK64, MISCONFIG_X86, R, W, X, Op, VState


class MemoryMixin:
    """SimulatedXen's data accesses and instruction fetches (x86 and AArch64 guests)."""

    def read_guest(self, vcpu: int, va: int, size: int, *, view: int | None = None) -> bytes:
        """What the guest would read at ``va`` in ``view`` (default: its current
        view), without permission checks or events."""
        s = self._vcpu(vcpu)
        p2m = self._p2m_of_index(view) if view is not None else self._cur(s)
        if self._a64:
            return self._read_guest_a64(s, va, size)
        out = bytearray()
        remap = p2m.frame if p2m is not None else None
        while size:
            w = self.guest.walk(s.v.cr3, va, remap)
            n = min(size, FRAME_SIZE - (va & FRAME_MASK))
            gfn = w.pa >> FRAME_SHIFT
            frame = remap.get(gfn, gfn) if remap else gfn
            out += self.guest.memory.read((frame << FRAME_SHIFT) | (w.pa & FRAME_MASK), n)
            va += n
            size -= n
        return bytes(out)

    def _translate(self, s: VState, op: Op, va: int, size: int, need: int) -> list | None:
        """Walk and check every page the access touches; returns
        [(gfn, offset, length, frame)] or None when the instruction stopped."""
        v = s.v
        p2m = self._cur(s)
        host = p2m is self._host
        acc = p2m.access
        default = p2m.default if host else -1
        remap = None if host else p2m.frame
        write = bool(need & W)
        fetch = need == X
        wp = bool(v.cr0 & 0x10000)
        nxe = bool(v.msrs.get(0xC0000080, 0) & 0x800)
        walk = self.guest.walk_fast
        allowed = ALLOWED
        pieces = []
        pos = 0
        while pos < size:
            a = va + pos
            res = walk(v.cr3, a, remap, write, fetch, wp, nxe)
            if type(res) is TranslationFault:
                for gfn, off in res.reads:
                    code = acc.get(gfn, default)
                    if code < 0 or not allowed[code] & R:
                        if self._ept(s, op, gfn, R, a, off, True):
                            return None
                self._fault(s, op, res.fault)
                return None
            pa, reads = res
            for gfn, off in reads:
                code = acc.get(gfn, default)
                if code < 0 or not allowed[code] & R:
                    if self._ept(s, op, gfn, R, a, off, True):
                        return None
            gfn = pa >> 12
            code = acc.get(gfn, default)
            if code < 0 or need & ~allowed[code] or code in MISCONFIG_X86:
                if self._ept(s, op, gfn, need, a, pa & 0xFFF, False):
                    return None
            n = 4096 - (a & 0xFFF)
            if n > size - pos:
                n = size - pos
            pieces.append((gfn, pa & 0xFFF, n, remap.get(gfn, gfn) if remap else gfn))
            pos += n
        return pieces

    def _op_data(self, s: VState, op: Op, need: int) -> None:
        if self._a64:
            self._op_data_a64(s, op, need)
            return
        pieces = self._translate(s, op, op.va, op.size, need)
        if pieces is None:
            return
        self._complete_data(s, op, pieces, need, view_frames=True)
        self._finish(s, op, native=True)

    def _complete_data(self, s: VState, op: Op, pieces: list, need: int, *, view_frames: bool,
                       write: bool = True, read_data: bytes | None = None) -> None:
        mem = self.guest.memory
        v = s.v
        if need == R or need == (R | W):
            if read_data is not None and need == R:
                data = read_data[:op.size] + bytes(max(0, op.size - len(read_data)))
            else:
                data = b"".join(mem.read(((f if view_frames else g) << FRAME_SHIFT) | off, n)
                                for g, off, n, f in pieces)
            old = int.from_bytes(data, "little")
            op.result = old
            if need == R:
                if op.size <= 8:
                    v.gpr["rax"] = old
                # A read fed by the monitor (SET_EMUL_READ_DATA) completes, but not with what memory
                # holds: the read the guest tried did not take effect.
                op.took_effect = read_data is None
            else:
                new = (old + op.value) & ((1 << (8 * op.size)) - 1)
                if write:
                    self._store(pieces, new.to_bytes(op.size, "little"), view_frames)
                    op.took_effect = True
                else:
                    op.took_effect = False
        else:
            if write:
                value = op.value
                data = value if isinstance(value, (bytes, bytearray)) else \
                    (value & ((1 << (8 * op.size)) - 1)).to_bytes(op.size, "little")
                self._store(pieces, bytes(data), view_frames)
                op.took_effect = True
            else:
                op.took_effect = False
        v.rip = (op.rip + op.insn_len) & 0xFFFFFFFFFFFFFFFF

    def _store(self, pieces: list, data: bytes, view_frames: bool) -> None:
        frames = self.guest.memory._frames
        pos = 0
        for g, off, n, f in pieces:
            gfn = f if view_frames else g
            frame = frames.get(gfn)
            if frame is None:
                self.guest.memory.populate(gfn)
                frame = frames[gfn]
            frame[off:off + n] = data[pos:pos + n]
            pos += n

    def _op_exec(self, s: VState, op: Op) -> None:
        if self._a64:
            self._op_exec_a64(s, op)
            return
        pieces = self._translate(s, op, op.va, 1, X)
        if pieces is None:
            return
        g, off, _n, frame = pieces[0]
        byte = self.guest.memory.read((frame << FRAME_SHIFT) | off, 1)[0]
        if byte == 0xCC:
            self._breakpoint(s, op)
            return
        op.result = byte
        op.took_effect = True
        s.v.rip = op.va + 1
        self._finish(s, op, native=True)

    def _stage_remap_store(self, op: Op, store_at: int, original: int, leaf_address: int, leaf: int,
                           oa_mask: int) -> None:
        """Make ``op`` the remap's one guest store: to the leaf at ``leaf_address`` when that is where
        the walk ended (``store_at``), else to the entry at ``store_at`` (holding ``original``) that
        links the table a split filled. The split's new leaf is written now, while that table is still
        unlinked (nobody watches its fresh frame), and the link undone, so that the store traps."""
        g = self.guest
        new_leaf = (leaf & ~oa_mask) | (op.to_pa & oa_mask)
        if store_at == leaf_address:
            new = new_leaf
        else:
            g.memory.write_u64(leaf_address, new_leaf)
            new = g.memory.read_u64(store_at)
            g.memory.write_u64(store_at, original)
        op.value = new
        op.size = 8
        op.result = store_at
        op.va = (g.direct_map_base + store_at) & MASK64

    def _prepare_remap(self, s: VState, op: Op) -> None:
        """The rootkit remap: rewrite the PTE of ``va`` to point at ``to_pa``, as a
        guest store to the paging entry through the direct map (so a
        write-protected page-table frame traps). A large page is split the way
        a guest splits one: new tables are filled in fresh frames (nobody
        watches those), then linked by one store to the large page's entry,
        and that store is the op's. With a 4 KiB page the store is to its PTE."""
        from ..paging import PageTables
        g = self.guest
        if g.direct_map_base is None:
            raise ValueError("remap needs a guest with a direct map")
        w = g.walk(s.v.cr3, op.va)
        store_at = w.pte_address
        original = g.memory.read_u64(store_at)
        if w.page_size != FRAME_SIZE:
            tables = PageTables(g.memory, s.v.cr3)
            while w.page_size != FRAME_SIZE:
                tables.split(op.va)
                w = g.walk(s.v.cr3, op.va)
        self._stage_remap_store(op, store_at, original, w.pte_address, g.memory.read_u64(w.pte_address),
                                0x000FFFFFFFFFF000)

    def _translate_a64(self, s: VState, op: Op, va: int, size: int, need: int) -> list | None:
        v = s.v
        g = self.guest
        acc, default = self._host.access, self._host.default      # no altp2m on arm64
        fetch = need == X
        access = "exec" if fetch else "write" if need & W else "read"
        report = X if fetch else W if need & W else R
        pieces = []
        pos = 0
        while pos < size:
            a = (va + pos) & MASK64
            try:
                t, reads = g.walk_vcpu(v, a, access)                   # type: ignore[attr-defined]
                fault = None
            except Arm64TranslationFault as exc:
                t, reads, fault = None, exc.reads, exc
            for gfn, off in reads:
                code = acc.get(gfn, default)
                if not ALLOWED[code] & R:
                    if fetch and code in (A_X, A_WX):
                        # Xen judges the abort by the fetch, which the entry allows: it returns to the
                        # guest with no event and the walk faults again, forever
                        # [xen arch/arm/mem_access.c p2m_mem_access_check].
                        self._livelock(s, op)
                        return None
                    if self._ept(s, op, gfn, R, a, off, True, X if fetch else R):
                        return None
            if fault is not None:
                self._abort(s, op, fault.fault)
                return None
            assert t is not None
            gfn = t.pa >> FRAME_SHIFT
            if need & ~ALLOWED[acc.get(gfn, default)]:
                if self._ept(s, op, gfn, need, a, t.pa & FRAME_MASK, False, report):
                    return None
            n = min(size - pos, FRAME_SIZE - (a & FRAME_MASK))
            pieces.append((gfn, t.pa & FRAME_MASK, n, gfn))
            pos += n
        return pieces

    def _abort(self, s: VState, op: Op, fault: GuestFault) -> None:
        """A synchronous exception the guest takes: FAR_EL1 and ESR_EL1 describe it."""
        v = s.v
        v.far = fault.address if fault.address is not None else 0       # type: ignore[union-attr]
        v.esr = fault.error_code or 0                                   # type: ignore[union-attr]
        self._fault(s, op, fault)

    def _op_data_a64(self, s: VState, op: Op, need: int) -> None:
        pieces = self._translate_a64(s, op, op.va, op.size, need)
        if pieces is None:
            return
        v = s.v
        width = (1 << (8 * op.size)) - 1
        if need & R:
            old = int.from_bytes(b"".join(self.guest.memory.read((g << FRAME_SHIFT) | off, n)
                                          for g, off, n, _f in pieces), "little")
            op.result = old
            if need == R:
                if op.size <= 8:
                    v.x[0] = old                                         # type: ignore[union-attr]
            else:
                self._store(pieces, ((old + op.value) & width).to_bytes(op.size, "little"), True)
        else:
            value = op.value
            data = bytes(value) if isinstance(value, (bytes, bytearray)) else (value & width).to_bytes(op.size, "little")
            self._store(pieces, data, True)
        op.took_effect = True
        v.rip = (op.rip + 4) & MASK64
        self._finish(s, op, native=True)

    def _op_exec_a64(self, s: VState, op: Op) -> None:
        v = s.v
        va = op.va & MASK64
        if va & 3:
            self._abort(s, op, GuestFault(EC_PC_ALIGN, "PC alignment fault", EC_PC_ALIGN << 26 | 1 << 25, va))
            return
        pieces = self._translate_a64(s, op, va, 4, X)
        if pieces is None:
            return
        gfn, off, _n, _f = pieces[0]
        insn = struct.unpack("<I", self.guest.memory.read((gfn << FRAME_SHIFT) | off, 4))[0]
        op.result = insn
        if insn & 0xFFE0001F == 0xD4000003:     # SMC #imm16: a planted breakpoint or the guest's own call
            self._op_smc(s, op)
            return
        op.took_effect = True
        v.rip = (va + 4) & MASK64
        self._finish(s, op, native=True)

    def _read_guest_a64(self, s: VState, va: int, size: int) -> bytes:
        out = bytearray()
        while size:
            t, _reads = self.guest.walk_vcpu(s.v, va)                  # type: ignore[attr-defined]
            n = min(size, FRAME_SIZE - (va & FRAME_MASK))
            out += self.guest.memory.read(t.pa, n)
            va = (va + n) & MASK64
            size -= n
        return bytes(out)

    def _prepare_remap_a64(self, s: VState, op: Op) -> None:
        """The rootkit remap on AArch64, as `_prepare_remap` does it on x86: one guest store, through
        the linear map, to the page descriptor of ``va`` (or, for a block, to the block descriptor,
        linking a table of smaller pages filled in fresh frames beforehand)."""
        g = self.guest
        if g.direct_map_base is None:
            raise ValueError("remap needs a guest with a linear map")
        try:
            t, _reads = g.walk_vcpu(s.v, op.va)                        # type: ignore[attr-defined]
        except Arm64TranslationFault as exc:
            raise ValueError(f"remap: {op.va:#x} does not translate ({exc.stage1})") from None
        tables = s.v.tables(g.memory)                                  # type: ignore[union-attr]
        store_at = t.descriptor_address
        original = g.memory.read_u64(store_at)
        while t.page_size != FRAME_SIZE:
            tables.split(op.va)
            t = tables.translate(op.va)
        self._stage_remap_store(op, store_at, original, t.descriptor_address, t.descriptor, A64_OA)
