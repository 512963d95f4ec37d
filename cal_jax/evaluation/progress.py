"""The evaluation's progress on the terminal, as training has it: one line at most every
`every` seconds, with the count, the rate and the ETA, and one at the end if the work took
`every` seconds or more (a quick evaluation stays quiet):

  embedding infrared images 1,024/3,803 (26%)  310 images/s  ETA 9s
  protocol sysu/all/single: trial 4/10 (40%)  0.8 trials/s  ETA 7s
"""

import time
from collections.abc import Callable
from typing import Any

from cal_jax.runtime.terminal import format_duration, format_rate

EVERY_SECONDS = 10.0


class Progress:
  """`update(done)` as work is done; a line through `say` when due (and at `total`)."""

  def __init__(
    self,
    what: str,
    total: int,
    unit: str,
    say: Callable[[str], Any],
    every: float = EVERY_SECONDS,
    clock: Callable[[], float] = time.perf_counter,
  ):
    self.what, self.total, self.unit, self.say = what, total, unit, say
    self.every, self.clock = every, clock
    self.started = self.last = clock()

  def update(self, done: int, total: int | None = None) -> None:
    """`done` of `total` (default: the total given at the start; a host embedding its
    share of a multi-host evaluation gives its own)."""
    if total is not None:
      self.total = total
    now = self.clock()
    if now - self.last < self.every and (done < self.total or now - self.started < self.every):
      return
    self.last = now
    elapsed = max(now - self.started, 1e-9)
    rate = done / elapsed
    eta = (self.total - done) / rate if done else float('nan')
    self.say(
      f'{self.what} {done:,}/{self.total:,} ({100 * done // max(self.total, 1)}%)  '
      f'{format_rate(rate)} {self.unit}/s  ETA {format_duration(eta) if done else "?"}'
    )
