"""ONNX export: `cal_jax.convert --output *.onnx`, run by onnxruntime against JAX.

The trained-like tiny CAL of `test_export.py` (non-identity M-hat) is exported to
ONNX, both modalities in one graph and each alone; onnxruntime's embeddings must
equal `inference.embed`'s on the reordered variables to 1e-4, at batch sizes
other than the traced one, and rank a query/gallery set identically.
"""

import numpy as np
import pytest
from conftest import NUM_CLASSES
from test_export import M_HAT, images, jax_outputs, trained  # noqa: F401  (fixture)

from cal_jax.evaluation import embedding as inference
from cal_jax.interop import export as convert
from cal_jax.models.cal import INFRARED, VISIBLE

pytest.importorskip('torch')
pytest.importorskip('onnx')
ort = pytest.importorskip('onnxruntime')
from cal_jax.interop import onnx_export  # noqa: E402

pytestmark = pytest.mark.usefixtures('single_torch_thread')
TOLERANCE = 1e-4


def nchw(batch):
  return np.ascontiguousarray(batch.transpose(0, 3, 1, 2))


@pytest.fixture(scope='module')
def onnx_files(tmp_path_factory, tiny_config, trained):  # noqa: F811
  _, variables, _ = trained
  directory = tmp_path_factory.mktemp('onnx')
  paths = {}
  for modality in onnx_export.MODALITIES:
    paths[modality] = str(directory / f'cal_{modality}.onnx')
    convert.export(
      variables,
      tiny_config,
      NUM_CLASSES,
      paths[modality],
      m_hat=M_HAT,
      modality=modality,
      extra_metadata={'checkpoint_step': 7},
    )
  return paths


def session(path):
  return ort.InferenceSession(path, providers=['CPUExecutionProvider'])


def test_both_modalities_match_jax_at_any_batch(onnx_files, trained, tiny_config):  # noqa: F811
  model, _, reordered = trained
  size = (tiny_config.data.image_height, tiny_config.data.image_width)
  run = session(onnx_files['both'])
  assert [i.name for i in run.get_inputs()] == ['visible', 'infrared']
  assert [o.name for o in run.get_outputs()] == ['visible_embedding', 'infrared_embedding']
  for count_v, count_i in ((3, 5), (1, 4)):  # traced at 2: the batch axis is dynamic
    visible, infrared = images(size, count_v, seed=1), images(size, count_i, seed=2)
    got_v, got_i = run.run(None, {'visible': nchw(visible), 'infrared': nchw(infrared)})
    want_v = np.asarray(jax_outputs(model, reordered, visible, VISIBLE)[0])
    want_i = np.asarray(jax_outputs(model, reordered, infrared, INFRARED)[0])
    assert got_v.shape == want_v.shape and got_i.shape == want_i.shape
    print(
      f'onnx {count_v}+{count_i}: max |onnx - jax| = {np.abs(got_v - want_v).max():.2e}, '
      f'{np.abs(got_i - want_i).max():.2e}'
    )
    np.testing.assert_allclose(got_v, want_v, atol=TOLERANCE, rtol=0)
    np.testing.assert_allclose(got_i, want_i, atol=TOLERANCE, rtol=0)


def test_one_modality_graphs_and_ranking(onnx_files, trained, tiny_config):  # noqa: F811
  model, _, reordered = trained
  size = (tiny_config.data.image_height, tiny_config.data.image_width)
  query, gallery = images(size, 6, seed=10), images(size, 12, seed=11)
  infrared = session(onnx_files['infrared'])
  visible = session(onnx_files['visible'])
  assert [i.name for i in infrared.get_inputs()] == ['images']
  onnx_q = infrared.run(None, {'images': nchw(query)})[0]
  onnx_g = visible.run(None, {'images': nchw(gallery)})[0]
  jax_q = np.asarray(jax_outputs(model, reordered, query, INFRARED)[0])
  jax_g = np.asarray(jax_outputs(model, reordered, gallery, VISIBLE)[0])
  np.testing.assert_allclose(onnx_q, jax_q, atol=TOLERANCE, rtol=0)
  onnx_scores = onnx_q @ onnx_g.T
  jax_scores = np.asarray(inference.part_cosine_similarity(jax_g, jax_q)).T
  np.testing.assert_array_equal(
    np.argsort(-onnx_scores, axis=1, kind='stable'), np.argsort(-jax_scores, axis=1, kind='stable')
  )


def test_metadata(onnx_files, tiny_config):
  meta = onnx_export.read_metadata(onnx_files['visible'])
  assert meta['modality'] == 'visible'
  assert meta['image_size'] == [tiny_config.data.image_height, tiny_config.data.image_width]
  assert meta['m_hat'] == M_HAT.tolist()
  assert meta['checkpoint_step'] == 7
  assert meta['format'] == convert.FORMAT


def test_unknown_modality_is_refused(tmp_path, tiny_config, trained):  # noqa: F811
  _, variables, _ = trained
  with pytest.raises(ValueError, match="--modality 'thermal'"):
    convert.export(
      variables, tiny_config, NUM_CLASSES, str(tmp_path / 'x.onnx'), modality='thermal'
    )
  assert not (tmp_path / 'x.onnx').exists()
