"""What to draw of a trained CAL, from the test split: the figures of `plots`.

  part_map_figures   DRM's selected regions (S_hat, Eq. 3) and TSAA's attention
                     (S, Eq. 9, self-refinement) per part, over a visible and an
                     infrared image of a few test identities (the paper's Fig. 4)
  ranked_lists       a protocol's queries and their top-k gallery images, from
                     an `Evaluation`: its features, splits and gallery removal
  cmc_curves         the mean CMC curve of every protocol key of a results dict

Shared by `python -m cal_jax.visualize` (PNG files) and the periodic
evaluation during training (TensorBoard images, `evaluation_images`): both
draw from an `Evaluation` and an `Embedder` that the evaluation already made,
so nothing is embedded twice.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from cal_jax.data.augment import IMAGENET_MEAN, IMAGENET_STD
from cal_jax.data.images import resize_images
from cal_jax.data.modality import INFRARED, VISIBLE
from cal_jax.data.modality import NAMES as MODALITY_NAMES
from cal_jax.data.splits import SplitArrays
from cal_jax.evaluation import embedding, metrics, protocols
from cal_jax.evaluation import results as results_lib
from cal_jax.evaluation.evaluator import Evaluation
from cal_jax.pictures import plots

TOP_K = 10


def network_input(pixels: np.ndarray) -> np.ndarray:
  """uint8 [B, H, W, 3] -> the ImageNet-normalised float32 input of the network."""
  scaled = np.asarray(pixels, np.float32) / np.float32(255)
  return ((scaled - np.float32(IMAGENET_MEAN)) / np.float32(IMAGENET_STD)).astype(np.float32)


def sample_pairs(split: SplitArrays, num_ids: int) -> tuple[np.ndarray, np.ndarray]:
  """The first visible and infrared image of `num_ids` test identities.

  The identities are spread evenly over those with images of both
  modalities, so the choice is the same at every evaluation.
  Returns:
    (visible indices [n], infrared indices [n]) into `split`, n <= num_ids.
  """
  both = np.intersect1d(split.id[split.modality == VISIBLE], split.id[split.modality == INFRARED])
  if not both.size:
    raise ValueError('no test identity has images of both modalities')
  chosen = both[
    np.unique(np.linspace(0, both.size - 1, min(num_ids, both.size)).round().astype(int))
  ]
  first = lambda pid, m: int(np.flatnonzero((split.id == pid) & (split.modality == m))[0])
  return (
    np.array([first(p, VISIBLE) for p in chosen]),
    np.array([first(p, INFRARED) for p in chosen]),
  )


def part_map_figures(
  embedder: Any, split: SplitArrays, size: tuple[int, int], num_ids: int = 4
) -> dict[str, Figure]:
  """{'regions': S_hat per part, 'attention': S per part}: one row per image,
  a visible and an infrared row per identity.

  Args:
    embedder: `cal_jax.evaluation.run.Embedder` (model and M-hat-reordered variables).
    split: the test split.
    size: (height, width) of the network input.
    num_ids: identities to draw.
  """
  visible, infrared = sample_pairs(split, num_ids)
  pixels, maps = {}, {}
  for modality, indices in ((VISIBLE, visible), (INFRARED, infrared)):
    pixels[modality] = resize_images(split.image[indices], size)
    out = embedding.part_maps(
      embedder.model, embedder.variables, network_input(pixels[modality]), modality
    )
    maps[modality] = {name: np.asarray(value) for name, value in out.items()}
  order = [(m, i) for i in range(len(visible)) for m in (VISIBLE, INFRARED)]
  images = np.stack([pixels[m][i] for m, i in order])
  labels = [f'id {split.id[(visible, infrared)[m][i]]}\n{MODALITY_NAMES[m]}' for m, i in order]
  titles = {
    'regions': 'DRM: selected regions (S-hat, Eq. 3) per part',
    'attention': 'TSAA: spatial attention (S, Eq. 9) of each part query',
  }
  return {
    name: plots.part_maps_figure(
      images, np.stack([maps[m][key][i] for m, i in order]), labels, titles[name]
    )
    for name, key in (('regions', 'selected'), ('attention', 'attention'))
  }


@dataclasses.dataclass(frozen=True)
class RankedLists:
  """Queries of one protocol trial and their best gallery images.

  Attributes:
    split: the protocol's query and gallery (`protocols.Split`).
    query: [Q] example indices of the queries drawn.
    gallery: [Q, k] example indices of their top-k gallery images, best first.
    correct: [Q, k] bool, the gallery image shows the query's identity.
  """

  split: protocols.Split
  query: np.ndarray
  gallery: np.ndarray
  correct: np.ndarray


def ranked_lists(
  evaluation: Evaluation,
  test_split: SplitArrays,
  key: str,
  num_queries: int = 4,
  top_k: int = TOP_K,
  trial: int = 0,
) -> RankedLists:
  """Ranks the gallery of protocol `key` (trial `trial`) for a few of its queries.

  The split, the features, the similarity (their dot product) and the gallery
  images a protocol removes (`metrics.removed_from_gallery`) are the
  evaluation's. The queries are spread evenly over those with a match left in
  the gallery. RegDB has one split per evaluation, whatever `trial`.
  """
  if key not in evaluation.splits:
    raise ValueError(f'{key} was not evaluated; evaluated: {sorted(evaluation.splits)}')
  trials = evaluation.splits[key]
  if len(trials) > 1 and trial >= len(trials):
    raise ValueError(f'trial {trial} of {key} was not evaluated ({len(trials)} trials)')
  split = trials[trial if len(trials) > 1 else 0]
  table = protocols.RecordTable.of_columns(test_split)
  removed = lambda q: metrics.removed_from_gallery(
    split.metric, table.id[q], table.camera[q], table.id[split.gallery], table.camera[split.gallery]
  )
  matches = table.id[split.query][:, None] == table.id[split.gallery][None, :]
  removed_for_all = removed(split.query)
  if removed_for_all is not None:
    matches &= ~removed_for_all
  valid = split.query[matches.any(axis=1)]
  if not valid.size:
    raise ValueError(f'no query of {key} has its identity in the gallery')
  query = valid[
    np.unique(np.linspace(0, valid.size - 1, min(num_queries, valid.size)).round().astype(int))
  ]
  distances = -(evaluation.features_of(query) @ evaluation.features_of(split.gallery).T)
  dropped = removed(query)
  if dropped is not None:
    distances[dropped] = np.inf
  kept = len(split.gallery) - (0 if dropped is None else int(dropped.sum(axis=1).max()))
  order = np.argsort(distances, axis=1, kind='stable')[:, : min(top_k, kept)]
  gallery = split.gallery[order]
  return RankedLists(split, query, gallery, table.id[gallery] == table.id[query][:, None])


def ranking_figure(ranked: RankedLists, test_split: SplitArrays, size: tuple[int, int]) -> Figure:
  """`plots.ranking_figure` of `ranked_lists`' result, images at the network's size."""
  caption = lambda i: f'id {test_split.id[i]} cam {test_split.camera[i]}'
  gallery = resize_images(test_split.image[ranked.gallery.ravel()], size)
  key = ranked.split.key
  return plots.ranking_figure(
    resize_images(test_split.image[ranked.query], size),
    gallery.reshape(ranked.gallery.shape + gallery.shape[1:]),
    ranked.correct,
    ['query ' + caption(i) for i in ranked.query],
    [[caption(i) for i in row] for row in ranked.gallery],
    f'{results_lib.MODE_NAMES.get(key, key)}, trial {ranked.split.trial}: top '
    f'{ranked.gallery.shape[1]} (green: same identity, red: another)',
  )


def cmc_curves(results: dict[str, dict]) -> dict[str, list[float]]:
  """{legend label: mean CMC curve (percent)} of every key that has one."""
  curves = {
    f'{results_lib.MODE_NAMES.get(key, key)} (R1 {r["R1"]:.1f}, mAP {r["mAP"]:.1f})': r['cmc']
    for key, r in results.items()
    if key != 'meta' and 'cmc' in r
  }
  if not curves:
    raise ValueError(
      'the results hold no CMC curve (eval_results.json written before '
      'curves were kept): evaluate again with --mode eval'
    )
  return curves


def evaluation_figures(
  embedder: Any,
  evaluation: Evaluation,
  test_split: SplitArrays,
  dataset_name: str,
  size: tuple[int, int],
  num_ids: int = 4,
  num_queries: int = 4,
) -> dict[str, Figure]:
  """Every picture of one evaluation: regions, attention, ranking (the first
  protocol key), cmc."""
  figures = part_map_figures(embedder, test_split, size, num_ids)
  key = next(iter(evaluation.results))
  figures['ranking'] = ranking_figure(
    ranked_lists(evaluation, test_split, key, num_queries), test_split, size
  )
  figures['cmc'] = plots.cmc_figure(cmc_curves(evaluation.results), f'CMC, {dataset_name}')
  return figures


def evaluation_images(
  embedder: Any,
  evaluation: Evaluation,
  test_split: SplitArrays,
  dataset_name: str,
  size: tuple[int, int],
) -> dict[str, np.ndarray]:
  """`evaluation_figures` as {'pictures/NAME': uint8 [1, H, W, 3]} for `write_images`."""
  return {
    f'pictures/{name}': plots.to_array(fig)[None]
    for name, fig in evaluation_figures(
      embedder, evaluation, test_split, dataset_name, size
    ).items()
  }
