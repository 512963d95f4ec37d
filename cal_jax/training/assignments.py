"""M-hat's bookkeeping (Sec. 3.4): the part matchings counted per epoch, and M-hat.

Every train step reports how often each infrared-part -> visible-part
permutation was the optimal matching of Eq. (17) (`step.train_step`,
'assignment_counts', indexed by lexicographic permutation rank). The loop adds
them up per epoch; M-hat is the permutation counted most often in the last
finished epoch, or in the current one while no epoch has finished. The counts
of both epochs travel with every checkpoint, so a resumed run, `--mode eval`,
the pictures and the export all compute the same M-hat.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

from cal_jax.losses.match_distill import permutation_from_rank

_CURRENT, _LAST = 'epoch_counts', 'last_epoch_counts'  # their names in a checkpoint


def most_frequent_assignment(counts: np.ndarray, num_parts: int) -> np.ndarray:
  """M-hat: the permutation (infrared part k -> visible part M[k]) counted most often.

  Args:
    counts: [N_p!] counts indexed by lexicographic permutation rank.
    num_parts: N_p.
  Returns:
    int32 [N_p]; the identity when nothing was counted. Ties go to the lowest rank.
  """
  counts = np.asarray(counts)
  if counts.shape != (math.factorial(num_parts),):
    raise ValueError(
      f'assignment counts have shape {counts.shape}, expected ({num_parts}!,) '
      f'for config.model.num_parts={num_parts}'
    )
  if counts.sum() == 0:
    return np.arange(num_parts, dtype=np.int32)
  return permutation_from_rank(int(np.argmax(counts)), num_parts)


@dataclasses.dataclass
class AssignmentCounts:
  """The matchings counted in the epoch under way (`current`) and in the last one.

  Attributes:
    num_parts: N_p.
    current: int64 [N_p!], the epoch under way.
    last: int64 [N_p!], the last finished epoch (zeros before the first ends).
  """

  num_parts: int
  current: np.ndarray
  last: np.ndarray

  @classmethod
  def zeros(cls, num_parts: int) -> AssignmentCounts:
    zeros = np.zeros(math.factorial(num_parts), np.int64)
    return cls(num_parts, zeros, zeros.copy())

  @classmethod
  def from_json(cls, extra: dict[str, Any], num_parts: int) -> AssignmentCounts:
    """The counts a checkpoint's `extra` holds (`to_json`)."""
    return cls(num_parts, np.asarray(extra[_CURRENT], np.int64), np.asarray(extra[_LAST], np.int64))

  def to_json(self) -> dict[str, list[int]]:
    return {_CURRENT: self.current.tolist(), _LAST: self.last.tolist()}

  def add(self, counts: Any) -> None:
    """Adds the counts of some steps of the current epoch ([N_p!], host or device)."""
    self.current = self.current + np.asarray(counts, np.int64)

  def end_epoch(self) -> None:
    self.last, self.current = self.current, np.zeros_like(self.current)

  def m_hat(self) -> np.ndarray:
    """M-hat, int32 [N_p]: of the last finished epoch, else of the current one."""
    counts = self.last if self.last.sum() else self.current
    return most_frequent_assignment(counts, self.num_parts)
