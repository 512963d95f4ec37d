"""The kinds of rule a config field can have: its type and its valid range, each able to
say what is wrong with a value in words (`problem(value)` -> None or "must be ...").

  Int, Float, Bool, Choice, IntChoice, Text   one value
  OddSizes                                    a tuple of odd kernel sizes (DRM's pools)
  Stages                                      a subset of the ResNet stages (remat)
  describe_range                              ' in [0, 1]', ' > 0', ...: a range in words
"""

import dataclasses
import math
from collections.abc import Sequence
from typing import Any


def describe_range(
  low: float | None,
  high: float | None,
  low_open: bool = False,
  high_open: bool = False,
  note: str = '',
) -> str:
  """' in [0, 1]', ' > 0', ' <= 10' or '' (with ' (note)'): the text of a rule's range."""
  num = lambda x: str(x) if isinstance(x, int) else f'{x:g}'
  if low is not None and high is not None:
    text = f' in {"(" if low_open else "["}{num(low)}, {num(high)}{")" if high_open else "]"}'
  elif low is not None:
    text = f' {">" if low_open else ">="} {num(low)}'
  elif high is not None:
    text = f' {"<" if high_open else "<="} {num(high)}'
  else:
    text = ''
  return text + (f' ({note})' if note else '')


@dataclasses.dataclass(frozen=True)
class Int:
  low: int | None = None
  high: int | None = None
  note: str = ''

  def problem(self, value: Any) -> str | None:
    if isinstance(value, bool) or not isinstance(value, int):
      return f'must be an integer{self._range()}'
    if (self.low is not None and value < self.low) or (self.high is not None and value > self.high):
      return f'must be an integer{self._range()}'
    return None

  def _range(self) -> str:
    return describe_range(self.low, self.high, note=self.note)


@dataclasses.dataclass(frozen=True)
class Float:
  low: float | None = None
  high: float | None = None
  low_open: bool = False
  high_open: bool = False
  note: str = ''

  def problem(self, value: Any) -> str | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
      return f'must be a finite number{self._range()}'
    if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
      return f'must be a number{self._range()}'
    if self.high is not None and (value > self.high or (self.high_open and value == self.high)):
      return f'must be a number{self._range()}'
    return None

  def _range(self) -> str:
    return describe_range(self.low, self.high, self.low_open, self.high_open, self.note)


@dataclasses.dataclass(frozen=True)
class Bool:
  def problem(self, value: Any) -> str | None:
    return None if isinstance(value, bool) else 'must be True or False'


@dataclasses.dataclass(frozen=True)
class Choice:
  choices: tuple[str, ...]
  note: str = ''

  def problem(self, value: Any) -> str | None:
    if isinstance(value, str) and value in self.choices:
      return None
    return f'must be one of {", ".join(repr(c) for c in self.choices)}' + (
      f' ({self.note})' if self.note else ''
    )


@dataclasses.dataclass(frozen=True)
class IntChoice:
  choices: tuple[int, ...]

  def problem(self, value: Any) -> str | None:
    if isinstance(value, int) and not isinstance(value, bool) and value in self.choices:
      return None
    return f'must be one of {", ".join(str(c) for c in self.choices)}'


@dataclasses.dataclass(frozen=True)
class Text:
  """A string (a path, checked with the other fields in `_cross_checks`)."""

  def problem(self, value: Any) -> str | None:
    return None if isinstance(value, str) else 'must be a string'


@dataclasses.dataclass(frozen=True)
class OddSizes:
  """A non-empty sequence of odd positive integers (pooling window sizes)."""

  def problem(self, value: Any) -> str | None:
    ok = (
      isinstance(value, Sequence)
      and not isinstance(value, str)
      and len(value) > 0
      and all(
        isinstance(v, int) and not isinstance(v, bool) and v >= 1 and v % 2 == 1 for v in value
      )
    )
    return (
      None
      if ok
      else (
        'must be a non-empty tuple of odd integers >= 1 (stride-1 max '
        'pooling keeps the map size only for odd windows)'
      )
    )


@dataclasses.dataclass(frozen=True)
class Stages:
  """A tuple of distinct ResNet stage numbers, each 1-4 (possibly empty)."""

  def problem(self, value: Any) -> str | None:
    ok = (
      isinstance(value, Sequence)
      and not isinstance(value, str)
      and all(isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= 4 for v in value)
      and len(set(value)) == len(value)
    )
    return None if ok else 'must be a tuple of distinct ResNet stages 1-4, e.g. (3, 4), or ()'
