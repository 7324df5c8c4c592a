"""Python's cyclic garbage collector around policyc's big, long-lived object graphs.

Checking or compiling a policy of 10,000 rules allocates millions of small,
acyclic objects that live until the pass ends. Each full collection walks all
of them (and the symbol table's 160,000 entries), so with the collector on, a
third of the time went to collections that free nothing. Reference counting
still frees everything acyclic at once; the collector resumes afterwards
(`gc_paused`).

An enforcer's plan, binding and lookup tables live as long as it enforces: it
freezes them (`freeze_long_lived`) so that full collections do not scan them
on the answering path. Frozen objects are never collected, so what a freeze
holds must be given back when it stops being long-lived: after a reload the
old plan's graph is garbage (`refreeze_long_lived`), and after teardown the
whole enforcer is (`release_long_lived`). Without that, each reload and each
enforcer of a process that runs many (the chaos harness, the tests) kept its
cyclic garbage for good: gigabytes over a few thousand runs.
"""

from __future__ import annotations

import contextlib
import gc
from typing import Iterator

__all__ = ["gc_paused", "freeze_long_lived", "refreeze_long_lived", "release_long_lived"]

_holders = 0          # enforcers of this process whose graphs are frozen


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """Pause the cyclic collector for the block (nested uses are fine); restore it after."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def freeze_long_lived() -> None:
    """Collect, then freeze everything alive: one more holder until `release_long_lived`."""
    global _holders
    _holders += 1
    gc.collect()
    gc.freeze()


def refreeze_long_lived() -> None:
    """A holder's graph changed (a reload replaced its plan): thaw, collect what was dropped, and
    freeze what is alive now."""
    gc.unfreeze()
    gc.collect()
    gc.freeze()


def release_long_lived() -> None:
    """A holder is done: thaw, so that its graph can be collected. Holders still running keep theirs
    frozen (collected first, so the dropped graph is not frozen again)."""
    global _holders
    _holders = max(0, _holders - 1)
    gc.unfreeze()
    if _holders:
        gc.collect()
        gc.freeze()
