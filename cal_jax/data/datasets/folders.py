"""Reading a data set folder as its owners distribute it, and refusing anything else.

`DatasetLayoutError` (a ValueError) says what was expected, what was found and
what to do; the readers below (folders, id files, index files, identity
folders) raise it, naming the file. `records` lists the images with them.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable

from cal_jax.data.datasets import specs

# The folder names under which the owners distribute each data set; used by
# `find_root` when given the folder above the data set.
DISTRIBUTED_NAMES = {short: spec.distributed_name for short, spec in specs.BY_SHORT.items()}
TOP_LEVEL = {
  'sysu': [f'cam{c}/' for c in range(1, 7)] + ['exp/'],
  'regdb': ['Visible/', 'Thermal/', 'idx/'],
  'llcm': ['vis/', 'nir/', 'test_vis/', 'test_nir/', 'idx/'],
}
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
IMAGE_SUFFIXES = ('.jpg', '.jpeg', '.png', '.bmp')


class DatasetLayoutError(ValueError):
  """A data set folder is missing, empty, partly copied or not as distributed.

  Attributes: layout, root, problem, expected and found (lists of entries).
  """

  def __init__(
    self, layout: str, root: str, problem: str, expected: Iterable[str], found: Iterable[str]
  ):
    self.layout, self.root, self.problem = layout, root, problem
    self.expected, self.found = list(expected), list(found)
    name = DISTRIBUTED_NAMES.get(layout, layout)
    super().__init__(
      f'{name} folder {root!r}: {problem}\n'
      f'  expected: {shorten(self.expected)}\n'
      f'  found:    {shorten(self.found) or "nothing"}\n'
      f'  to do:    {_HINTS.get(layout, "")} See docs/data.md.'
    )


def shorten(items: list[str]) -> str:
  shown = ', '.join(items[:MAX_LISTED])
  more = len(items) - MAX_LISTED
  return shown + (f', ... ({more} more)' if more > 0 else '')


def entries(folder: str) -> list[str]:
  """Sorted names in `folder`, folders with a trailing '/'; [] if absent."""
  if not os.path.isdir(folder):
    return []
  return sorted(
    n + '/' if os.path.isdir(os.path.join(folder, n)) else n for n in os.listdir(folder)
  )


def images_in(folder: str) -> list[str]:
  return sorted(
    n
    for n in os.listdir(folder)
    if n.lower().endswith(IMAGE_SUFFIXES) and os.path.isfile(os.path.join(folder, n))
  )


def require(layout: str, root: str, dirs: Iterable[str], files: Iterable[str]) -> None:
  """Raises unless `root` holds the folders `dirs` and the files `files`."""
  dirs, files = list(dirs), list(files)
  missing = [d + '/' for d in dirs if not os.path.isdir(os.path.join(root, d))]
  missing += [f for f in files if not os.path.isfile(os.path.join(root, f))]
  if missing:
    # What is there: the root, and each folder in which something is missing.
    parents = sorted({os.path.dirname(m.rstrip('/')) for m in missing} | {''})
    found = [f'{p}/{e}' if p else e for p in parents for e in entries(os.path.join(root, p))]
    problem = (
      'the folder does not exist'
      if not os.path.isdir(root)
      else 'it is empty'
      if not found
      else 'missing ' + ', '.join(missing)
    )
    raise DatasetLayoutError(layout, root, problem, [d + '/' for d in dirs] + files, found)


def read_id_line(layout: str, root: str, rel: str) -> list[int]:
  """Ids of an id file (SYSU exp/, LLCM idx/test_id.txt).

  The distributed files hold one line of comma-separated ids; copies edited
  or re-saved elsewhere may have a byte-order mark, Windows line ends, a
  trailing comma, spaces, or one id per line. Every form is read whole: ids
  are the integers separated by commas and white space. Anything else in the
  file is refused, named.
  """
  with open(os.path.join(root, rel), encoding='utf-8-sig') as f:
    text = f.read()
  tokens = [t for t in re.split(r'[,\s]+', text) if t]
  bad = [t for t in tokens if not t.isdigit()]
  if bad or not tokens:
    raise DatasetLayoutError(
      layout,
      root,
      f'{rel} holds no id list'
      if not tokens
      else f'{rel} holds entries that are not identity numbers',
      [f'{rel}: identity numbers separated by commas (one line, as distributed) or by line breaks'],
      [repr(t) for t in bad] or [repr(text[:80])],
    )
  return [int(t) for t in tokens]


def check_disjoint(
  layout: str, root: str, train: dict[str, set[int]], test: dict[str, set[int]]
) -> None:
  """Refuses identities listed for training and for test: they would leak."""
  found = []
  for train_file, train_ids in train.items():
    for test_file, test_ids in test.items():
      both = sorted(train_ids & test_ids)
      if both:
        found.append(
          f'{len(both)} ids in both {train_file} and {test_file}: '
          f'{", ".join(map(str, both[:MAX_LISTED]))}' + (' ...' if len(both) > MAX_LISTED else '')
        )
  if found:
    raise DatasetLayoutError(
      layout,
      root,
      'identities listed for both training and test (test identities would '
      'be trained on): ' + '; '.join(found),
      ['disjoint training and test identities, as distributed'],
      found,
    )


def read_index(layout: str, root: str, rel: str) -> list[str]:
  """Relative image paths of a `relative/path label` index file, checked."""
  paths, bad = [], []
  with open(os.path.join(root, rel), encoding='utf-8') as f:
    for number, line in enumerate(f, 1):
      fields = line.split()
      if not fields:
        continue
      if len(fields) != 2:
        bad.append(f'line {number}: {line.strip()!r}')
      paths.append(fields[0].replace('\\', '/'))
  if bad or not paths:
    raise DatasetLayoutError(
      layout,
      root,
      f'{rel} is not a list of `relative/path label` lines',
      [f'{rel}: lines `relative/path label`'],
      bad or ['an empty file'],
    )
  missing = [p for p in paths if not os.path.isfile(os.path.join(root, p))]
  if missing:
    raise DatasetLayoutError(
      layout,
      root,
      f'{len(missing)} of the {len(paths)} images listed in {rel} are missing (a partial copy?)',
      [f'every image listed in {rel}'],
      ['missing: ' + m for m in missing],
    )
  return paths


def identity_folder(layout: str, root: str, path: str, depth: int) -> int:
  """The identity number of the folder `depth` levels into `path`."""
  parts = path.split('/')
  try:
    return int(parts[depth])
  except (IndexError, ValueError):
    raise DatasetLayoutError(
      layout,
      root,
      f'cannot read an identity folder in {path!r}',
      ['paths like ' + ('Visible/<id>/<file>' if layout == 'regdb' else 'cam<k>/<id>/<file>')],
      [path],
    ) from None


def identity_folders(layout: str, root: str, rel_dir: str) -> dict[int, str]:
  """{identity number: folder name} of the identity folders in `rel_dir`.

  The distributed folders are zero-padded (`0007`); a folder named `7` (a
  copy renamed by a tool) is read as identity 7. Two folders of one identity
  (`7` and `0007`), or a folder whose name is not a number, are refused,
  named: their images would otherwise be dropped or mixed without a word.
  Hidden entries (`.something`) and files are ignored.
  """
  folders, clashes, strange = {}, [], []
  for name in sorted(os.listdir(os.path.join(root, rel_dir))):
    if name.startswith('.') or not os.path.isdir(os.path.join(root, rel_dir, name)):
      continue
    if not name.isdigit():
      strange.append(f'{rel_dir}/{name}/')
      continue
    pid = int(name)
    if pid in folders:
      clashes.append(f'{rel_dir}/{folders[pid]}/ and {rel_dir}/{name}/')
    folders[pid] = name
  if strange or clashes:
    raise DatasetLayoutError(
      layout,
      root,
      'camera folders with folders that are not one identity each'
      + (f': {len(clashes)} identities have two folders' if clashes else '')
      + (f': {len(strange)} folder names are not identity numbers' if strange else ''),
      [f'{rel_dir}/<id>/, one folder per identity, named by its number (0007)'],
      ['two folders of one identity: ' + c for c in clashes]
      + ['not an identity number: ' + n for n in strange],
    )
  return folders
