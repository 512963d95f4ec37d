"""The CAL objective (Eq. 20) and its terms.

`LOSS_TERMS` names the weighted terms once: the fields of `config.loss` that
weigh them, the entries of the train step's metrics, the rows of the ablations.
"""

LOSS_TERMS = (
  'id',
  'global_id',
  'pcl',
  'kd1',
  'kd2',
  'dis',
  'div',
  'attention_div',
  'attention_guidance',
)
