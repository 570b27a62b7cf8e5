#!/usr/bin/env bash
# Run the GPU suite on the device machine and keep what it printed in results/gpu/ (gpu_suite.log,
# parity.log: git-ignored scratch; to record a run, rename them <date>_<card>_<what>.log).
# Usage (device machine, repo root, wheels from ../shared/tools/device-wheels.sh in .whl/):
#   bash tests/run_gpu_suite.sh [pytest args]
# The tests not yet run on a GPU: bash tests/run_gpu_suite.sh $(grep -v '^#' tests/gpu_unrun.txt)
set -o pipefail
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=$PWD:/tmp/site
fi
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 WANDB_MODE=offline
out=${OUT:-results/gpu}
mkdir -p "$out" results/gpu
rm -f results/gpu/parity.log
{ date -u; nvidia-smi -L; python3 -c "import torch; print('torch', torch.__version__)"; } 2>&1 | tee "$out/gpu_suite.log"
python3 -m pytest -m gpu -v -p no:cacheprovider "$@" 2>&1 | tee -a "$out/gpu_suite.log"
rc=$?
cp results/gpu/parity.log "$out/parity.log" 2>/dev/null
exit $rc
