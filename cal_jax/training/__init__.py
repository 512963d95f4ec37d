"""Training: the loop, the pmapped step, the state, the optimiser, checkpoints, M-hat's counts.

loop            `train_and_evaluate(config, workdir)` and `evaluate_checkpoint`
step            the train step, pure, on the named axis 'batch'
state           the train state and its restore template
optim           SGD with warm-up and cosine decay (Sec. 4.1)
checkpointing   Orbax checkpoints with the data position and a compatibility fingerprint
checkpoint_reader   restoring a step, the fall-back past damaged ones
checkpoint_files    the fingerprint, the manifest, damage and full disks
restore         `restore_trained`: a checkpoint ready to evaluate or draw
divergence      a diverged run stopped in one line, before anything non-finite is saved
assignments     `AssignmentCounts`: the part matchings counted per epoch, and M-hat
collapse        `CollapseGuard`: one warning while training when the TSAA maps stay one-hot
"""
