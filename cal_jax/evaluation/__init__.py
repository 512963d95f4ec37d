"""Evaluation: from a trained state to the results of the data set's test protocols.

protocols   query and gallery of every protocol and trial
metrics     CMC, mAP and mINP, as the reference loops compute them
embedding   prototype reordering by M-hat, the jitted embedding, part maps
evaluator   `evaluate(embed_fn, test_split, name, settings) -> Evaluation`
distances   the trials' distance matrices (one product per modality pair) and their scores
results     per-trial aggregation, the results file and the paper's tables
run         evaluating a state: the results file, the log, TensorBoard
progress    the progress lines (count, rate, ETA) while images are embedded and scored
rerank      k-reciprocal re-ranking (Zhong et al.), off by default
gallery_search  a probe against a folder of gallery images (`cal_jax.search`)
feature_cache   the test embeddings kept on disk between evaluations of one step
"""
