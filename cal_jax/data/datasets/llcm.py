"""tfds builder `llcm`: LLCM read from the folder as distributed."""

from __future__ import annotations

import tensorflow_datasets as tfds

from cal_jax.data.datasets import builder_common, records

_CITATION = """@inproceedings{zhang2023diverse,
  title={Diverse Embedding Expansion Network and Low-Light Cross-Modality
         Benchmark for Visible-Infrared Person Re-identification},
  author={Zhang, Yukang and Wang, Hanzi},
  booktitle={CVPR}, year={2023}}"""


class Llcm(builder_common.SkipsCorruptImages, tfds.core.GeneratorBasedBuilder):
  """LLCM (low-light cross-modality): 1,064 identities, 9 cameras, visible and
  near-infrared images. train = idx/train_vis.txt + idx/train_nir.txt (713 ids),
  test = test_vis/ and test_nir/ images of idx/test_id.txt (351 ids); see
  `records.llcm_records`."""

  name = 'llcm'
  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release.'}
  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  Sign the LLCM release agreement (https://github.com/ZYK100/LLCM), unzip the
  data set and pass the folder that holds vis/, nir/, test_vis/, test_nir/ and
  idx/ as manual_dir (or put it at <manual_dir>/LLCM/). Nothing is downloaded.
  """

  def _info(self) -> tfds.core.DatasetInfo:
    return builder_common.dataset_info(
      self, description=self.__doc__, homepage='https://github.com/ZYK100/LLCM', citation=_CITATION
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    root = builder_common.manual_root(dl_manager, 'llcm')
    self.record_source(root)
    splits = {s: records.llcm_records(root, s) for s in records.SPLITS}
    return {s: self._generate_examples(root, r) for s, r in splits.items()}

  def _generate_examples(self, root: str, split_records: list[records.Record]):
    return builder_common.generate_examples(root, split_records, self.skipped_images())
