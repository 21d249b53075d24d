#!/usr/bin/env bash
# SPEED at small scale (issue #35): a plain GPT and a parameter-shared GPT at twice the logical depth, trained
# from scratch at one token budget, decoded standard and with --strategy speed, next to a RecycleGPT small model.
#   bash experiments/speed_small/run.sh data    # held-in Austen + KJV -> token memmaps (1 min)
#   bash experiments/speed_small/run.sh train   # four runs, resumable
#   bash experiments/speed_small/run.sh eval    # perplexities, early-exit agreement, decode speed, then report.py
# Runs go to $RUNS (default runs/speed_small); results to experiments/speed_small/results/.
set -euo pipefail
cd "$(dirname "$0")/../.."
RUNS=${RUNS:-runs/speed_small}
RES=experiments/speed_small/results
mkdir -p "$RES"
RG=${RG:-.venv/bin/recyclegpt}
PY=${PY:-.venv/bin/python}
# shellcheck source=experiments/lib.sh
source experiments/lib.sh
THREADS=${THREADS:-2}
# One schedule for every run: 160 steps x 8 x 512 tokens = 0.66M tokens, lr 1e-3, seed 0.
MAIN="--data $RUNS/data --steps 160 --batch-size 8 --seq-len 512 --lr 1e-3 --warmup 16 --dtype bfloat16
       --eval-every 40 --eval-batches 8 --ckpt-every 40 --seed 0 --threads $THREADS"

stage_data() {
  [[ -f data/corpora/austen.txt && -f data/corpora/kjv.txt ]] || $PY scripts/fetch_corpora.py --only austen,kjv --out data/corpora
  $RG data split data/corpora/austen.txt data/corpora/kjv.txt --out "$RUNS/split"
  $RG data prepare "$RUNS/split/heldin/austen.txt" "$RUNS/split/heldin/kjv.txt" --out "$RUNS/data"
}

stage_train() {
  # shared_ee: 6 unique blocks run twice (12 logical layers) with the early-exit loss after the first pass,
  # the exit SPEED speculates from; shared: the same without that loss; plain: the small model (same unique
  # parameters, 6 layers) with the early-exit loss after layer 3; recycle: RecycleGPT small (1-layer module).
  train_one shared_ee --preset small-shared-2x --recycle-weight 0 --early-exit-weight 0.5 --early-exit-layer 6
  train_one plain --preset small --recycle-weight 0 --early-exit-weight 0.5 --early-exit-layer 3
  train_one shared --preset small-shared-2x --recycle-weight 0
  train_one recycle --preset small --recycle-weight 0.1 --module-layers 1
}

heldout() {  # the held-out 10% of Austen and the KJV, and 8 decode prompts from it (24 words from sentence starts)
  cat "$RUNS/split/heldout/austen.txt" "$RUNS/split/heldout/kjv.txt" > "$RUNS/heldout.txt"
  heldout_prompts "$RUNS/split/heldout/austen.txt" "$RUNS/split/heldout/kjv.txt" > "$RUNS/prompts.jsonl"
}

stage_eval() {
  heldout
  for name in plain shared_ee shared recycle; do eval_one "$name"; done
  $PY experiments/speed_small/report.py --runs "$RUNS" --results "$RES" --measure
}

case "${1:-}" in
  data) stage_data ;;
  train) stage_train ;;
  eval) stage_eval ;;
  *) echo "usage: $0 data|train|eval" >&2; exit 2 ;;
esac
