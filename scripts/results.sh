#!/usr/bin/env bash
# The runs behind docs/RESULTS.md, one experiment per name; every one resumes where it stopped
# (checkpoints in out/runs/NAME), so a long list survives across sessions:
#   scripts/results.sh NAME [NAME ...]     run them one after the other
#   scripts/results.sh NAME:fp32,ibm4      only those recipes of NAME (same folders; a later
#                                          full NAME skips what has finished)
#   scripts/results.sh NAME@1               NAME with --seed 1, in out/runs/NAME-seed1
#   scripts/results.sh collect             copy what has finished into results/NAME/RECIPE
#                                          (scripts/results_tables.py then draws and tabulates it)
# The machine-independent part of a result is its command line, printed before each run and
# written beside its numbers in docs/RESULTS.md. OMP_NUM_THREADS picks the threads per run.
set -euo pipefail
cd "$(dirname "$0")/.."
FOURBIT=${FOURBIT:-.venv/bin/fourbit}
RUNS=${RUNS:-out/runs}
COMMON=(--resume --checkpoint-every 100 --quiet)

args_for() {
  case "$1" in
    r20-headline) echo "--task fashion-resnet20 --recipes fp32,ibm4,fp16,hfp8,luq4,mxfp4,nvfp4 --epochs 15" ;;
    r20-ablation) echo "--task fashion-resnet20 --recipes fp32,fp16,ibm4,ibm4-notpr,ibm4-radix2,ibm4-nogradscale,ibm4-radix8,ibm4-fp16acc,all4,ibm4-luqgrad,ibm4-fp16grad --epochs 5 --train-limit 12000" ;;
    r20-adam) echo "--task fashion-resnet20 --recipes fp32,ibm4,ibm4-fp16grad --epochs 5 --train-limit 12000 --optimizer adam --lr 1e-3" ;;
    mnv2) echo "--task fashion-mobilenetv2 --recipes fp32,ibm4,ibm4-pw-hfp8 --epochs 5 --train-limit 12000" ;;
    translate-headline) echo "--task translate-transformer --recipes fp32,ibm4,fp16,hfp8,luq4,mxfp4,nvfp4,ibm4-luqgrad,ibm4-nvfp4grad,ibm4-fp16grad,ibm4-sawb-nvfp4grad,ibm4-sawb-nvfp4grad-nvprobs,ibm4-rowsawb-nvfp4grad-nvprobs,ibm4-usawb-nvfp4grad-nvprobs,ibm4-usawb-nvfp4rtngrad-nvprobs,ibm4-umse-nvfp4rtngrad-nvprobs,ibm4-usawb-nvprobs-fp16grad" ;;
    translate-ablation) echo "--task translate-transformer --recipes fp32,ibm4,ibm4-notpr,ibm4-radix2,ibm4-nogradscale,ibm4-radix8,ibm4-fp16acc,all4,ibm4-sawb,ibm4-fp16grad,ibm4-fp16fwd,ibm4-gradsr,luq4,ibm4-matmul-fp16grad,ibm4-luqgrad,ibm4-fp16dx,ibm4-fp16dw,ibm4-nvfp4grad,ibm4-nvfp4dx --epochs 1" ;;
    translate-sgd) echo "--task translate-transformer --recipes fp32,ibm4 --epochs 1 --optimizer sgd --lr 0.1" ;;
    speech-headline) echo "--task speech-bilstm --recipes fp32,ibm4,fp16,hfp8,luq4,mxfp4,nvfp4" ;;
    *) echo "unknown experiment $1; known: r20-headline r20-ablation r20-adam mnv2 translate-headline translate-ablation translate-sgd speech-headline collect" >&2; return 2 ;;
  esac
}

collect() {  # finished runs only (summary.json is written last), without checkpoints
  for summary in "$RUNS"/*/*/summary.json; do
    [ -e "$summary" ] || continue
    run=$(dirname "$summary") name=$(basename "$(dirname "$run")") recipe=$(basename "$run")
    mkdir -p "results/$name/$recipe"
    cp "$run/summary.json" "$run/metrics.jsonl" "results/$name/$recipe/"
    [ -e "$run/curves.png" ] && cp "$run/curves.png" "results/$name/$recipe/"
    echo "results/$name/$recipe"
  done
}

for name in "$@"; do
  if [ "$name" = collect ]; then collect; continue; fi
  only=""
  case "$name" in *:*) only=${name#*:} name=${name%%:*} ;; esac
  seed=${name#*@} name=${name%%@*} out=$name
  read -r -a args <<< "$(args_for "$name")"
  if [ "$seed" != "$name" ]; then args+=(--seed "$seed"); out=$name-seed$seed; fi
  if [ -n "$only" ]; then  # --recipes LIST replaced by the subset
    for i in "${!args[@]}"; do [ "${args[$i]}" = --recipes ] && args[i+1]=$only; done
  fi
  echo "$(date -u +%FT%TZ) fourbit compare ${args[*]} --out $RUNS/$out ${COMMON[*]}"
  "$FOURBIT" compare "${args[@]}" --out "$RUNS/$out" "${COMMON[@]}"
done
