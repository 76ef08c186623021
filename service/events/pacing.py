"""How often the feed makes a round: as often as followers want while the
process has time to spare, less often while other work wants the event loop.

A round writes one message to every follower with news, and a message
costs about the same whatever it carries (a bare grpc.aio server spends
about 30 µs of CPU on one, most of it on the event loop's thread). With
1,000 followers and a round every 50 ms that is 20,000 messages a second:
unary calls beside them kept 0.3 of their rate (bench/fanout.py). Rounds
further apart carry more events per message, and the feed's cost per event
falls with them; what rises is the followers' delay. Paced as below,
GetOrder beside 1,000 followers kept 0.91-0.96 of its rate, and their lag
p99 was 63 ms with no other load, 0.41-0.45 s beside GetOrder
(docs/benchmarks.md#pacing).

So the interval depends on what else the loop has to do:

- While the loop has time to spare between rounds, rounds come at the base
  interval (`EventFeed._base_interval`: 20 ms, up to 50 ms for 1,000
  followers), and the lag stays within it plus the fan-out.
- While other work keeps the loop busy between rounds (the thread's CPU
  over that time at least BUSY of it), rounds come far enough apart that
  the fan-out takes at most SHARE of the loop's time: the interval is the
  fan-out's duration divided by SHARE, between the base interval and
  `busy_interval` (ORDERSTREAM_FEED_BUSY_INTERVAL). A few followers make
  a short fan-out and keep short rounds; a thousand make a long one.

The fan-out's duration is measured from the moment a round wakes the
followers to the moment most of them (90% of those woken, `tail.SETTLED`)
are waiting again (`Tail.settled_at`): a follower whose reader is slow does not stretch
it. The loop counts as busy through the fan-out, so the work measured is
what ran between the fan-out's end and the next round, added up until it
covers JUDGED_WINDOW. A round whose fan-out has not ended by the next one
adds nothing. Until the next judgement the interval follows the fan-out's
length as it was decided.
"""

from __future__ import annotations

import time
from collections.abc import Callable

BUSY = 0.5  # of the loop's time between rounds spent on other work
SHARE = 0.1  # of the loop's time the fan-out may take while it is busy
SMOOTHING = 0.5  # weight of the newest fan-out in the estimate of its length
# The loop's business is judged over at least this much time between
# fan-outs and rounds, added up over as many rounds as it takes: a single
# gap of 20 ms can be half filled by a young collection of the cycle
# collector or by the last followers of the fan-out, with nothing else to
# do.
JUDGED_WINDOW = 0.1


class RoundPacer:
    """The feed's interval between rounds; `round_made` is called at the
    end of each round (after it woke the followers, if it had news), on the
    event loop's thread."""

    def __init__(
        self,
        busy_interval: float,
        *,
        clock: Callable[[], float] = time.monotonic,
        thread_cpu: Callable[[], float] = time.thread_time,
    ) -> None:
        self._busy_interval = busy_interval
        self._clock = clock
        self._thread_cpu = thread_cpu
        self._woken_at: float | None = None
        self._cpu_at_wake = 0.0
        self._fan_out: float | None = None  # smoothed, in seconds
        self._window = 0.0  # time between fan-outs and rounds not yet judged
        self._other_work = 0.0  # the loop's CPU in that time
        self._stretched = False

    def round_made(self, settled_at: float, base: float) -> float:
        """The interval before the next round. `settled_at`: when most
        followers woken by the previous round were waiting again (the
        tail's clock); `base`: the interval while the loop is not busy."""
        now, cpu = self._clock(), self._thread_cpu()
        woken_at, cpu_at_wake = self._woken_at, self._cpu_at_wake
        self._woken_at, self._cpu_at_wake = now, cpu
        if woken_at is None or not woken_at < settled_at < now:
            # The first round, or the fan-out has not ended yet.
            return self._interval(base)
        fan_out = settled_at - woken_at
        self._fan_out = (
            fan_out
            if self._fan_out is None
            else SMOOTHING * fan_out + (1 - SMOOTHING) * self._fan_out
        )
        self._window += now - settled_at
        self._other_work += cpu - cpu_at_wake - fan_out
        if self._window >= JUDGED_WINDOW:
            self._stretched = self._other_work >= BUSY * self._window
            self._window = self._other_work = 0.0
        return self._interval(base)

    def _interval(self, base: float) -> float:
        if not self._stretched or self._fan_out is None:
            return base
        return max(base, min(self._busy_interval, self._fan_out / SHARE))
