"""Export to PyTorch: `cal_jax.convert` writes, `cal_jax.interop.torch_model` reads and embeds.

The tiny CAL's variables are made trained-like first (every parameter
perturbed; batch-norm statistics measured on random images, then shifted and
rescaled), and exported with a non-identity M-hat. The PyTorch model must
then give the embeddings of `inference.embed` on the reordered variables
(NCHW against NHWC copies of the same images, an even and an odd size), the
same top-N_k tokens, and the same ranking of a synthetic query/gallery set.
"""

import functools
import importlib.util
import itertools
import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from conftest import NUM_CLASSES

from cal_jax.evaluation import embedding as inference
from cal_jax.interop import export as convert
from cal_jax.interop import torch_mapping
from cal_jax.models.cal import CAL, INFRARED, VISIBLE
from cal_jax.training import checkpointing
from cal_jax.training.state import build_model

torch = pytest.importorskip('torch')
safetensors = pytest.importorskip('safetensors')
from cal_jax.interop import torch_model  # noqa: E402  (needs torch)

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
M_HAT = np.array([2, 0, 3, 1])  # infrared part k <-> visible part M_HAT[k]
IMAGE_SIZES = [(64, 32), (67, 35)]  # the tiny config's, and an odd one
TOLERANCE = 1e-4  # max abs difference of per-part unit vectors, float32
TRAINING_ONLY_WORDS = ('classifier', 'global_neck')


pytestmark = pytest.mark.usefixtures('single_torch_thread')


def trained_like(model: CAL, params, batch_stats, image_size, seed: int = 0) -> dict:
  """Every parameter perturbed; every BN's running statistics set to the batch
  statistics of a train-mode pass on random images, then perturbed (means
  shifted, variances scaled by U(0.5, 1.5)), so eval-mode activations stay
  moderate and a float32 tolerance means something. For a bottleneck ResNet."""
  rng = np.random.default_rng(seed)
  params = {
    path: (
      np.asarray(x) * (1 + 0.1 * rng.normal(size=x.shape)) + 0.02 * rng.normal(size=x.shape)
    ).astype(np.float32)
    for path, x in flat(params).items()
  }
  for path in params:
    if path[0] == 'stages' and path[-2:] == ('bn3', 'scale'):
      params[path] *= 0.2  # residual branches that add small updates, as in a trained ResNet
  params = unflat(params)
  zeros = jax.tree_util.tree_map(lambda x: np.zeros(x.shape, np.float32), batch_stats)
  images = rng.normal(size=(2, 8, *image_size, 3)).astype(np.float32)
  partners = np.arange(8)
  _, updated = jax.jit(
    lambda v: model.apply(
      v, images[0], images[1], partners, partners, train=True, mutable=['batch_stats']
    )
  )({'params': params, 'batch_stats': zeros})
  # From zeros, one update with momentum 0.1 leaves 0.1 x the batch statistic.
  measured = flat(jax.tree_util.tree_map(lambda x: 10.0 * np.asarray(x), updated['batch_stats']))
  stats = {}
  for path, value in measured.items():
    if path[-1] == 'var':
      stats[path] = value * rng.uniform(0.5, 1.5, value.shape)
    else:
      std = np.sqrt(measured[path[:-1] + ('var',)])
      stats[path] = value + 0.1 * std * rng.normal(size=value.shape)
  stats = {path: value.astype(np.float32) for path, value in stats.items()}
  return {'params': params, 'batch_stats': unflat(stats)}


def flat(tree) -> dict:
  import flax

  return flax.traverse_util.flatten_dict(dict(tree))


def unflat(tree) -> dict:
  import flax

  return flax.traverse_util.unflatten_dict(tree)


@pytest.fixture(scope='module')
def trained(tiny_config, tiny_state):
  """(eval model, trained-like variables, the same with prototypes reordered by M_HAT)."""
  model = build_model(tiny_config, NUM_CLASSES)
  size = (tiny_config.data.image_height, tiny_config.data.image_width)
  variables = trained_like(model, tiny_state.params, tiny_state.batch_stats, size)
  reordered = {
    'params': inference.reorder_prototypes(variables['params'], M_HAT),
    'batch_stats': variables['batch_stats'],
  }
  return model, variables, reordered


@pytest.fixture(scope='module')
def exported(tmp_path_factory, tiny_config, trained):
  """suffix -> the exported file of the trained-like variables with M_HAT."""
  _, variables, _ = trained
  directory = tmp_path_factory.mktemp('export')
  paths = {}
  for suffix in convert.TORCH_SUFFIXES:
    paths[suffix] = str(directory / f'cal{suffix}')
    convert.export(variables, tiny_config, NUM_CLASSES, paths[suffix], m_hat=M_HAT)
  return paths


@pytest.fixture(scope='module')
def torch_models(exported):
  return {suffix: torch_model.load(path) for suffix, path in exported.items()}


def images(size, count: int = 3, seed: int = 0) -> np.ndarray:
  """[count, H, W, 3]: random ImageNet-normalised-like images, NHWC."""
  return np.random.default_rng(seed).normal(size=(count, *size, 3)).astype(np.float32)


@functools.partial(jax.jit, static_argnames=('model', 'modality'))
def jax_outputs(model: CAL, variables, nhwc: np.ndarray, modality: int):
  """(`inference.embed`'s embeddings [B, N_p*C], the selected scores S_hat [B, h*w, N_p]),
  compiled once per shape."""
  embeddings = inference.embed(model, variables, nhwc, modality)
  return embeddings, model.apply(variables, nhwc, modality, method=CAL.refined_parts)['selected']


def torch_embed(net, nhwc: np.ndarray, modality: int) -> np.ndarray:
  with torch.no_grad():
    return net(torch.from_numpy(nhwc.transpose(0, 3, 1, 2).copy()), modality).numpy()


def test_formats_and_fields_agree():
  assert convert.FORMAT == torch_model.FORMAT
  assert set(torch_mapping.MODEL_FIELDS) == set(torch_model.DEFAULT_CONFIG)


def test_file_holds_the_inference_tensors_only(exported, trained, tiny_config):
  _, variables, _ = trained
  from safetensors.numpy import load_file

  tensors = load_file(exported['.safetensors'])
  expected = torch_model.CALInference(convert.model_hyperparameters(tiny_config)).state_dict()
  assert set(tensors) == {k for k in expected if not k.endswith('num_batches_tracked')}
  assert not [k for k in tensors if any(word in k for word in TRAINING_ONLY_WORDS)]
  for key, value in tensors.items():
    assert value.shape == tuple(expected[key].shape), key
  # The visible prototypes are reordered by M-hat (Linear weight [N_p, 3C]), the infrared not.
  drm = variables['params']
  np.testing.assert_array_equal(
    tensors['region_mining_visible.prototypes.weight'],
    np.asarray(drm['region_mining_visible']['prototypes']['kernel'])[:, M_HAT].T,
  )
  np.testing.assert_array_equal(
    tensors['region_mining_visible.prototypes.bias'],
    np.asarray(drm['region_mining_visible']['prototypes']['bias'])[M_HAT],
  )
  np.testing.assert_array_equal(
    tensors['region_mining_infrared.prototypes.weight'],
    np.asarray(drm['region_mining_infrared']['prototypes']['kernel']).T,
  )
  with safetensors.safe_open(exported['.safetensors'], framework='numpy') as f:
    metadata = {k: json.loads(v) for k, v in f.metadata().items()}
  assert metadata['m_hat'] == M_HAT.tolist() and metadata['num_classes'] == NUM_CLASSES
  assert metadata['config'] == convert.model_hyperparameters(tiny_config)
  saved = torch.load(exported['.pt'], weights_only=True)
  assert set(saved['state_dict']) == set(tensors) and saved['metadata'] == metadata
  for key, value in tensors.items():
    np.testing.assert_array_equal(saved['state_dict'][key].numpy(), value)


@pytest.mark.parametrize('size', IMAGE_SIZES)
@pytest.mark.parametrize('suffix', convert.TORCH_SUFFIXES)
def test_embeddings_and_selected_tokens_match_jax(trained, torch_models, suffix, size):
  model, _, reordered = trained
  net = torch_models[suffix]
  for modality in (VISIBLE, INFRARED):
    batch = images(size, seed=modality)
    expected, selected = jax_outputs(model, reordered, batch, modality)
    actual = torch_embed(net, batch, modality)
    assert actual.shape == expected.shape == (3, net.embedding_size)
    difference = np.abs(actual - np.asarray(expected)).max()
    print(f'{suffix} {size} modality {modality}: max |torch - jax| = {difference:.2e}')
    assert difference < TOLERANCE
    with torch.no_grad():
      torch_parts = net.refined_parts(
        torch.from_numpy(batch.transpose(0, 3, 1, 2).copy()), modality
      )
    np.testing.assert_array_equal(torch_parts['selected'].numpy() > 0, np.asarray(selected) > 0)


def test_ranking_matches_jax(trained, torch_models):
  """Infrared queries against a visible gallery, embedded 3 at a time (one compiled shape)."""
  model, _, reordered = trained
  net = torch_models['.safetensors']
  size = IMAGE_SIZES[0]
  query, gallery = images(size, count=6, seed=10), images(size, count=12, seed=11)

  def embed_both(batch, modality):
    chunks = [batch[i : i + 3] for i in range(0, len(batch), 3)]
    return (
      np.concatenate([np.asarray(jax_outputs(model, reordered, c, modality)[0]) for c in chunks]),
      np.concatenate([torch_embed(net, c, modality) for c in chunks]),
    )

  (jax_query, torch_query), (jax_gallery, torch_gallery) = (
    embed_both(query, INFRARED),
    embed_both(gallery, VISIBLE),
  )
  jax_scores = np.asarray(inference.part_cosine_similarity(jax_gallery, jax_query)).T
  torch_scores = torch_model.similarity(
    torch.from_numpy(torch_gallery), torch.from_numpy(torch_query)
  ).T.numpy()
  assert torch_scores.shape == (6, 12)
  np.testing.assert_allclose(torch_scores, jax_scores, atol=4 * TOLERANCE)
  np.testing.assert_array_equal(
    np.argsort(-torch_scores, axis=1, kind='stable'), np.argsort(-jax_scores, axis=1, kind='stable')
  )


def test_tied_scores_select_the_tokens_lax_top_k_selects():
  """Equal scores (zero prototypes: a uniform softmax, and ties in blocks) select the
  lowest token indices in both frameworks."""
  from cal_jax.models import region_mining

  drm = torch_model.RegionMining(channels=4, num_parts=3, select_ratio=0.6, pool_sizes=(1, 3))
  torch.nn.init.zeros_(drm.prototypes.weight)
  with torch.no_grad():
    drm.prototypes.bias.copy_(torch.tensor([0.0, 1.0, 2.0]))
    feature_map = torch.randn(2, 4, 5, 3, generator=torch.Generator().manual_seed(0))
    mined = drm(feature_map)
  scores = mined['scores'].numpy()
  assert np.all(scores == scores[:, :1])  # every token tied, for every part
  n_k = region_mining.num_selected_tokens(15, 3, 0.6)
  expected = np.asarray(region_mining.select_top_tokens(scores, n_k)) > 0
  np.testing.assert_array_equal(mined['selected'].numpy() > 0, expected)
  assert expected[:, :n_k].all() and not expected[:, n_k:].any()


def test_shared_stem_and_region_mining(tmp_path, tiny_config, trained):
  """One stem and one DRM for both modalities: the trained-like variables without the
  infrared ones are those of that network."""
  _, variables, _ = trained
  config = tiny_config.copy_and_resolve_references()
  config.model.modality_specific_stem = False
  config.model.shared_region_mining = True
  model = build_model(config, NUM_CLASSES)
  variables = {
    collection: {
      name: tree
      for name, tree in variables[collection].items()
      if name not in ('stem_infrared', 'region_mining_infrared')
    }
    for collection in ('params', 'batch_stats')
  }
  path = str(tmp_path / 'shared.safetensors')
  metadata = convert.export(variables, config, None, path, m_hat=M_HAT)
  assert not metadata['prototypes_reordered']  # one DRM for both: nothing to reorder
  net = torch_model.load(path)
  assert not [k for k in net.state_dict() if 'infrared' in k]
  for modality in (VISIBLE, INFRARED):
    batch = images(IMAGE_SIZES[0], seed=modality)
    expected = np.asarray(jax_outputs(model, variables, batch, modality)[0])
    assert np.abs(torch_embed(net, batch, modality) - expected).max() < TOLERANCE


@pytest.mark.slow
def test_torch_model_imports_no_jax(tmp_path):
  """torch_model.py and torch_files.py run copied alone into a project without cal_jax, and
  through the package, without JAX."""
  for name in ('torch_model.py', 'torch_files.py'):
    shutil.copy(os.path.join(REPO, 'cal_jax', 'interop', name), tmp_path / name)
  code = (
    f'import importlib.util, sys\n'
    f'sys.modules["cal_jax"] = None  # a PyTorch project without cal_jax\n'
    f'sys.path.insert(0, {str(tmp_path)!r})\n'
    f'spec = importlib.util.spec_from_file_location("torch_model", '
    f'{str(tmp_path / "torch_model.py")!r})\n'
    f'standalone = importlib.util.module_from_spec(spec)\n'
    f'spec.loader.exec_module(standalone)\n'
    f'assert standalone.read.__module__ == "torch_files", standalone.read.__module__\n'
    f'del sys.modules["cal_jax"]\n'
    f'import cal_jax.interop.torch_model\n'
    f'print(sorted(m for m in sys.modules if m.split(".")[0] in ("jax", "jaxlib", "flax",'
    f' "optax", "orbax", "tensorflow") or (m.startswith("cal_jax.") and m not in '
    f'("cal_jax.interop", "cal_jax.interop.torch_model", "cal_jax.interop.torch_files"))))\n'
  )
  result = subprocess.run(
    [sys.executable, '-c', code], cwd=REPO, capture_output=True, text=True, timeout=120
  )
  assert result.returncode == 0, result.stderr
  assert result.stdout.strip() == '[]'
  assert importlib.util.find_spec('cal_jax.interop.torch_model') is not None


def save_workdir(workdir, config, state, variables, step: int) -> None:
  """A training workdir as `train_and_evaluate` leaves it: config.json and a
  checkpoint whose last epoch counted M_HAT most often."""
  perms = list(itertools.permutations(range(config.model.num_parts)))
  last = np.ones(len(perms), np.int64)
  last[perms.index(tuple(M_HAT))] = 5
  current = np.zeros(len(perms), np.int64)
  current[0] = 9  # the current epoch's counts are not the ones used
  state = state.replace(
    params=variables['params'],
    batch_stats=variables['batch_stats'],
    step=np.asarray(step, np.int32),
  )
  with checkpointing.Checkpointer(
    os.path.join(workdir, 'checkpoints'), config, NUM_CLASSES
  ) as ckpt:
    ckpt.save(step, state, {'epoch_counts': current, 'last_epoch_counts': last})
  with open(os.path.join(workdir, 'config.json'), 'w') as f:
    f.write(config.to_json_best_effort(indent=2))


@pytest.mark.slow
def test_command_line_exports_a_workdir(tmp_path, tiny_config, tiny_state, trained, exported):
  _, variables, _ = trained
  workdir = tmp_path / 'run'
  save_workdir(str(workdir), tiny_config, tiny_state, variables, step=8)
  output = tmp_path / 'out' / 'cal.safetensors'
  result = subprocess.run(
    [sys.executable, '-m', 'cal_jax.convert', '--workdir', str(workdir), '--output', str(output)],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  from safetensors.numpy import load_file

  written, reference = load_file(str(output)), load_file(exported['.safetensors'])
  assert set(written) == set(reference)
  for key in reference:
    np.testing.assert_array_equal(written[key], reference[key])
  net = torch_model.load(str(output))
  assert net.metadata['m_hat'] == M_HAT.tolist() and net.metadata['checkpoint_step'] == 8
  # In process, a given step, .pt, and the config given rather than read back.
  metadata = convert.export_checkpoint(
    str(workdir), str(tmp_path / 'cal.pt'), step=8, config=tiny_config
  )
  assert metadata['m_hat'] == M_HAT.tolist()
  assert torch_model.load(str(tmp_path / 'cal.pt')).metadata == net.metadata
  with pytest.raises(FileNotFoundError, match=r'no checkpoint for step 7.*\[8\]'):
    convert.export_checkpoint(str(workdir), str(tmp_path / 'cal.pt'), step=7)


@pytest.mark.slow
def test_command_line_errors_are_one_line(tmp_path):
  result = subprocess.run(
    [
      sys.executable,
      '-m',
      'cal_jax.convert',
      '--workdir',
      str(tmp_path / 'missing'),
      '--output',
      str(tmp_path / 'cal.tflite'),
    ],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert result.returncode == 1
  assert result.stderr.strip().splitlines()[-1] == (
    f"cal_jax.convert: error: {tmp_path / 'cal.tflite'}: unknown output format '.tflite'; "
    'name the file *.safetensors, *.pt or *.onnx'
  )


def test_clear_errors(tmp_path, tiny_config, trained):
  _, variables, _ = trained
  with pytest.raises(ValueError, match=r"unknown output format '\.tflite'"):
    convert.export(variables, tiny_config, NUM_CLASSES, str(tmp_path / 'cal.tflite'))
  baseline = tiny_config.copy_and_resolve_references()
  baseline.model.embedding = 'global'
  with pytest.raises(ValueError, match="embedding='global'"):
    convert.export(variables, baseline, NUM_CLASSES, str(tmp_path / 'cal.pt'))
  with pytest.raises(ValueError, match='unknown output format'):
    convert.export_checkpoint(str(tmp_path), str(tmp_path / 'cal.pth'))
  with pytest.raises(FileNotFoundError, match='does not exist'):
    convert.export_checkpoint(str(tmp_path / 'missing'), str(tmp_path / 'cal.pt'))
  with pytest.raises(FileNotFoundError, match='no checkpoints in'):
    convert.export_checkpoint(str(tmp_path), str(tmp_path / 'cal.pt'))
  (tmp_path / 'checkpoints').mkdir()
  with pytest.raises(FileNotFoundError, match='config.json'):
    convert.export_checkpoint(str(tmp_path), str(tmp_path / 'cal.pt'))
  with pytest.raises(FileNotFoundError, match='no complete checkpoint'):
    convert.export_checkpoint(str(tmp_path), str(tmp_path / 'cal.pt'), config=tiny_config)
  with pytest.raises(FileNotFoundError, match='does not exist'):
    torch_model.load(str(tmp_path / 'missing.safetensors'))
  (tmp_path / 'model.onnx').write_bytes(b'')
  with pytest.raises(ValueError, match="unknown format '.onnx'"):
    torch_model.load(str(tmp_path / 'model.onnx'))
  assert not list(tmp_path.glob('cal*'))
