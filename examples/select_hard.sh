#!/usr/bin/env bash
# SALT-style selection on the real instruction mix in ../shared/data: train a small LM with
# `dyn train` on one slice, then let it score another slice and keep the hard-but-learnable rows.
# Measured: 14 minutes on this project's 2-core machine while three other jobs ran (10 of them
# training). The task report lands in the run record (figures.groups).
set -euo pipefail
# Tiny models gain nothing from intra-op threads; on a busy machine two of them wait on each other.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
here="$(cd "$(dirname "$0")" && pwd)"
data="$here/../../shared/data/t0-mix.jsonl.gz"
out="${OUT:-$here/out}"
mkdir -p "$out"

# Rows 0-3,999 train the small LM; rows 4,000-7,999 are the pool it scores.
python - "$data" "$out" <<'PY'
import gzip, itertools, sys
with gzip.open(sys.argv[1], "rt") as src:
    lines = list(itertools.islice(src, 8000))
open(f"{sys.argv[2]}/slm-train.jsonl", "w").writelines(lines[:4000])
open(f"{sys.argv[2]}/pool.jsonl", "w").writelines(lines[4000:])
PY

# 1. The small LM: the `tiny` GPT-2 preset with a byte-level BPE trained on its own rows.
dyn train "$out/slm-train.jsonl" --model tiny --train-tokenizer --vocab-size 4096 --max-length 512 \
    --max-steps 200 --batch-size 16 --lr 2e-3 -o "$out/slm" -q

# 2. Every pool row scored (median loss over the response tokens in the small LM's top 10),
#    with a per-task report and a histogram beside the output.
dyn score --method slm-hard "$out/pool.jsonl" --slm "$out/slm" --group-field task \
    -o "$out/pool.scored.parquet" --plot

# 3. The hardest 30% for a larger model to learn from first; then the most diverse 500 of those.
dyn select --method slm-hard "$out/pool.scored.parquet" --slm "$out/slm" --fraction 0.3 --group-field task \
    -o "$out/hard.parquet" --json -q > "$out/hard.summary.json"
dyn select --method hmin "$out/hard.parquet" -k 500 --template "{prompt}\n{completion}" -o "$out/hard-diverse.jsonl"
