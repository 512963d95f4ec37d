"""The process a command line runs in.

- `workdir`: the run's folder: writable, free space, atomic writes, the lock, the config
  a run was started with.
- `terminal`: cal_jax's own lines on the terminal, the libraries' in log.txt.
- `distributed`: the process setup across hosts, the mapped axis, replication.
- `stopping`: SIGTERM / SIGINT as a clean stop at the next step.
"""
