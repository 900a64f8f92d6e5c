"""The start-up heap, frozen, so that full garbage collections stop walking it.

CPython's full (generation 2) collection walks every object the collector tracks. A
relay process holds 70,000-100,000 of them once started (modules, SQLAlchemy's tables
and compiled statements, config, policy, TLS contexts), and under load the objects that
outlive the young generations set off a full collection every few seconds. Measured in
the bench (issue 9): 43-87 ms each, in the listener and in the main process, and for
all of it the event loop answers no one: every session in flight waits at once (one
source of stalls in the half-rate accept tail; the p99 did not visibly move on our
noisy machine, see docs/performance.md, twelfth round). ``gc.freeze()`` moves
everything alive into the permanent generation, which no collection walks: full
collections then took 0.8-5 ms.

Frozen objects are never collected, so this runs once the process has started (after a
full collection, so no garbage is frozen with them) and again after a reload, which
first unfreezes so that what the old configuration left behind can go.
"""

from __future__ import annotations

import gc


def settle() -> int:
    """Collect, then freeze what is left; the number of objects frozen."""
    gc.unfreeze()
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()
