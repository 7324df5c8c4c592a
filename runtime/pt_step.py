"""A write to a page-table entry that maps protected memory, stepped so that the binding follows it
before the guest runs on (runtime/decide.py uses it; runtime/enforce.py re-walks).

The guest's page tables change all the time, so such a write is allowed; but once it has landed, the
protected page may be another frame (a rootkit's remap: only the leaf entry changes), and until the
enforcer has re-walked and restricted that frame, writes through the protected address land there.
A write the plan steps over with FAST_SINGLESTEP ends without an event, so the re-walk could only
come after the guest had run on (seen live under Bochs 3.0, tests/lab/README.md). Here the write is
stepped with TOGGLE_SINGLESTEP instead: in the same view the plan's step uses, but with a SINGLESTEP
event once the instruction has retired. The enforcer re-walks while that event holds the vCPU, then
the response switches it back to the view it faulted in and turns stepping off.

Plans without FAST_SINGLESTEP (no monitor trap flag: x86_64-nomtf, arm64) are not changed here: their
re-walk stays after the response, and is retried at the next batch (runtime/enforce.py).
"""

from __future__ import annotations

from typing import Any

from ..native.constants import F_FAST_SS, F_TOGGLE_SS
from .vm_event_layout import FLAG_FOR_DATA, pack_response

# The plan response names the decision log shows for the two halves.
STEP_RESPONSE = "allow:step_page_table_write"
LANDED_RESPONSE = "page_table_write_landed"


class PageTableSteps:
    """Per vCPU, the page-table write being stepped: (gfn, offset, the view to go back to)."""

    def __init__(self, binding: Any) -> None:
        self.binding = binding
        self.pending: dict[int, tuple[int, int, int]] = {}

    def step(self, raw: bytes, idx: int, d: Any, gfn: int, offset: int, low: Any) -> bytes | None:
        """The response stepping an allowed write to (gfn, offset), or None when the plan does not step
        with FAST_SINGLESTEP here or no protected page depends on the entry written."""
        users = getattr(self.binding, "pt_entry_users", None)
        if low is None or low.altp2m_idx is None or users is None or not d.paused:
            return None
        if low.p2midx_faulting:
            back = idx
        elif low.p2midx is not None:
            back = low.p2midx
        else:
            return None
        if not users(gfn, offset):
            return None
        self.pending[d.vcpu] = (gfn, offset, back)
        d.response = STEP_RESPONSE
        flags = (low.flags & ~(F_FAST_SS | FLAG_FOR_DATA)) | F_TOGGLE_SS
        return pack_response(raw, flags, altp2m_idx=low.altp2m_idx)

    def landed(self, raw: bytes, d: Any) -> bytes | None:
        """The SINGLESTEP event after a stepped write: the decision names the write (`pt_write`, the
        enforcer re-walks before answering); the response goes back to the view and stops stepping.
        None when this vCPU was not stepping a page-table write."""
        step = self.pending.pop(d.vcpu, None)
        if step is None or not d.paused:
            return None
        gfn, offset, back = step
        d.pt_write = (gfn, offset)
        d.response = LANDED_RESPONSE
        d.note = "the page-table write retired: the binding follows it before the vCPU runs on"
        return pack_response(raw, F_TOGGLE_SS, altp2m_idx=back)
