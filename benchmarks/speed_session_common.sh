# Sourced by benchmarks/speed_session*.sh: environment for a speed session on the GPU machine.
# - installs the carried wheels (.whl from ../shared/tools/device-wheels.sh, .whl_extra from
#   benchmarks/fetch_device_wheels.sh) into $SITE (default /tmp/site) once, one wheel per package (.whl first);
# - OUTDIR: $OUT on the device machine (what comes back), else benchmarks/results/speed_<date>;
# - RESULTS_IN=path/to/earlier.jsonl (a file carried in the working tree) resumes an earlier
#   call's table: its rows are kept and only the missing candidates run.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false WANDB_MODE=offline
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
PY=${PY:-python3}
SITE=${SITE:-/tmp/site}  # where carried wheels are installed (the device README's place)

install_wheels() {
  local dirs=() w name seen=" " list=()
  for d in .whl .whl_extra; do [ -d "$d" ] && dirs+=("$d"); done
  [ ${#dirs[@]} -gt 0 ] || return 0
  for d in "${dirs[@]}"; do
    for w in "$d"/*.whl; do
      [ -e "$w" ] || continue
      name=$(basename "$w" | cut -d- -f1 | tr 'A-Z.-' 'a-z__')
      case "$seen" in *" $name "*) continue ;; esac
      seen+="$name "; list+=("$w")
    done
  done
  echo "installing ${#list[@]} carried wheels into ${SITE}:"
  echo "  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target ${SITE} ${list[*]}"
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$SITE" "${list[@]}" || { echo "error: wheel install failed" >&2; exit 1; }
  touch "$SITE/.speed_session_installed"
}
if [ ! -e "$SITE/.speed_session_installed" ]; then
  if ! $PY -c "import megatron.core, hydra, omegaconf" 2>/dev/null || [ -d .whl_extra ]; then
    install_wheels
  fi
fi
pp="$PWD"; [ -d "$SITE" ] && pp="$pp:$SITE"
export PYTHONPATH="$pp${PYTHONPATH:+:$PYTHONPATH}"

OUTDIR=${OUT:-benchmarks/results/speed_$(date +%F)}
mkdir -p "$OUTDIR"
# a commit for the table header where the working tree came without .git (the device copy)
if [ -z "${BENCH_COMMIT:-}" ] && [ -f .bench_commit ]; then export BENCH_COMMIT=$(cat .bench_commit); fi

resume_file() {  # resume_file NAME: the results file of this call, seeded from RESULTS_IN
  local f="$OUTDIR/$1"
  if [ -n "${RESULTS_IN:-}" ] && [ -f "$RESULTS_IN" ] && [ ! -e "$f" ]; then cp "$RESULTS_IN" "$f"; fi
  echo "$f"
}

$PY - <<'PY'
import torch, sys
print("python", sys.version.split()[0], "| torch", torch.__version__, "| cuda",
      torch.cuda.is_available() and torch.cuda.get_device_name(0))
PY
