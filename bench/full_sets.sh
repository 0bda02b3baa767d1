#!/usr/bin/env bash
# The full-set evaluations of bench/results (the acceptance runs of eval-ppl and eval-zeroshot).
# They take hours on a CPU, so every one keeps its answers in $CACHE as it goes: run the same job
# again after a stop (or in the next session) and it resumes; finished variants are read back.
#
#   bench/full_sets.sh JOB [OUT_DIR]     JOB: zeroshot-smollm2 | ppl-smollm2 | ppl-gemma
#
# Results: OUT_DIR/<job>[-<task>].json (default out/full-sets). Environment: DATA (default
# ../shared/data), CACHE (default ~/.cache/llmint8-eval), LLMINT8 (default: llmint8 on PATH).
# Two jobs side by side with OMP_NUM_THREADS=1 each use a 2-core machine best.
set -euo pipefail

job=${1:?usage: bench/full_sets.sh zeroshot-smollm2|ppl-smollm2|ppl-gemma [OUT_DIR]}
out=${2:-out/full-sets}
data=${DATA:-../shared/data}
cache=${CACHE:-$HOME/.cache/llmint8-eval}
llmint8=${LLMINT8:-llmint8}
mkdir -p "$out"

ppl() {  # model name-in-results, then the extra eval-ppl options
    local model=$1 name=$2
    shift 2
    "$llmint8" eval-ppl "$model" --dataset wikitext2 --data-dir "$data" --methods all --cache-dir "$cache" "$@" \
        > "$out/$name.json.part" && mv "$out/$name.json.part" "$out/$name.json"
}

case $job in
zeroshot-smollm2)
    for task in piqa lambada hellaswag winogrande; do
        "$llmint8" eval-zeroshot smollm2-135m --tasks "$task" --methods llm.int8 --data-dir "$data" --batch-size 32 \
            --cache-dir "$cache" > "$out/$job-$task.json.part" && mv "$out/$job-$task.json.part" "$out/$job-$task.json"
    done ;;
ppl-smollm2) ppl smollm2-135m "$job" --seq-len 2048 ;;
ppl-gemma)  # both BOS protocols of the issue
    ppl gemma3-270m "$job-bos-text" --seq-len 2048 --bos text
    ppl gemma3-270m "$job-bos-window" --seq-len 2048 --bos window ;;
*) echo "unknown job $job" >&2; exit 2 ;;
esac
