"""Pictures of a ReID model, as pure functions of arrays: matplotlib figures.

  part_maps_figure   an image and one heat map per part on it (the paper's
                     Fig. 4: the regions DRM selects, the TSAA attention)
  ranking_figure     a query and its top-k gallery images, correct matches
                     framed green, wrong ones red (as ReID toolkits draw them)
  cmc_figure         CMC curves, one per protocol and mode
  to_png, to_array   a figure as PNG bytes, or as uint8 [H, W, 3] pixels for
                     TensorBoard (`clu` writers' `write_images`)

Figures are `matplotlib.figure.Figure` objects drawn by the Agg canvas; pyplot
(and its global figure registry) is never used, so nothing leaks between calls.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

CORRECT = (0, 176, 0)  # frame of a gallery image of the query's identity
WRONG = (224, 0, 0)  # frame of any other gallery image
HEAT_MAP = 'jet'
HEAT_ALPHA = 0.5
_TILE_INCHES = 0.9  # width of one image column


def part_maps_figure(
  images: np.ndarray,
  maps: np.ndarray,
  row_labels: Sequence[str],
  title: str,
  part_label: str = 'part',
) -> Figure:
  """Each image, then each part's map drawn over it.

  Args:
    images: uint8 [R, H, W, 3], one row each.
    maps: [R, N_p, h, w] non-negative maps over the feature map (h x w);
      each is scaled to its own maximum and bilinearly stretched over its image.
    row_labels: [R] what each row shows (identity, modality).
    title: the figure's title.
    part_label: column titles are f'{part_label} {k}', k = 1..N_p.
  Returns:
    The figure: R rows, 1 + N_p columns.
  """
  images, maps = np.asarray(images), np.asarray(maps, np.float64)
  if images.ndim != 4 or maps.ndim != 4 or len(images) != len(maps) != len(row_labels):
    raise ValueError(
      f'images {images.shape}, maps {maps.shape} and {len(row_labels)} labels '
      'must give one row each'
    )
  rows, parts = maps.shape[:2]
  height, width = images.shape[1:3]
  aspect = height / width
  fig = Figure(
    figsize=(_TILE_INCHES * (1 + parts) + 0.3, _TILE_INCHES * aspect * rows + 0.5),
    layout='compressed',
  )
  grid = fig.add_gridspec(rows, 1 + parts)
  for r in range(rows):
    for c in range(1 + parts):
      ax = fig.add_subplot(grid[r, c])
      ax.imshow(images[r], interpolation='nearest')
      if c:
        heat = maps[r, c - 1]
        heat = heat / heat.max() if heat.max() > 0 else heat
        ax.imshow(
          heat,
          cmap=HEAT_MAP,
          alpha=HEAT_ALPHA,
          vmin=0.0,
          vmax=1.0,
          interpolation='bilinear',
          extent=(-0.5, width - 0.5, height - 0.5, -0.5),
        )
      ax.set_xticks([])
      ax.set_yticks([])
      if r == 0:
        ax.set_title('image' if c == 0 else f'{part_label} {c}', fontsize=7)
      if c == 0:
        ax.set_ylabel(row_labels[r], fontsize=6)
  fig.suptitle(title, fontsize=8)
  return fig


def framed(image: np.ndarray, colour: Sequence[int], thickness: int) -> np.ndarray:
  """uint8 [H, W, 3] with a frame of `thickness` pixels drawn inside its border."""
  out = np.array(image, np.uint8, copy=True)
  t = thickness
  out[:t], out[-t:], out[:, :t], out[:, -t:] = colour, colour, colour, colour
  return out


def ranking_figure(
  query_images: np.ndarray,
  gallery_images: np.ndarray,
  correct: np.ndarray,
  query_labels: Sequence[str],
  gallery_labels: Sequence[Sequence[str]],
  title: str,
) -> Figure:
  """One row per query: the query, then its ranked gallery images, framed.

  Args:
    query_images: uint8 [Q, H, W, 3].
    gallery_images: uint8 [Q, k, H, W, 3], best first.
    correct: bool [Q, k], True where the gallery image shows the query's identity.
    query_labels: [Q] captions of the queries.
    gallery_labels: [Q][k] captions of the gallery images.
    title: the figure's title.
  Returns:
    The figure: Q rows, 1 + k columns; axes in row-major order (query first),
    each gallery image framed in `CORRECT` or `WRONG`.
  """
  gallery_images, correct = np.asarray(gallery_images), np.asarray(correct, bool)
  num_queries, k = correct.shape
  if gallery_images.shape[:2] != (num_queries, k) or len(query_images) != num_queries:
    raise ValueError(
      f'{len(query_images)} queries, gallery {gallery_images.shape[:2]} and '
      f'correct {correct.shape} do not match'
    )
  height, width = gallery_images.shape[2:4]
  thickness = max(2, min(height, width) // 12)
  fig = Figure(
    figsize=(
      _TILE_INCHES * (k + 1.3),
      _TILE_INCHES * height / width * num_queries + 0.3 * num_queries + 0.5,
    )
  )
  grid = fig.add_gridspec(
    num_queries, k + 2, width_ratios=[1, 0.3] + [1] * k, wspace=0.06, hspace=0.35
  )
  for q in range(num_queries):
    ax = fig.add_subplot(grid[q, 0])
    ax.imshow(query_images[q], interpolation='nearest')
    ax.set_title(query_labels[q], fontsize=6)
    ax.set_axis_off()
    for j in range(k):
      ax = fig.add_subplot(grid[q, j + 2])
      colour = CORRECT if correct[q, j] else WRONG
      ax.imshow(framed(gallery_images[q, j], colour, thickness), interpolation='nearest')
      ax.set_title(f'{j + 1}: {gallery_labels[q][j]}', fontsize=5, color=np.asarray(colour) / 255)
      ax.set_axis_off()
  fig.suptitle(title, fontsize=8)
  return fig


def cmc_figure(curves: Mapping[str, Sequence[float]], title: str) -> Figure:
  """CMC curves: matching rate (percent) against rank, one line per label."""
  if not curves:
    raise ValueError('no CMC curves to draw')
  fig = Figure(figsize=(5.0, 3.6))
  ax = fig.add_subplot(1, 1, 1)
  longest = 1
  for label, curve in curves.items():
    ranks = np.arange(1, len(curve) + 1)
    longest = max(longest, len(curve))
    ax.plot(ranks, curve, marker='o', markersize=2.5, linewidth=1.2, label=label)
  ax.set_xlim(1, longest)
  ax.set_ylim(0, 100)
  ax.set_xticks(sorted({1, *range(5, longest + 1, 5)}))
  ax.set_xlabel('rank')
  ax.set_ylabel('matching rate (%)')
  ax.grid(True, alpha=0.3)
  ax.legend(fontsize=7, loc='lower right')
  ax.set_title(title, fontsize=9)
  fig.tight_layout()
  return fig


def to_png(fig: Figure, dpi: int = 150) -> bytes:
  """The figure as PNG bytes."""
  FigureCanvasAgg(fig)
  buffer = io.BytesIO()
  fig.savefig(buffer, format='png', dpi=dpi)
  return buffer.getvalue()


def to_array(fig: Figure, dpi: int = 100) -> np.ndarray:
  """The figure's pixels, uint8 [H, W, 3] (what `write_images` takes, per image)."""
  canvas = FigureCanvasAgg(fig)
  fig.set_dpi(dpi)
  canvas.draw()
  return np.asarray(canvas.buffer_rgba())[..., :3].copy()
