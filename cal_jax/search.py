"""Command line: search a gallery folder for the people of a query folder.

  python -m cal_jax.search --model DIR_OR_FILE --query QUERY_DIR --query_modality infrared \
      --gallery GALLERY_DIR --gallery_modality visible --output OUT [--top_k 10] \
      [--threshold T] [--checkpoint STEP]

--model is a training workdir (its latest checkpoint, or --checkpoint) or an
exported `.safetensors` / `.pt` file (`cal_jax.convert`; needs torch). Images
are read recursively. When every image of both folders lies in a sub-folder,
the sub-folders name identities and the command also prints R1, mAP and mINP,
and draws OUT/scores.png: the best score of each query, for queries whose best
match is right and for those whose best match is wrong. A threshold between
the two humps rejects the wrong ones. --threshold T answers "no match" for a
query whose best score is below T.

Written to OUT: matches.csv (query, rank, gallery, score, one row per match;
rank 0 and gallery "no match" for a rejected query), matches.json (the same
per query, with the metrics if labelled), ranking.png (the first queries and
their top matches) and features.npz, the embedding cache: a second search
with the same model embeds only new images.
"""

import csv
import json
import os
import sys
import time

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

from cal_jax.runtime import terminal  # noqa: E402

if '--verbose' not in sys.argv[1:]:
  terminal.quiet_start()  # the libraries' lines to OUT/log.txt

import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from cal_jax.config import cli  # noqa: E402
from cal_jax.evaluation import gallery_search as search  # noqa: E402

_MODEL = flags.DEFINE_string('model', None, 'A training workdir, or an exported .safetensors/.pt.')
_CHECKPOINT = flags.DEFINE_integer('checkpoint', None, 'Workdir: the step (default: the latest).')
_QUERY = flags.DEFINE_string('query', None, 'Folder of query images.')
_QUERY_MODALITY = flags.DEFINE_enum('query_modality', None, ['visible', 'infrared'], 'Of --query.')
_GALLERY = flags.DEFINE_string('gallery', None, 'Folder of gallery images.')
_GALLERY_MODALITY = flags.DEFINE_enum(
  'gallery_modality', None, ['visible', 'infrared'], 'Of --gallery.'
)
_OUTPUT = flags.DEFINE_string('output', None, 'Folder for the results.')
_TOP_K = flags.DEFINE_integer('top_k', 10, 'Matches per query.', lower_bound=1)
_THRESHOLD = flags.DEFINE_float('threshold', None, 'Best score below it: "no match".')
_BATCH = flags.DEFINE_integer('batch_size', 64, 'Images per embedding call.', lower_bound=1)
_PICTURE_QUERIES = flags.DEFINE_integer('picture_queries', 6, 'Queries drawn in ranking.png.')
flags.DEFINE_boolean('verbose', False, "Show the libraries' lines too (else OUT/log.txt).")
flags.mark_flags_as_required(
  ['model', 'query', 'query_modality', 'gallery', 'gallery_modality', 'output']
)


class Model:
  """An embedding function and what it needs: image size, parts, flip, a cache key."""

  def __init__(self, source: str, checkpoint: int | None, batch_size: int):
    self.batch_size = batch_size
    if os.path.isdir(source):
      self._from_workdir(source, checkpoint)
    elif os.path.isfile(source):
      self._from_file(source)
    else:
      raise search.SearchInputError(
        f'--model {source!r} is neither a training workdir nor an exported file'
      )

  def _from_workdir(self, workdir: str, checkpoint: int | None) -> None:
    from cal_jax.evaluation import evaluator, run
    from cal_jax.interop import export
    from cal_jax.training.state import build_model

    if not os.path.isfile(os.path.join(workdir, 'config.json')):  # this command has no --config
      raise search.SearchInputError(
        f'--model {workdir!r} holds no config.json, so is not a training workdir of '
        'cal_jax.main: give a workdir, or an exported .safetensors/.pt file'
      )
    config = export.load_workdir_config(workdir)
    directory = os.path.join(workdir, 'checkpoints')
    if not os.path.isdir(directory):
      raise FileNotFoundError(f'no checkpoints in {workdir}: train first')
    export.checkpoint_step(directory, checkpoint)  # one exists (and --checkpoint, if given)
    state, m_hat, num_classes = export.restore_for_inference(directory, config, checkpoint)
    step = int(state.step)  # without --checkpoint: the latest intact one
    model = build_model(config, num_classes)
    embedding = config.model.embedding
    self.embed = run.make_embedder(model, state, m_hat, embedding)
    settings = evaluator.EvalSettings.from_config(config)  # the one-part rule's home
    self.image_size, self.num_parts, self.flip = (
      settings.image_size,
      settings.num_parts,
      settings.flip,
    )
    self.key = f'{os.path.realpath(workdir)}@{step}:{embedding}:{self.flip}'
    self.name = f'{workdir} (step {step})'

  def _from_file(self, path: str) -> None:
    try:
      import torch
    except ImportError as error:
      raise ImportError(
        f"--model {path}: an exported file needs torch (pip install 'cal_jax[torch]')"
      ) from error
    from cal_jax.interop import torch_model

    net = torch_model.load(path)

    def embed(images: np.ndarray, modality: int) -> np.ndarray:
      with torch.no_grad():
        return net(torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2))), modality)

    self.embed = lambda images, modality: embed(images, modality).numpy()
    if 'image_size' not in net.metadata:
      raise torch_model.WeightFileError(
        f'{path}: no image_size in its metadata; export it again with python -m cal_jax.convert'
      )
    self.image_size = tuple(net.metadata['image_size'])
    self.num_parts = int(net.metadata['config']['num_parts'])
    self.flip = True
    with open(path, 'rb') as f:
      digest = search.FeatureCache.key(f.read(), 0)
    self.key = f'file:{digest}'
    self.name = path


def run_search() -> dict:
  out = cli.absolute_path(_OUTPUT.value)
  if os.path.exists(out) and not os.path.isdir(out):
    raise search.SearchInputError(f'--output {out!r} is a file: name a folder')
  search.check_disjoint(cli.absolute_path(_QUERY.value), cli.absolute_path(_GALLERY.value))
  query = search.read_folder(cli.absolute_path(_QUERY.value), _QUERY_MODALITY.value, 'query')
  gallery = search.read_folder(
    cli.absolute_path(_GALLERY.value), _GALLERY_MODALITY.value, 'gallery'
  )
  search.check_disjoint(query.folder, gallery.folder, query.paths, gallery.paths)
  os.makedirs(out, exist_ok=True)
  terminal.attach_log_file(out)
  model = Model(cli.absolute_path(_MODEL.value), _CHECKPOINT.value, _BATCH.value)
  cache = search.FeatureCache(os.path.join(out, 'features.npz'), model.key)
  start = time.perf_counter()
  features, embedded = {}, 0
  for role, images in (('query', query), ('gallery', gallery)):
    features[role], count = search.embed_set(
      model.embed,
      images,
      cache,
      image_size=model.image_size,
      batch_size=model.batch_size,
      flip=model.flip,
      num_parts=model.num_parts,
    )
    embedded += count
  cache.save()
  embed_s = time.perf_counter() - start
  start = time.perf_counter()
  indices, scores = search.top_k(features['query'], features['gallery'], _TOP_K.value)
  rank_s = time.perf_counter() - start
  threshold = _THRESHOLD.value
  per_query = []
  for q, path in enumerate(query.paths):
    matched = threshold is None or scores[q, 0] >= threshold
    per_query.append(
      {
        'query': path,
        'best_score': float(scores[q, 0]),
        'answer': 'match' if matched else 'no match',
        'matches': [
          {'rank': r + 1, 'gallery': gallery.paths[g], 'score': float(s)}
          for r, (g, s) in enumerate(zip(indices[q], scores[q]))
        ],
      }
    )
  summary = {
    'model': model.name,
    'query': query.folder,
    'gallery': gallery.folder,
    'num_query': len(query.paths),
    'num_gallery': len(gallery.paths),
    'embedded': embedded,
    'cached': len(query.paths) + len(gallery.paths) - embedded,
    'threshold': threshold,
    'seconds': {'embedding': round(embed_s, 3), 'ranking': round(rank_s, 3)},
  }
  labelled = query.identities is not None and gallery.identities is not None
  if labelled:
    summary['metrics'] = search.labelled_metrics(
      features['query'], features['gallery'], query.identities, gallery.identities
    )
    _score_picture(out, scores[:, 0], indices[:, 0], query, gallery, threshold)
  _write(out, per_query, summary)
  _ranking_picture(out, query, gallery, indices, scores, model.image_size)
  return summary


def _write(out: str, per_query: list[dict], summary: dict) -> None:
  with open(os.path.join(out, 'matches.csv'), 'w', newline='', encoding='utf-8') as f:
    writer = csv.writer(f)
    writer.writerow(['query', 'rank', 'gallery', 'score'])
    for entry in per_query:
      if entry['answer'] == 'no match':
        writer.writerow([entry['query'], 0, 'no match', f'{entry["best_score"]:.6f}'])
        continue
      for m in entry['matches']:
        writer.writerow([entry['query'], m['rank'], m['gallery'], f'{m["score"]:.6f}'])
  with open(os.path.join(out, 'matches.json'), 'w', encoding='utf-8') as f:
    json.dump({'summary': summary, 'queries': per_query}, f, indent=1)


def _ranking_picture(out, query, gallery, indices, scores, size) -> None:
  from cal_jax.data import images as images_lib
  from cal_jax.pictures import plots

  n = min(_PICTURE_QUERIES.value, len(query.paths))
  k = min(indices.shape[1], 8)
  q_pixels = images_lib.resize_images(query.encoded[:n], size)
  g_pixels = images_lib.resize_images([gallery.encoded[g] for g in indices[:n, :k].ravel()], size)
  g_pixels = g_pixels.reshape(n, k, *g_pixels.shape[1:])
  if query.identities is not None and gallery.identities is not None:
    correct = np.array(
      [[gallery.identities[g] == query.identities[q] for g in indices[q, :k]] for q in range(n)]
    )
  else:
    correct = np.ones((n, k), bool)
  fig = plots.ranking_figure(
    q_pixels,
    g_pixels,
    correct,
    [os.path.relpath(p, query.folder) for p in query.paths[:n]],
    [[f'{scores[q, j]:.2f}' for j in range(k)] for q in range(n)],
    'queries and their best matches (score)',
  )
  with open(os.path.join(out, 'ranking.png'), 'wb') as f:
    f.write(plots.to_png(fig))


def _score_picture(out, best, best_index, query, gallery, threshold) -> None:
  from matplotlib.figure import Figure

  from cal_jax.pictures import plots

  right = np.array(
    [gallery.identities[g] == query.identities[q] for q, g in enumerate(best_index)], bool
  )
  fig = Figure(figsize=(5, 3))
  ax = fig.add_subplot()
  bins = np.linspace(float(best.min()), float(best.max()) + 1e-6, 30)
  ax.hist(best[right], bins, alpha=0.6, label=f'best match right ({right.sum()})')
  ax.hist(best[~right], bins, alpha=0.6, label=f'best match wrong ({(~right).sum()})')
  if threshold is not None:
    ax.axvline(threshold, color='k', linestyle='--', label=f'--threshold {threshold:g}')
  ax.set_xlabel('best score of a query')
  ax.set_ylabel('queries')
  ax.legend(fontsize=7)
  fig.tight_layout()
  with open(os.path.join(out, 'scores.png'), 'wb') as f:
    f.write(plots.to_png(fig))


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  try:
    summary = run_search()
  except cli.USER_ERRORS as error:
    cli.exit_with('cal_jax.search', error)
  out = cli.absolute_path(_OUTPUT.value)
  print(
    f'{summary["num_query"]} queries against {summary["num_gallery"]} gallery images '
    f'({summary["embedded"]} embedded, {summary["cached"]} from the cache) in '
    f'{summary["seconds"]["embedding"]:.1f} s embedding + '
    f'{summary["seconds"]["ranking"]:.2f} s ranking; results in {out}',
    flush=True,
  )
  if 'metrics' in summary:
    m = summary['metrics']
    print(
      f'R1 {m["R1"]:.2f}  R10 {m["R10"]:.2f}  mAP {m["mAP"]:.2f}  mINP {m["mINP"]:.2f} '
      f'({m["num_valid_queries"]} queries with a match in the gallery); score '
      f'distributions in {os.path.join(out, "scores.png")}',
      flush=True,
    )


if __name__ == '__main__':
  app.run(main, flags_parser=cli.parse_flags)
