#!/usr/bin/env bash
# Diversity selection on the real instruction mix in ../shared/data, three ways.
# The first run embeds the rows (about 100 rows/s on 2 CPU cores with bf16, so ~1 min for the
# 5,000-row slice below); later runs read the embedding cache and finish in seconds.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
data="$here/../../shared/data/t0-mix.jsonl.gz"
out="${OUT:-$here/out}"
mkdir -p "$out"

# A 5,000-row slice keeps the example quick; drop `head` to use all 48k rows.
python - "$data" "$out/mix-5k.jsonl" <<'PY'
import gzip, itertools, sys
with gzip.open(sys.argv[1], "rt") as src, open(sys.argv[2], "w") as dst:
    dst.writelines(itertools.islice(src, 5000))
PY

# 1. Plain max-min selection of 500 rows, with a task-coverage report against a random subset.
dyn select --method hmin "$out/mix-5k.jsonl" -k 500 --template "{prompt}\n{completion}" \
    --group-field task -o "$out/diverse-500.jsonl"

# 2. The same budget, balanced over tasks (greedy within each task).
dyn select --method hmin "$out/mix-5k.jsonl" -k 500 --template "{prompt}\n{completion}" \
    --stratify task -o "$out/diverse-500-stratified.parquet"

# 3. Machine-readable: one JSON summary on stdout (cached embeddings: no model work).
dyn select --method hmin "$out/mix-5k.jsonl" --fraction 0.02 --template "{prompt}\n{completion}" \
    -o "$out/diverse-2pct.jsonl" --json -q
