"""CPython's cycle collector, set for a server that holds many streams.

CPython finds reference cycles in three generations of objects. With its
defaults, a young collection runs every 700 allocations (net of frees),
and an object that is still alive at two of them reaches the oldest
generation. A follow stream's objects for one feed round (its wait, its
write in flight, the message it shares with the others) live for tens of
milliseconds, longer than that: with 1,000 followers so many reached the
oldest generation that a full collection, which walks every object of the
process (about 130,000 with the followers), ran about twice a second and
took 50-75 ms each time, with the event loop stopped. Every follower's
delivery and every unary call in flight waited for it (bench/fanout.py:
lag p99 89-101 ms and GetOrder's p99 beside the followers 89-95 ms, with
the collector at its defaults).

Two changes, made once at start-up:

- The objects that exist once the service's modules are imported (about
  44,000: modules, classes, functions, protobuf descriptors) live as long
  as the process. `gc.freeze()` moves them where no collection walks them
  again. It is done before the pool, the server or any worker exists, so
  nothing that is dropped later (a pool connection, a call) is frozen with
  them: a frozen object in a cycle is never freed.
- A young collection every YOUNG_THRESHOLD allocations: most objects of a
  round are freed by then, so few reach the oldest generation, and full
  collections become rare.

With both, in the same benchmark: lag p99 59-65 ms, GetOrder's p99 beside
the followers 41-47 ms, one full collection in a run instead of about
fifty, and a young collection takes about 4 ms (docs/benchmarks.md#fan-out).
"""

from __future__ import annotations

import gc

YOUNG_THRESHOLD = 20_000


def settle() -> None:
    """Freezes what exists now and spaces young collections out. Call once
    the modules are imported, before the pool, the server or a worker
    exists."""
    gc.collect()
    gc.freeze()
    _, middle, oldest = gc.get_threshold()
    gc.set_threshold(YOUNG_THRESHOLD, middle, oldest)
