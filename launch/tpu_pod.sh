#!/usr/bin/env bash
# Runs `python -m cal_jax.main` on every worker of a Cloud TPU VM slice: the same command on
# each host (`gcloud compute tpus tpu-vm ssh --worker=all`); JAX's TPU runtime joins the hosts.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: launch/tpu_pod.sh --tpu NAME --zone ZONE [options] -- CAL_JAX_MAIN_ARGS...

Runs `python -m cal_jax.main --distributed=always CAL_JAX_MAIN_ARGS` on every worker of the
Cloud TPU VM slice NAME, streaming the workers' output here:
  1. create the TPU VM unless it exists (--accelerator_type, --version, --spot);
  2. copy this checkout to every worker and install it with jax[tpu] in ~/cal_jax_venv
     (the workers need network for pip; --skip_setup when already done);
  3. run the same command on --worker=all; the output is also appended to --log FILE;
  4. with --delete, delete the TPU VM at the end, also after a failure or Ctrl-C
     (Ctrl-C first stops the training processes on the workers).

--workdir must be a folder that every worker sees at the same path (a Filestore/NFS or
gcsfuse mount): process 0 writes the checkpoints there and every process reads them back.
Size the batch with the README rule: config.data.num_ids_per_batch must be a multiple of the
number of chips (v4-32: 16, v5litepod-16: 16), and config.optim.base_lr scales with it.

Options:
  --tpu NAME                TPU VM name (required)
  --zone ZONE               e.g. us-central2-b (required)
  --project PROJECT         default: gcloud's configured project
  --accelerator_type TYPE   when creating (default v4-32; e.g. v5litepod-16)
  --version VERSION         TPU VM software version when creating (default tpu-ubuntu2204-base)
  --spot                    create a Spot TPU VM
  --skip_setup              do not copy and install the package
  --delete                  delete the TPU VM when the run ends
  --log FILE                also append the output here (default cal_jax_tpu_NAME.log)
  --dry-run                 print the gcloud commands, run nothing
  -h, --help                this text

Environment: GCLOUD (default gcloud), TPU_PYTHON (the workers' Python 3.11, default python3.11).

Example (SYSU-MM01 on a v4-32, 4 hosts x 4 chips, P = 16):
  launch/tpu_pod.sh --tpu cal-v4-32 --zone us-central2-b --delete -- \
      --config configs/sysu.py --workdir /mnt/shared/runs/sysu_v4_32 \
      --config.data.manual_dir=/mnt/shared/SYSU-MM01 \
      --config.data.num_ids_per_batch=16 --config.optim.base_lr=0.2 \
      --config.optim.warmup_start_lr=0.02 --config.optim.final_lr=0.002
EOF
}

tpu=""
zone=""
project=""
accelerator_type=v4-32
version='tpu-ubuntu2204-base'
spot=0
skip_setup=0
delete=0
log=""
dry_run=0
gcloud=${GCLOUD:-gcloud}
tpu_python=${TPU_PYTHON:-python3.11}

while (($#)); do
  case $1 in
    --tpu) tpu=$2; shift 2 ;;
    --zone) zone=$2; shift 2 ;;
    --project) project=$2; shift 2 ;;
    --accelerator_type) accelerator_type=$2; shift 2 ;;
    --version) version=$2; shift 2 ;;
    --spot) spot=1; shift ;;
    --skip_setup) skip_setup=1; shift ;;
    --delete) delete=1; shift ;;
    --log) log=$2; shift 2 ;;
    --dry-run) dry_run=1; shift ;;
    -h | --help) usage; exit 0 ;;
    --) shift; break ;;
    *) echo "tpu_pod.sh: unknown option $1 (arguments for cal_jax.main go after --)" >&2
       usage >&2; exit 2 ;;
  esac
done
main_args=("$@")
if [[ -z $tpu || -z $zone ]]; then
  echo "tpu_pod.sh: --tpu and --zone are required" >&2
  usage >&2
  exit 2
fi
log=${log:-cal_jax_tpu_$tpu.log}
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

tpu_vm=("$gcloud" compute tpus tpu-vm)
where=(--zone="$zone")
if [[ -n $project ]]; then where+=(--project="$project"); fi

run() {  # runs its arguments, or prints them with --dry-run
  if ((dry_run)); then
    printf '%q' "$1"
    printf ' %q' "${@:2}"
    printf '\n'
  else
    "$@"
  fi
}

on_all_workers() {  # $1: a shell command run on every worker, output streamed and logged
  if ((dry_run)); then
    run "${tpu_vm[@]}" ssh "$tpu" "${where[@]}" --worker=all --command="$1"
  else
    run "${tpu_vm[@]}" ssh "$tpu" "${where[@]}" --worker=all --command="$1" 2>&1 | tee -a "$log"
  fi
}

stop_remote() {  # expanded on the workers, not here
  # shellcheck disable=SC2016
  on_all_workers 'if [ -f ~/cal_jax.pid ]; then kill "$(cat ~/cal_jax.pid)" 2>/dev/null || true; fi' \
    || true
}

archive=""
cleanup() {
  if [[ -n $archive && -f $archive ]]; then rm -f "$archive"; fi
  if ((delete)); then
    run "${tpu_vm[@]}" delete "$tpu" "${where[@]}" --quiet || true
  fi
}
trap cleanup EXIT
trap 'echo "tpu_pod.sh: interrupted; stopping the workers" >&2; stop_remote; exit 130' INT TERM

# 1. Create unless it exists.
if ((dry_run)) || ! "${tpu_vm[@]}" describe "$tpu" "${where[@]}" > /dev/null 2>&1; then
  create=("${tpu_vm[@]}" create "$tpu" "${where[@]}" --accelerator-type="$accelerator_type"
          --version="$version")
  if ((spot)); then create+=(--spot); fi
  run "${create[@]}"
fi

# 2. Copy and install on every worker.
if ((!skip_setup)); then
  if ((dry_run)); then archive=SOURCE.tar.gz; else archive=$(mktemp -t cal_jax_src.XXXXXX); fi
  run tar -czf "$archive" -C "$repo" --exclude-vcs --exclude=.venv --exclude=__pycache__ \
      --exclude=workdir .
  run "${tpu_vm[@]}" scp "$archive" "$tpu:cal_jax_src.tar.gz" "${where[@]}" --worker=all
  on_all_workers "set -e; rm -rf ~/cal_jax && mkdir ~/cal_jax && tar -xzf ~/cal_jax_src.tar.gz \
-C ~/cal_jax; command -v $tpu_python > /dev/null || (sudo apt-get update -q && sudo apt-get \
install -y -q $tpu_python $tpu_python-venv); $tpu_python -m venv ~/cal_jax_venv; \
~/cal_jax_venv/bin/pip install -q -e ~/cal_jax 'jax[tpu]>=0.10,<0.11'"
fi

# 3. The same command on every worker; the pid file lets Ctrl-C stop it.
quoted=""
if ((${#main_args[@]})); then quoted=$(printf ' %q' "${main_args[@]}"); fi
on_all_workers "cd ~/cal_jax && echo \$\$ > ~/cal_jax.pid && exec ~/cal_jax_venv/bin/python \
-m cal_jax.main --distributed=always$quoted"
