"""tfds builder `sysu_mm01`: SYSU-MM01 read from the folder as distributed."""

from __future__ import annotations

import tensorflow_datasets as tfds

from cal_jax.data.datasets import builder_common, records

_CITATION = """@inproceedings{wu2017rgb,
  title={RGB-Infrared Cross-Modality Person Re-Identification},
  author={Wu, Ancong and Zheng, Wei-Shi and Yu, Hong-Xing and Gong, Shaogang
          and Lai, Jianhuang},
  booktitle={ICCV}, year={2017}}"""


class SysuMm01(builder_common.SkipsCorruptImages, tfds.core.GeneratorBasedBuilder):
  """SYSU-MM01: 491 identities, 4 visible (cam1, 2, 4, 5) and 2 infrared
  (cam3, 6) cameras. train = exp/train_id.txt + exp/val_id.txt (395 ids),
  test = exp/test_id.txt (96 ids), all cameras; see `records.sysu_records`."""

  name = 'sysu_mm01'
  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release.'}
  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  Ask the SYSU-MM01 authors for the data set
  (https://github.com/wuancong/SYSU-MM01), unzip it and pass the folder that
  holds cam1/ .. cam6/ and exp/ as manual_dir (or put it at
  <manual_dir>/SYSU-MM01/). Nothing is downloaded.
  """

  def _info(self) -> tfds.core.DatasetInfo:
    return builder_common.dataset_info(
      self,
      description=self.__doc__,
      homepage='https://github.com/wuancong/SYSU-MM01',
      citation=_CITATION,
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    root = builder_common.manual_root(dl_manager, 'sysu')
    self.record_source(root)
    # Both splits listed first: a partial copy fails before anything is written.
    splits = {s: records.sysu_records(root, s) for s in records.SPLITS}
    return {s: self._generate_examples(root, r) for s, r in splits.items()}

  def _generate_examples(self, root: str, split_records: list[records.Record]):
    return builder_common.generate_examples(root, split_records, self.skipped_images())
