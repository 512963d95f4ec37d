"""A live guard against the attention collapse: one warning line while the run trains.

Eq. (18) as written, L_kd1 = -sum_M <S_a, S_b>, is smallest where the matched TSAA maps
are the same one-hot vector, and L_kd2 through the maps rewards attention that ignores
the query (docs/decisions/model_and_losses.md, "L_kd1: the attention collapse" and
"L_kd2 and the TSAA maps"). The step logs the maps' statistics every log interval
(`attention_max`: the mean over images and parts of max_n S; `attention_distinct`: distinct
argmax tokens per image).
When `attention_max` stays above MAX_S for INTERVALS log intervals in a row, every part
looks at one token: the guard names the statistics and the switches that avoid it, once.
"""

import ml_collections

MAX_S = 0.9  # mean max S of a collapsed map (1: one-hot; 1/(H*W): uniform)
INTERVALS = 3  # log intervals in a row


class CollapseGuard:
  """`update(step, summary)` once per log interval; returns the warning line, once."""

  def __init__(self, loss: ml_collections.ConfigDict, intervals: int = INTERVALS):
    self.loss, self.intervals = loss, intervals
    self.in_a_row, self.warned = 0, False

  def update(self, step: int, summary: dict[str, float]) -> str | None:
    collapsed = summary.get('attention_max', 0.0) > MAX_S
    self.in_a_row = self.in_a_row + 1 if collapsed else 0
    if self.warned or self.in_a_row < self.intervals:
      return None
    self.warned = True
    return (
      f'the TSAA attention has collapsed by step {step}: attention_max '
      f'{summary["attention_max"]:.2f} (above {MAX_S} for {self.in_a_row} log intervals; '
      f'1 is one token per part), attention_distinct {summary["attention_distinct"]:.2f} '
      f'argmax tokens per image. {self.remedy()} See docs/decisions/model_and_losses.md, '
      '"L_kd1: the attention collapse".'
    )

  def remedy(self) -> str:
    causes = []
    if self.loss.kd1 > 0 and self.loss.kd1_form == 'dot':
      causes.append('config.loss.kd1=0 (Eq. 18 as written drives the maps one-hot)')
    if self.loss.kd2 > 0 and self.loss.kd2_attention_gradient:
      causes.append('config.loss.kd2_attention_gradient=False (L_kd2 through the maps)')
    if not causes:
      return 'Neither Eq. 18 nor L_kd2 through the maps is on: check the learning rate.'
    return f'It is avoided by {" and ".join(causes)}; --config.formulation=measured sets both.'
