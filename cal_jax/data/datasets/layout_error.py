"""What a data set folder that is not as distributed says: `DatasetLayoutError`."""

from __future__ import annotations

from collections.abc import Iterable

from cal_jax.data.datasets import specs

# The folder names under which the owners distribute each data set; used by
# `find_root` when given the folder above the data set.
DISTRIBUTED_NAMES = {short: spec.distributed_name for short, spec in specs.BY_SHORT.items()}
TOP_LEVEL = {'sysu': [f'cam{c}/' for c in range(1, 7)] + ['exp/'],
             'regdb': ['Visible/', 'Thermal/', 'idx/'],
             'llcm': ['vis/', 'nir/', 'test_vis/', 'test_nir/', 'idx/']}
_HINTS = {
    'sysu': 'Unzip the SYSU-MM01 archive as distributed, copy it whole, and '
            'point manual_dir at the folder holding cam1..cam6 and exp/.',
    'regdb': 'Unzip RegDB as distributed with its idx/ trial files (the copy '
             'the AGW authors, mangye16/Cross-Modal-Re-ID-baseline, hand out '
             'has them), copy it whole, and point manual_dir at the folder '
             'holding Visible/, Thermal/ and idx/.',
    'llcm': 'Unzip the LLCM archive as distributed, copy it whole, and point '
            'manual_dir at the folder holding vis/, nir/, test_vis/, test_nir/ '
            'and idx/.',
}
MAX_LISTED = 12


class DatasetLayoutError(ValueError):
  """A data set folder is missing, empty, partly copied or not as distributed.

  Attributes: layout, root, problem, expected and found (lists of entries).
  """

  def __init__(self, layout: str, root: str, problem: str,
               expected: Iterable[str], found: Iterable[str]):
    self.layout, self.root, self.problem = layout, root, problem
    self.expected, self.found = list(expected), list(found)
    name = DISTRIBUTED_NAMES.get(layout, layout)
    super().__init__(
        f'{name} folder {root!r}: {problem}\n'
        f'  expected: {shorten(self.expected)}\n'
        f'  found:    {shorten(self.found) or "nothing"}\n'
        f'  to do:    {_HINTS.get(layout, "")} See docs/data.md.')


def shorten(items: list[str]) -> str:
  shown = ', '.join(items[:MAX_LISTED])
  more = len(items) - MAX_LISTED
  return shown + (f', ... ({more} more)' if more > 0 else '')


def shorten(items: list[str]) -> str:
  shown = ', '.join(items[:MAX_LISTED])
  more = len(items) - MAX_LISTED
  return shown + (f', ... ({more} more)' if more > 0 else '')
