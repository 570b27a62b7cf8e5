#!/usr/bin/env bash
# The GPU part of `train.fp8` on one H100/H200, in three stages of a few minutes each (one device
# call each), everything printed kept under $OUT (or benchmarks/results/):
#   bash benchmarks/fp8_gpu.sh tests   # tests/test_gpu_fp8.py + benchmarks/fp8_linear.py
#   bash benchmarks/fp8_gpu.sh speed   # throughput.py: gpt2-xl mb16 (bf16 eager and graphed, tensorwise
#                                      #   graphed and eager, delayed, rowwise),
#                                      #   gpt2-large mb24 (bf16, tensorwise, delayed)
#   bash benchmarks/fp8_gpu.sh margin  # gpt2-xl mb16: bf16, tensorwise, delayed, bf16 again (the
#                                      #   bf16 row's spread inside the call), then fp8_linear.py
#                                      #   --parts (the in-place weight-gradient A/B per linear)
#   bash benchmarks/fp8_gpu.sh act     # model.fp8_fused_act: its GPU tests (repeated transposes, bits, fc2 vs
#                                      #   float64, 20 steps fused vs unfused from one init), then
#                                      #   gpt2-xl mb16 bf16, delayed, delayed + fused act, bf16
#   bash benchmarks/fp8_gpu.sh best    # model.fp8_fused_act_backward: its GPU tests and the fused
#                                      #   activation's training test (unrun on 2026-12-05), then
#                                      #   gpt2-xl mb16 bf16, the best recipe (delayed + both fused
#                                      #   activation casts), bf16 again, then two profiled steps of
#                                      #   the best recipe under $OUT/profiles (what is left to gain)
#   bash benchmarks/fp8_gpu.sh tiles   # fp8_cast_tiles.py (the cast kernels' tiles at gpt2-xl mb16,
#                                      #   JSON under $OUT), then gpt2-xl mb16 bf16, the best recipe
#                                      #   at the default tiles | the best recipe with the tiles
#                                      #   that table chose (FP8_CAST_TILES), bf16 (two
#                                      #   throughput.py runs in one call: each ratio is against
#                                      #   the bf16 row of its own run)
#   bash benchmarks/fp8_gpu.sh dh      # the unstored fc1 output gradient and fast accumulation in
#                                      #   backward: their GPU tests, then gpt2-xl mb16 bf16, the
#                                      #   best recipe, the same as before (fc1's output gradient
#                                      #   stored, QKV's bias added after its GEMM), the same
#                                      #   storing fc1's output gradient only, the best recipe with
#                                      #   model.fp8_backward_fast_accum=true, the best again, bf16
#   bash benchmarks/fp8_gpu.sh accum_loss # fp8_loss.py: 500 steps, bf16 vs the best recipe with
#                                      #   and without fast accumulation in backward
#   bash benchmarks/fp8_gpu.sh loss    # fp8_loss.py: 500 steps, bf16 vs tensorwise and delayed,
#                                      #   PNG + JSON
#   bash benchmarks/fp8_gpu.sh profile # gpt2-xl mb16, bf16 and tensorwise, two profiled steps
#                                      #   each, kernel tables under $OUT/profiles (where FP8's
#                                      #   end-to-end time goes)
# Wheels: those of ../shared/tools/device-wheels.sh in .whl/ (FP8 itself needs none; torchao, for
# fp8_linear.py's comparison only, is picked up from .whl_extra/ when present).
set -o pipefail
stage=${1:?usage: fp8_gpu.sh tests|speed|margin|act|best|tiles|dh|accum_loss|loss|profile}
for d in .whl .whl_extra; do
  if [ -d $d ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site $d/*.whl || exit
  fi
done
export PYTHONPATH=$PWD:/tmp/site PYTHONUNBUFFERED=1 WANDB_MODE=offline
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
out=${OUT:-benchmarks/results}
mkdir -p "$out"
{ date -u; nvidia-smi -L; python3 -c "import torch; print('torch', torch.__version__)"; } \
  2>&1 | tee "$out/fp8_$stage.log"
case $stage in
  tests)
    python3 -m pytest -m gpu -v -p no:cacheprovider tests/test_gpu_fp8.py 2>&1 | tee -a "$out/fp8_$stage.log"
    cp results/gpu/parity.log "$out/fp8_parity.log" 2>/dev/null
    ao=$(python3 -c "import torchao" 2>/dev/null && echo --torchao)
    python3 benchmarks/fp8_linear.py --model gpt2_xl --tokens 16384 $ao 2>&1 | tee -a "$out/fp8_$stage.log"
    ;;
  speed)
    python3 benchmarks/throughput.py --model gpt2_xl --hf-micro-batches "" \
      --runs default:16,cuda_graph:16,fp8:16,fp8_delayed:16,fp8_eager:16,fp8_rowwise:16 --steps 15 2>&1 | tee -a "$out/fp8_$stage.log"
    python3 benchmarks/throughput.py --model gpt2_large --hf-micro-batches "" \
      --runs default:24,fp8:24,fp8_delayed:24 --steps 15 2>&1 | tee -a "$out/fp8_$stage.log"
    ;;
  margin)
    python3 benchmarks/throughput.py --model gpt2_xl --hf-micro-batches "" \
      --runs default:16,fp8:16,fp8_delayed:16,default:16 --steps 15 2>&1 | tee -a "$out/fp8_$stage.log"
    python3 benchmarks/fp8_linear.py --model gpt2_xl --tokens 16384 --parts 2>&1 | tee -a "$out/fp8_$stage.log"
    ;;
  act)
    python3 -m pytest -m gpu -v -p no:cacheprovider tests/test_gpu_fp8.py \
      -k "transpose or activation_cast or fused_activation or activation_backward" 2>&1 \
      | tee -a "$out/fp8_$stage.log"
    cp results/gpu/parity.log "$out/fp8_parity.log" 2>/dev/null
    python3 benchmarks/throughput.py --model gpt2_xl --hf-micro-batches "" \
      --runs default:16,fp8_delayed:16,fp8_delayed_fused_act:16,fp8_delayed_fused_act_bwd:16,default:16 \
      --steps 15 2>&1 | tee -a "$out/fp8_$stage.log"
    ;;
  best)
    python3 -m pytest -m gpu -v -p no:cacheprovider tests/test_gpu_fp8.py \
      -k "activation_backward or fused_activation_trains" 2>&1 | tee -a "$out/fp8_$stage.log"
    cp results/gpu/parity.log "$out/fp8_parity.log" 2>/dev/null
    python3 benchmarks/throughput.py --model gpt2_xl --hf-micro-batches "" \
      --runs default:16,fp8_delayed_fused_act_bwd:16,default:16 --steps 15 2>&1 | tee -a "$out/fp8_$stage.log"
    python3 benchmarks/throughput.py --model gpt2_xl --hf-micro-batches "" \
      --runs fp8_delayed_fused_act_bwd:16 --steps 10 --profile-dir "$out/profiles" 2>&1 | tee -a "$out/fp8_$stage.log"
    ;;
  tiles)
    python3 benchmarks/fp8_cast_tiles.py --model gpt2_xl --micro-batch 16 --out "$out/fp8_tiles.json" \
      2>&1 | tee -a "$out/fp8_$stage.log"
    tiles=$(python3 -c "import json, sys; print(json.load(open(sys.argv[1]))['env'])" "$out/fp8_tiles.json") || exit
    python3 benchmarks/throughput.py --model gpt2_xl --hf-micro-batches "" \
      --runs default:16,fp8_delayed_fused_act_bwd:16 --steps 15 2>&1 | tee -a "$out/fp8_$stage.log"
    echo "FP8_CAST_TILES=$tiles" | tee -a "$out/fp8_$stage.log"
    FP8_CAST_TILES=$tiles python3 benchmarks/throughput.py --model gpt2_xl --hf-micro-batches "" \
      --runs fp8_delayed_fused_act_bwd:16,default:16 --steps 15 2>&1 | tee -a "$out/fp8_$stage.log"
    ;;
  dh)
    python3 -m pytest -m gpu -v -p no:cacheprovider tests/test_gpu_fp8.py \
      -k "activation_backward or fused_act_bwd or fast_accum" 2>&1 | tee -a "$out/fp8_$stage.log"
    cp results/gpu/parity.log "$out/fp8_parity.log" 2>/dev/null
    python3 benchmarks/throughput.py --model gpt2_xl --hf-micro-batches "" \
      --runs default:16,fp8_delayed_fused_act_bwd:16,fp8_best_before:16,fp8_best_fast_bwd:16,default:16 \
      --steps 15 2>&1 | tee -a "$out/fp8_$stage.log"
    ;;
  accum_loss)
    python3 benchmarks/fp8_loss.py --steps 500 --recipes best,best_fast_bwd --out "$out" 2>&1 \
      | tee -a "$out/fp8_$stage.log"
    ;;
  profile)
    python3 benchmarks/throughput.py --model gpt2_xl --hf-micro-batches "" \
      --runs default:16,fp8_eager:16 --steps 10 --profile-dir "$out/profiles" 2>&1 | tee -a "$out/fp8_$stage.log"
    ;;
  loss)
    python3 benchmarks/fp8_loss.py --steps 500 --recipes tensorwise,delayed --out "$out" 2>&1 \
      | tee -a "$out/fp8_$stage.log"
    ;;
esac
