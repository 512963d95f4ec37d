"""tfds builder `regdb`: RegDB read from the folder as distributed.

One builder config per trial, `trial_1` .. `trial_10`, each reading its own
idx/{train,test}_{visible,thermal}_<t>.txt (the standard 10-trial protocol).
"""

from __future__ import annotations

import dataclasses

import tensorflow_datasets as tfds

from cal_jax.data.datasets import builder_common, records
from cal_jax.data.datasets.specs import REGDB_TRIALS

_CITATION = """@article{nguyen2017person,
  title={Person Recognition System Based on a Combination of Body Images from
         Visible Light and Thermal Cameras},
  author={Nguyen, Dat Tien and Hong, Hyung Gil and Kim, Ki Wan and Park, Kang
          Ryoung},
  journal={Sensors}, volume={17}, number={3}, pages={605}, year={2017}}"""


@dataclasses.dataclass
class RegdbConfig(tfds.core.BuilderConfig):
  """A RegDB trial: which idx/*_<trial>.txt files define train and test."""

  trial: int = 1


class Regdb(builder_common.SkipsCorruptImages, tfds.core.GeneratorBasedBuilder):
  """RegDB: 412 identities, 10 visible and 10 thermal images each, from one
  visible (camera 1) and one thermal (camera 2) camera. Each trial splits the
  identities in half (206 train, 206 test); see `records.regdb_records`."""

  name = 'regdb'
  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release.'}
  BUILDER_CONFIGS = [
    RegdbConfig(name=f'trial_{t}', trial=t, description=f'Trial {t}: idx/*_{t}.txt.')
    for t in REGDB_TRIALS
  ]
  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  Ask the RegDB authors (Dongguk University) for the data set, unzip it, add the
  idx/ folder of trial files that the standard code distributes
  (mangye16/Cross-Modal-Re-ID-baseline), and pass the folder that holds
  Visible/, Thermal/ and idx/ as manual_dir (or put it at <manual_dir>/RegDB/).
  Nothing is downloaded.
  """

  def _info(self) -> tfds.core.DatasetInfo:
    return builder_common.dataset_info(
      self, description=self.__doc__, homepage='http://dm.dongguk.edu/link.html', citation=_CITATION
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    root = builder_common.manual_root(dl_manager, 'regdb')
    self.record_source(root)
    trial = self.builder_config.trial
    splits = {s: records.regdb_records(root, s, trial) for s in records.SPLITS}
    return {s: self._generate_examples(root, r) for s, r in splits.items()}

  def _generate_examples(self, root: str, split_records: list[records.Record]):
    return builder_common.generate_examples(root, split_records, self.skipped_images())
