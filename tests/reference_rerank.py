"""k-reciprocal re-ranking as the published loops write it (Zhong et al., CVPR 2017; the
form torchreid and fast-reid ship, taking distance matrices): the reference the vectorised
`cal_jax.evaluation.rerank` is tested against."""

import numpy as np


def reference_rerank(q_g, q_q, g_g, k1=20, k2=6, lambda_value=0.3):
  """The published loops (Zhong et al.; torchreid's and fast-reid's form), plainly."""
  original = np.concatenate(
    [np.concatenate([q_q, q_g], axis=1), np.concatenate([q_g.T, g_g], axis=1)], axis=0
  )
  original = np.power(original, 2).astype(np.float32)
  original = np.transpose(1.0 * original / np.max(original, axis=0))
  v = np.zeros_like(original).astype(np.float32)
  initial_rank = np.argsort(original).astype(np.int32)
  query_num = q_g.shape[0]
  all_num = original.shape[0]

  def neighbours(i, k):
    forward = initial_rank[i, : k + 1]
    backward = initial_rank[forward, : k + 1]
    return forward[np.where(backward == i)[0]]

  for i in range(all_num):
    k_reciprocal = neighbours(i, k1)
    expansion = k_reciprocal
    for candidate in k_reciprocal:
      candidate_set = neighbours(candidate, int(np.around(k1 / 2.0)))
      if len(np.intersect1d(candidate_set, k_reciprocal)) > 2.0 / 3 * len(candidate_set):
        expansion = np.append(expansion, candidate_set)
    expansion = np.unique(expansion)
    weight = np.exp(-original[i, expansion])
    v[i, expansion] = 1.0 * weight / np.sum(weight)
  original = original[:query_num]
  if k2 != 1:
    v_qe = np.zeros_like(v, dtype=np.float32)
    for i in range(all_num):
      v_qe[i, :] = np.mean(v[initial_rank[i, :k2], :], axis=0)
    v = v_qe
  inv_index = [np.where(v[:, i] != 0)[0] for i in range(all_num)]
  jaccard = np.zeros_like(original, dtype=np.float32)
  for i in range(query_num):
    temp_min = np.zeros(shape=[1, all_num], dtype=np.float32)
    non_zero = np.where(v[i, :] != 0)[0]
    for k in non_zero:
      images = inv_index[k]
      temp_min[0, images] = temp_min[0, images] + np.minimum(v[i, k], v[images, k])
    jaccard[i] = 1 - temp_min / (2.0 - temp_min)
  final = jaccard * (1 - lambda_value) + original * lambda_value
  return final[:query_num, query_num:]
