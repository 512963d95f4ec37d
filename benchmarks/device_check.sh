#!/usr/bin/env bash
# The accelerator check in one go, from a plain checkout (nothing installed, no network): the
# versions and devices, then the quick benchmark (`bench_train_step.py --quick`), all written
# to one file. About 8 minutes on one GPU. See benchmarks/README.md, "Device check".
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: benchmarks/device_check.sh [--wheels DIR] [--out FILE] [--smoke] [-- BENCH_FLAGS...]

Needs python3 with jax (and its CUDA or TPU plugin), flax, optax, orbax-checkpoint, numpy and
scipy; torch (and torchvision) for the PyTorch rows. TensorFlow is not needed. Of the small
packages the benchmark imports besides (benchmarks/device_check_wheels.txt: ml_collections,
absl-py, PyYAML), those missing are installed from the wheels in DIR, with
`pip install --no-index --find-links DIR --no-deps --target TMP`, into a temporary folder put
on PYTHONPATH: the environment itself is left as it is. The checkout's root is put on
PYTHONPATH, so the package need not be installed.

Options:
  --wheels DIR   a folder of wheels (fetched on a machine with network, see the README)
  --out FILE     the report (default: benchmarks/device_check_UTCDATE.txt)
  --smoke        configs/tiny.py, 1 step, three rows: the script's own test, on a CPU
  -h, --help     this text
Flags after -- go to bench_train_step.py (e.g. -- --budget-s=400 --rows=cal:bf16).
Environment: PYTHON, the interpreter (default python3).
EOF
}

root="$(cd "$(dirname "$0")/.." && pwd)"
python="${PYTHON:-python3}"
wheels=""
out=""
smoke=0
bench_flags=()
while [ $# -gt 0 ]; do
  case "$1" in
    --wheels) wheels="$2"; shift 2 ;;
    --wheels=*) wheels="${1#*=}"; shift ;;
    --out) out="$2"; shift 2 ;;
    --out=*) out="${1#*=}"; shift ;;
    --smoke) smoke=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; bench_flags=("$@"); break ;;
    *) echo "device_check.sh: unknown argument $1" >&2; usage >&2; exit 2 ;;
  esac
done
out="${out:-$root/benchmarks/device_check_$(date -u +%Y%m%dT%H%M%SZ).txt}"
mkdir -p "$(dirname "$out")"
out="$(cd "$(dirname "$out")" && pwd)/$(basename "$out")"

# 1. The small pure-Python packages, where missing: from the wheel folder, into a folder of
#    their own (removed at exit).
site="$(mktemp -d "${TMPDIR:-/tmp}/device_check_site.XXXXXX")"
trap 'rm -rf "$site"' EXIT
missing=()
for pair in ml_collections:ml_collections absl:absl-py yaml:PyYAML; do
  if ! "$python" -c "import ${pair%%:*}" 2>/dev/null; then
    missing+=("${pair#*:}")
  fi
done
if [ ${#missing[@]} -gt 0 ]; then
  if [ -z "$wheels" ]; then
    echo "device_check.sh: missing ${missing[*]}: give --wheels DIR (see the README)" >&2
    exit 2
  fi
  echo "+ pip install --no-index --find-links $wheels --no-deps --target $site ${missing[*]}"
  "$python" -m pip install -q --no-index --find-links "$wheels" --no-deps --target "$site" \
    "${missing[@]}"
fi
export PYTHONPATH="$root:$site${PYTHONPATH:+:$PYTHONPATH}"
export XLA_PYTHON_CLIENT_PREALLOCATE="${XLA_PYTHON_CLIENT_PREALLOCATE:-false}"
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"
cd "$root"

# 2. Versions and devices (JAX's backend first, then torch), into the report.
{
  echo "# device_check.sh, $(date -u +%Y-%m-%dT%H:%M:%SZ), commit $(git -C "$root" rev-parse --short HEAD 2>/dev/null || echo unknown)"
  if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 || true
  fi
  "$python" - <<'EOF'
import importlib.metadata as metadata
import platform

import jax

print(f'python {platform.python_version()} on {platform.platform()}')
names = ['jax', 'jaxlib', 'flax', 'optax', 'orbax-checkpoint', 'numpy', 'scipy', 'torch',
         'torchvision', 'ml_collections', 'absl-py', 'PyYAML']
plugins = sorted({d.metadata['Name'] for d in metadata.distributions()
                  if (d.metadata['Name'] or '').lower().replace('_', '-').startswith(
                    ('jax-cuda', 'libtpu'))})
for name in names + plugins:
  try:
    print(f'  {name} {metadata.version(name)}')
  except metadata.PackageNotFoundError:
    print(f'  {name}: not installed')
try:
  import tensorflow
except ImportError:
  print('  tensorflow: not importable (not needed)')
else:
  print(f'  tensorflow {tensorflow.__version__} (not needed; the benchmark does not import it)')
print(f'jax backend {jax.default_backend()}, {jax.device_count()} device(s): {jax.devices()}')
for d in jax.local_devices():
  stats = d.memory_stats() or {}
  limit = stats.get('bytes_limit')
  print(f'  {d.id}: {d.device_kind}' + (f', {limit / 2**30:.1f} GiB' if limit else ''))
try:
  import torch
except ImportError:
  print('torch: not installed')
else:
  cuda = torch.cuda.is_available()
  print(f'torch {torch.__version__}, CUDA {torch.version.cuda}, GPU: '
        + (torch.cuda.get_device_name(0) if cuda else 'none'))
EOF
} 2>&1 | tee "$out.head"

# 3. The quick benchmark (the table goes to the report as well).
if [ "$smoke" = 1 ]; then
  set -- --config=configs/tiny.py --steps=1 --warmup=0 \
    --rows=cal:f32,cal_identity:f32,embed:bf16
else
  set -- --quick
fi
echo "+ $python benchmarks/bench_train_step.py $* ${bench_flags[*]:-}"
status=0
"$python" benchmarks/bench_train_step.py "$@" ${bench_flags[@]+"${bench_flags[@]}"} \
  --out="$out.table" || status=$?
{ cat "$out.head"; echo; [ -f "$out.table" ] && cat "$out.table"; } > "$out"
rm -f "$out.head" "$out.table"
echo "device_check.sh: the report is in $out"
exit "$status"
