#!/usr/bin/env bash
# Equal-settings speed table for Llama-shaped decoders on one GPU (issue "Speed on Llama-shaped
# decoders"): Llama-3.2-1B, Qwen2.5-1.5B and Llama-3.2-3B shapes, seq 2048, dropout 0, ours
# (train.py) vs HF + torch.compile, each at its best micro-batch, and torchtitan 0.2.2 at the
# Llama shapes when it imports (carry .whl_extra: benchmarks/fetch_device_wheels.sh). About 8
# minutes of GPU time per call:
#
#   BENCH_COMMIT=$(git rev-parse --short=12 HEAD) bash benchmarks/speed_session_llama.sh [MODELS]
#
# MODELS: comma-separated (default llama3_1b,qwen2_5_1_5b,llama3_3b). Each group's expected-best
# micro-batch runs first for every shape, then the next ones, as the budget allows; a second call
# with RESULTS_IN=<the first call's jsonl, copied into the tree> fills in the rest.
source "$(dirname "$0")/speed_session_common.sh"
MODELS=${1:-llama3_1b,qwen2_5_1_5b,llama3_3b}
# expected best first (issue 29: HF and ours best at 12 for the 1B shape)
OURS_MBS="llama3_1b:12,16,8 qwen2_5_1_5b:8,12,16 qwen2_5_1_5b_untied:8,12,16 llama3_3b:4,8,6"
HF_MBS="llama3_1b:12,16,8 qwen2_5_1_5b:8,12,4 qwen2_5_1_5b_untied:8,12,4 llama3_3b:4,8,6"
TT_MBS="llama3_1b:12,16 llama3_3b:4,8"
keep() {  # keep only the entries of the models asked for
  local out=() e
  for e in $1; do case ",$MODELS," in *",${e%%:*},"*) out+=("$e") ;; esac; done
  echo "${out[*]}"
}
TT_ARGS=()
if $PY -c "import torchtitan, torchdata, tyro" 2>/dev/null; then
  TT=$(keep "$TT_MBS"); [ -n "$TT" ] && TT_ARGS=(--tt-mbs "$TT")
else
  echo "torchtitan does not import here: no torchtitan rows (carry .whl_extra)"
fi
RESULTS=$(resume_file "speed_llama.jsonl")
OURS_ARG=$(keep "${OURS_MBS_OVERRIDE:-$OURS_MBS}"); HF_ARG=$(keep "${HF_MBS_OVERRIDE:-$HF_MBS}")
set -x
$PY benchmarks/speed_table.py --models "$MODELS" --dropouts 0 \
  --ours-mbs "$OURS_ARG" --hf-mbs "$HF_ARG" \
  "${TT_ARGS[@]}" --steps "${STEPS:-20}" --budget-s "${BUDGET_S:-450}" \
  --results "$RESULTS" --table-out "$OUTDIR/speed_llama.md" ${EXTRA_ARGS:-}
