#!/usr/bin/env bash
# Small-scale reproduction of the RecycleGPT paper's claims (see README.md beside this file).
#   bash experiments/paper_small/run.sh data    # held-in text -> token memmaps (1 min)
#   bash experiments/paper_small/run.sh train   # plain GPT vs RecycleGPT, then the module-depth ablation
#   bash experiments/paper_small/run.sh eval    # perplexities, module accuracy, lm-eval tasks, decode speed
#   bash experiments/paper_small/run.sh sweep   # recycle weight 0, 0.1, 0.1 with a 1-layer module; seeds 1 and 2 of 0 and 0.1/1-layer
#   bash experiments/paper_small/run.sh seeds   # the 0.1/1-layer run with seeds 3-5 ($SEEDS), for the word-order bar
# Runs go to $RUNS (default runs/paper_small); results to experiments/paper_small/results/.
set -euo pipefail
cd "$(dirname "$0")/../.."
RUNS=${RUNS:-runs/paper_small}
RES=experiments/paper_small/results
mkdir -p "$RES"
RG=${RG:-.venv/bin/recyclegpt}
PY=${PY:-.venv/bin/python}
# shellcheck source=experiments/lib.sh
source experiments/lib.sh
THREADS=${THREADS:-2}
# One schedule for the main pair: 400 steps x 8 x 512 tokens = 1.64M tokens, lr 1e-3, seed 0.
MAIN="--preset small --data $RUNS/data --steps 400 --batch-size 8 --seq-len 512 --lr 1e-3 --warmup 40
      --dtype bfloat16 --eval-every 40 --eval-batches 8 --ckpt-every 50 --seed 0 --threads $THREADS"
# The depth ablation: same settings, 160 steps (0.66M tokens) per depth.
ABL="${MAIN/--steps 400/--steps 160}"

stage_data() {
  $PY scripts/fetch_corpora.py --out data/corpora
  mkdir -p "$RUNS/heldin"
  # The first 90% of Austen and the KJV; the last 10% is where benchmarks/tasks come from.
  for f in austen kjv; do
    n=$(wc -l < data/corpora/$f.txt); head -n $((n * 9 / 10)) data/corpora/$f.txt > "$RUNS/heldin/$f.txt"
  done
  $RG data prepare "$RUNS/heldin/austen.txt" "$RUNS/heldin/kjv.txt" data/corpora/pythondoc.txt \
    data/corpora/linuxdoc.txt --out "$RUNS/data"
}

stage_train() {
  train_one recycle --recycle-weight 1
  train_one plain --recycle-weight 0
  for d in 1 2 4; do
    MAIN=$ABL train_one "depth$d" --recycle-weight 1 --module-layers $d
  done
}

heldout_text() {  # the last 10% of Austen and the KJV, which no run trained on, and the decode prompts
  for f in austen kjv; do
    n=$(wc -l < data/corpora/$f.txt); tail -n +$((n * 9 / 10 + 1)) data/corpora/$f.txt > "$RUNS/heldout_$f.txt"
  done
  cat "$RUNS/heldout_austen.txt" "$RUNS/heldout_kjv.txt" > "$RUNS/heldout.txt"
  # Decode prompts: 24 words from 4 evenly spaced sentence starts of each held-out text.
  heldout_prompts "$RUNS/heldout_austen.txt" "$RUNS/heldout_kjv.txt" > "$RUNS/prompts.jsonl"
}

lm_eval_one() {  # name, extra args...: the local lm-eval tasks (standard and alternating scoring by default)
  local name=$1; shift
  [[ -f "$RES/lm_eval_$name.json" ]] || $RG lm-eval --model "$RUNS/$name" "$@" --threads "$THREADS" \
    --json "$RES/lm_eval_$name.json"
}

draft_vocab_one() {  # name: the same module proposing only the 8192 most frequent training tokens
  local run="$RUNS/$1"
  [[ -f "$run/module_dv8192.safetensors" ]] || $RG draft-vocab --module "$run/module.safetensors" \
    --data "$RUNS/data" --size 8192 --out "$run/module_dv8192.safetensors"
}

bench_prepack_one() {  # name: decode speed with the draft-vocabulary module and --prepack (the sweep's setting)
  draft_vocab_one "$1"
  [[ -f "$RES/bench_$1_prepack.json" ]] || $RG bench --model "$RUNS/$1" \
    --module "$RUNS/$1/module_dv8192.safetensors" --prompts "$RUNS/prompts.jsonl" --max-new-tokens 128 \
    --repeats 5 --strategies standard alternating verified --draft-widths 1 4 --threads "$THREADS" --prepack \
    --json "$RES/bench_$1_prepack.json"
}

stage_eval() {
  heldout_text
  for name in recycle plain depth1 depth2 depth4; do
    eval_one "$name"
    draft_vocab_one "$name"  # a cheaper module step
  done
  lm_eval_one recycle --module "$RUNS/recycle/module.safetensors"
  lm_eval_one plain --scoring standard
  # Decode speed, greedy, batch 1, 128 new tokens; ratios are to standard in the same run.
  for name in recycle depth1 depth2 depth4; do
    for m in module module_dv8192; do
      $RG bench --model "$RUNS/$name" --module "$RUNS/$name/$m.safetensors" --prompts "$RUNS/prompts.jsonl" \
        --max-new-tokens 128 --repeats 3 --strategies standard alternating verified --threads "$THREADS" \
        --json "$RES/bench_${name}_$m.json"
    done
  done
  $PY experiments/paper_small/report.py --runs "$RUNS" --results "$RES"
}

stage_sweep() {
  # The recycle weight against the main head's perplexity: the main pair's schedule with lambda 0 (a plain
  # GPT again, so that every run of the sweep is timed and trained on one machine) and lambda 0.1.
  # w0.1d1: lambda 0.1 with a 1-layer module, to test the perplexity and speed bars on one model.
  for w in 0 0.1; do train_one "w$w" --recycle-weight "$w"; done
  train_one w0.1d1 --recycle-weight 0.1 --module-layers 1
  # w0sN, w0.1d1sN: the plain GPT and the 1-layer lambda 0.1 run again with seeds 1 and 2, how far runs
  # differ by seed alone and more pairs for the gaps. The seed also draws the validation batches, so each
  # run compares with the plain GPT of its own seed.
  for s in 1 2; do
    train_one "w0s$s" --recycle-weight 0 --seed "$s"
    train_one "w0.1d1s$s" --recycle-weight 0.1 --module-layers 1 --seed "$s"
  done
  heldout_text
  for name in w0 w0.1 w0.1d1 w0s1 w0.1d1s1 w0s2 w0.1d1s2; do eval_one "$name"; done
  for name in w0 w0s1 w0s2; do lm_eval_one "$name" --scoring standard; done
  for name in w0.1 w0.1d1 w0.1d1s1 w0.1d1s2; do lm_eval_one "$name" --module "$RUNS/$name/module.safetensors"; done
  for name in w0.1 w0.1d1 w0.1d1s1 w0.1d1s2; do bench_prepack_one "$name"; done
  $PY experiments/paper_small/report.py --runs "$RUNS" --results "$RES" --update w0 w0.1 w0.1d1 w0s1 w0.1d1s1 w0s2 w0.1d1s2
}

stage_seeds() {
  # w0.1d1sN: more seeds of the 1-layer lambda 0.1 run, for the task bar alone (standard against alternating
  # scoring of one model needs no plain GPT of the same seed). Each is scored on the four tasks as above,
  # and again on every word-order pair the held-out tail gives (851, of which the task's 300 come first).
  $PY scripts/make_tasks.py --out "$RUNS/tasks_all" --n 100000 > /dev/null
  heldout_text
  local seeds=${SEEDS:-3 4 5}
  for s in $seeds; do
    local name="w0.1d1s$s"
    train_one "$name" --recycle-weight 0.1 --module-layers 1 --seed "$s"
    lm_eval_one "$name" --module "$RUNS/$name/module.safetensors"
    [[ -f "$RES/lm_eval_${name}_word_order_all.json" ]] || $RG lm-eval --model "$RUNS/$name" \
      --module "$RUNS/$name/module.safetensors" --tasks-dir "$RUNS/tasks_all" --tasks recycle_word_order_austen \
      --threads "$THREADS" --json "$RES/lm_eval_${name}_word_order_all.json"
    eval_one "$name"
    bench_prepack_one "$name"
  done
  # shellcheck disable=SC2046
  $PY experiments/paper_small/report.py --runs "$RUNS" --results "$RES" --update $(printf 'w0.1d1s%s ' $seeds)
}

case "${1:-}" in
  data) stage_data ;;
  train) stage_train ;;
  eval) stage_eval ;;
  sweep) stage_sweep ;;
  seeds) stage_seeds ;;
  *) echo "usage: $0 data|train|eval|sweep|seeds" >&2; exit 2 ;;
esac
