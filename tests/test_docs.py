"""The docs hold together: every relative link of the README and of docs/ reaches a file (and a
heading, for `#anchor` links, by GitHub's slug rule), every docs file a string names exists, and
every module a package docstring lists is there."""

import ast
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
DOCS = sorted([ROOT / 'README.md', *(ROOT / 'docs').rglob('*.md')])
LINK = re.compile(r'!?\[[^\]]*\]\(([^)\s]+)(?:\s+"[^"]*")?\)')
FENCE = re.compile(r'^\s*(```|~~~)')
CODE_SPAN = re.compile(r'`[^`]*`')


def prose_lines(text: str) -> list[str]:
  """The lines outside fenced code blocks."""
  lines, fenced = [], False
  for line in text.split('\n'):
    if FENCE.match(line):
      fenced = not fenced
      continue
    if not fenced:
      lines.append(line)
  return lines


def slug(heading: str) -> str:
  """GitHub's anchor of a heading: lowercase, punctuation but '-' and '_' dropped, spaces '-'."""
  text = LINK.sub(lambda m: m.group(0)[m.group(0).index('[') + 1 : m.group(0).index(']')], heading)
  text = re.sub(r'[^\w\- ]', '', text.strip().lower())
  return text.replace(' ', '-')


def anchors(path: pathlib.Path) -> set[str]:
  """Every heading's anchor in a markdown file, with GitHub's -1, -2 suffixes for repeats."""
  seen: dict[str, int] = {}
  found = set()
  for line in prose_lines(path.read_text()):
    match = re.match(r'^#{1,6}\s+(.*?)\s*#*\s*$', line)
    if not match:
      continue
    base = slug(match.group(1))
    count = seen.get(base, 0)
    seen[base] = count + 1
    found.add(base if count == 0 else f'{base}-{count}')
  return found


def links(path: pathlib.Path) -> list[str]:
  """The link targets of a markdown file, outside code blocks and code spans."""
  targets = []
  for line in prose_lines(path.read_text()):
    targets += LINK.findall(CODE_SPAN.sub('', line))
  return targets


def broken_links(path: pathlib.Path) -> list[str]:
  broken = []
  for target in links(path):
    if re.match(r'^[a-z][a-z0-9+.-]*:', target):  # http:, https:, mailto: ...
      continue
    file_part, _, anchor = target.partition('#')
    linked = (path.parent / file_part).resolve() if file_part else path
    if not linked.exists():
      broken.append(f'{target}: no such file')
    elif anchor and linked.suffix == '.md' and anchor not in anchors(linked):
      broken.append(f'{target}: no heading #{anchor} in {linked.name}')
  return broken


def test_slug_follows_github():
  assert slug("The paper's targets") == 'the-papers-targets'
  assert slug('Ablations (Tables 3-5)') == 'ablations-tables-3-5'
  assert slug('L_kd1: the attention collapse') == 'l_kd1-the-attention-collapse'
  assert slug('Speed (benchmarks/bench_metrics.py)') == 'speed-benchmarksbench_metricspy'


def test_the_checker_finds_a_broken_link(tmp_path):
  (tmp_path / 'other.md').write_text('# A heading\n\n```\n# not a heading\n```\n')
  page = tmp_path / 'page.md'
  page.write_text(
    '[ok](other.md) [ok](other.md#a-heading) [gone](missing.md) [bad](other.md#not-a-heading)\n'
    '`[in code](nowhere.md)` [web](https://example.com/x.md) [here](#nowhere)\n'
  )
  assert broken_links(page) == [
    'missing.md: no such file',
    'other.md#not-a-heading: no heading #not-a-heading in other.md',
    '#nowhere: no heading #nowhere in page.md',
  ]


@pytest.mark.parametrize('path', DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(path):
  assert broken_links(path) == []


def test_docs_files_named_in_the_repository_exist():
  """A message or a comment that sends the reader to a docs file names one that is there."""
  named = re.compile(r'docs/[\w./-]*\.md')
  sources = [ROOT / 'README.md', *(ROOT / 'docs').rglob('*.md')]
  for folder in ('cal_jax', 'configs', 'benchmarks', 'launch', 'tests'):
    sources += [p for p in (ROOT / folder).rglob('*') if p.suffix in ('.py', '.md', '.sh')]
  missing = sorted(
    f'{source.relative_to(ROOT)}: {name}'
    for source in sources
    for name in set(named.findall(source.read_text()))
    if not (ROOT / name).exists()
  )
  assert missing == []


def test_sections_named_with_a_docs_file_exist():
  """A docs file cited with a section in quotes, in a message, a comment or a doc, has it."""
  cited = re.compile(r'(docs/[\w./-]+\.md)`?,?\s*"([^"]{3,80})"')
  sources = [ROOT / 'README.md', *(ROOT / 'docs').rglob('*.md')]
  for folder in ('cal_jax', 'configs', 'benchmarks'):
    sources += [p for p in (ROOT / folder).rglob('*') if p.suffix in ('.py', '.md')]
  missing, checked = [], 0
  for source in sources:
    for name, section in cited.findall(source.read_text()):
      words = ' '.join(section.replace('#', ' ').split()[:3]).rstrip('.')
      target = ROOT / name
      if not target.exists():
        continue  # reported by test_docs_files_named_in_the_repository_exist
      checked += 1
      if words.lower() not in ' '.join(target.read_text().split()).lower():
        missing.append(f'{source.relative_to(ROOT)}: {name}, "{section}"')
  assert missing == []
  assert checked >= 10


def listed_modules(docstring: str) -> list[str]:
  """The modules a package docstring lists: `name   text` one a line, or `- `name`: text`."""
  names = []
  for line in docstring.split('\n'):
    table = re.match(r'^([a-z_][a-z0-9_]*/?)\s{2,}\S', line)
    bullet = re.match(r'^- `([a-z_][a-z0-9_]*/?)`:', line)
    if table or bullet:
      names.append((table or bullet).group(1))
  return names


def test_listed_modules_reads_both_forms():
  assert listed_modules('Title.\n\ndatasets/   the builders\nsplits      text\n') == [
    'datasets/',
    'splits',
  ]
  assert listed_modules('Title.\n\n- `cli`: the flags\n  more text\n- `checks`: rules\n') == [
    'cli',
    'checks',
  ]


def test_every_module_a_package_docstring_lists_exists():
  missing, listed = [], 0
  for init in sorted((ROOT / 'cal_jax').rglob('__init__.py')):
    docstring = ast.get_docstring(ast.parse(init.read_text())) or ''
    for name in listed_modules(docstring):
      listed += 1
      module = init.parent / name.rstrip('/')
      if not (module.with_suffix('.py').exists() or (module / '__init__.py').exists()):
        missing.append(f'{init.relative_to(ROOT)}: {name}')
  assert missing == []
  assert listed >= 20  # the lists are read at all (data, evaluation, training, config, runtime)
