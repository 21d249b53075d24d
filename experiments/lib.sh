# Helpers the experiments' run.sh scripts share (sourced; they set RUNS, RES, RG, PY, THREADS and MAIN first).

train_one() {  # name, extra args...: `recyclegpt train $MAIN args` into $RUNS/name; resumes an interrupted run
  local name=$1; shift
  local resume=(); [[ -f "$RUNS/$name/checkpoint.pt" ]] && resume=(--resume)
  if [[ -f "$RUNS/$name/done" ]]; then return; fi
  # shellcheck disable=SC2086
  $RG train $MAIN "$@" --out "$RUNS/$name" "${resume[@]}" && touch "$RUNS/$name/done"
}

heldout_prompts() {  # text files...: decode prompts as JSONL on stdout, 24 words from 4 evenly spaced sentence starts of each
  $PY - "$@" <<'PY'
import json, sys
for path in sys.argv[1:]:
    words = " ".join(ln for ln in open(path) if "====" not in ln).split()
    starts = [i for i in range(1, len(words) - 24) if words[i - 1].endswith(".") and words[i][0].isupper()]
    for k in range(4):
        i = starts[(2 * k + 1) * len(starts) // 8]
        print(json.dumps({"prompt": " ".join(words[i : i + 24])}))
PY
}

eval_one() {  # name: held-out perplexities and module accuracy of one run
  local run="$RUNS/$1"
  [[ -f "$RES/eval_$1.json" ]] || $RG eval --model "$run" --module "$run/module.safetensors" \
    --text "$RUNS/heldout.txt" --max-tokens 40000 --seq-len 512 --batch-size 4 --threads "$THREADS" \
    --json "$RES/eval_$1.json"
}
