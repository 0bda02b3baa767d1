#!/usr/bin/env bash
# The full-set evaluations of bench/results (the acceptance runs of eval-ppl and eval-zeroshot).
# They take hours on a CPU, so every one keeps its answers in $CACHE as it goes: run the same job
# again after a stop (or in the next session) and it resumes; finished variants are read back.
# The default cache, bench/full-sets-cache, is committed: a job that outlasts a session (and its
# machine) resumes from a clone, and the per-window NLLs behind each results table stay with it.
#
#   bench/full_sets.sh JOB [OUT_DIR]     JOB: zeroshot-smollm2 | ppl-smollm2 | ppl-gemma
#
# Results: OUT_DIR/<job>[-<task>].json (default out/full-sets). Environment: DATA (default
# ../shared/data), CACHE (default bench/full-sets-cache), LLMINT8 (default: llmint8 on PATH),
# METHODS (ppl jobs: the --methods list, default all).
# Two processes side by side with OMP_NUM_THREADS=1 each use a 2-core machine best: once the
# 16-bit baseline is cached, split the methods, e.g. METHODS=llm.int8,vectorwise in one shell and
# METHODS=llm.int8-zp,rowwise in another, then run the job once more with all of them: it reads
# every answer back and writes the complete table in seconds.
set -euo pipefail

job=${1:?usage: bench/full_sets.sh zeroshot-smollm2|ppl-smollm2|ppl-gemma [OUT_DIR]}
out=${2:-out/full-sets}
data=${DATA:-../shared/data}
cache=${CACHE:-$(dirname "$0")/full-sets-cache}
llmint8=${LLMINT8:-llmint8}
methods=${METHODS:-all}
mkdir -p "$out"

save() {  # NAME COMMAND...: the command's JSON to OUT_DIR/NAME.json, moved into place when complete
    local name=$1
    shift
    "$@" > "$out/$name.json.part" && mv "$out/$name.json.part" "$out/$name.json"
}

ppl() {  # MODEL NAME METHODS, then the extra eval-ppl options
    local model=$1 name=$2 list=$3
    shift 3
    save "$name" "$llmint8" eval-ppl "$model" --dataset wikitext2 --data-dir "$data" --methods "$list" --cache-dir "$cache" "$@"
}

table() {  # NAME: the name of a table run over $METHODS; a partial run does not take the complete table's name
    [[ $methods == all ]] && echo "$1" || echo "$1-${methods//,/_}"
}

case $job in
zeroshot-smollm2)
    for task in piqa winogrande lambada hellaswag; do  # the quick ones first
        save "$job-$task" "$llmint8" eval-zeroshot smollm2-135m --tasks "$task" --methods llm.int8 --data-dir "$data" \
            --batch-size 32 --cache-dir "$cache"
    done ;;
ppl-smollm2) ppl smollm2-135m "$(table "$job")" "$methods" --seq-len 2048 ;;
ppl-gemma)  # both BOS protocols of the issue: the table with a BOS at the text start, and
    # llm.int8 with a BOS per window (the only method the issue's reference gives for it)
    ppl gemma3-270m "$(table "$job-bos-text")" "$methods" --seq-len 2048 --bos text
    ppl gemma3-270m "$job-bos-window" llm.int8 --seq-len 2048 --bos window ;;
*) echo "unknown job $job" >&2; exit 2 ;;
esac
