"""The two modalities of visible-infrared re-identification, as every module numbers them.

Data sets, the sampler, the network's stems and DRMs, the protocols and the
pictures all use these values; `cal_jax/interop/torch_model.py` repeats them
(it is copied into PyTorch projects alone).
"""

VISIBLE = 0
INFRARED = 1  # near-infrared or thermal
NAMES = {VISIBLE: 'visible', INFRARED: 'infrared'}
