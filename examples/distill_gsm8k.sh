#!/usr/bin/env bash
# Progressive distillation on GSM8K with `dyn train` + `dyn distill` (Panigrahi et al.,
# "Progressive distillation induces an implicit curriculum", ICLR 2025), at a CPU size.
#
#   1. a teacher (the `small` GPT-2 preset, BPE trained on its rows) trained on a GSM8K train slice,
#      a checkpoint every TEACHER_SAVE_EVERY steps, its held-out loss logged as it goes;
#   2. its checkpoints' top-32 next-token log-probabilities cached once for the students' rows;
#   3. one `tiny` student per schedule (none, one-shot, two-shot, progressive, salt) with the same
#      rows, steps, seed and learning rate, held-out loss on a GSM8K test slice every EVAL_EVERY steps;
#   4. a markdown table of held-out loss per schedule at each evaluated step
#      (examples/distill_gsm8k_table.py).
#
# Measured: 21 minutes on this project's 2-core CPU machine shared with other jobs (teacher 13,
# cache 3.6, each student under 1); results in docs/benchmarks.md, "distillation: GSM8K language
# example". OUT=folder writes elsewhere (default examples/out/distill-gsm8k).
set -euo pipefail
# Small models gain nothing from intra-op threads; on a busy machine two of them wait on each other.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
here="$(cd "$(dirname "$0")" && pwd)"
data="$here/../../shared/data"
out="${OUT:-$here/out/distill-gsm8k}"
mkdir -p "$out"

TEACHER_ROWS=2000        # GSM8K train rows 0-1,999: the teacher's data (and its tokenizer's)
STUDENT_ROWS=1280        # rows 0-1,279 of those: the students' data (one epoch at 160 x 8)
TEST_ROWS=200            # GSM8K test rows 0-199: held out, for every model
TEACHER_STEPS=320
TEACHER_SAVE_EVERY=40    # checkpoints 40, 80, ..., 320
STUDENT_STEPS=160
MULTIPLIER=2             # progressive: student step t follows the first checkpoint at or after 2t
EVAL_EVERY=20
STUDENT_LR=2e-3
SEED=0
format=(--template "{question}" --response-field answer --max-length 384)

head -n "$TEACHER_ROWS" "$data/gsm8k-train.jsonl" > "$out/teacher-train.jsonl"
head -n "$STUDENT_ROWS" "$data/gsm8k-train.jsonl" > "$out/student-train.jsonl"
head -n "$TEST_ROWS" "$data/gsm8k-test.jsonl" > "$out/test.jsonl"

# 1. The teacher: 4 layers, hidden 256, with checkpoints for the students to follow.
dyn train "$out/teacher-train.jsonl" "${format[@]}" --model small --train-tokenizer --vocab-size 2048 \
    --max-steps "$TEACHER_STEPS" --save-every "$TEACHER_SAVE_EVERY" --seed "$SEED" \
    --eval-data "$out/test.jsonl" --eval-every "$EVAL_EVERY" -o "$out/teacher" --overwrite -q
echo "teacher trained (${SECONDS}s)"

# 2. Every checkpoint's top-32 on the students' rows, once; the students never load the teacher.
dyn distill cache --teacher "$out/teacher" --data "$out/student-train.jsonl" --top-k 32 -o "$out/cache" -q
echo "teacher cached (${SECONDS}s)"

# 3. One student per schedule: 2 layers, hidden 64, the teacher's tokenizer; everything else equal.
for schedule in none one-shot two-shot progressive salt; do
    extra=()
    case "$schedule" in
        progressive) extra=(--multiplier "$MULTIPLIER") ;;
        salt) extra=(--salt-fraction 0.5) ;;  # KD for the first half, then labels only
    esac
    dyn distill --teacher-cache "$out/cache" --student tiny --data "$out/student-train.jsonl" \
        --schedule "$schedule" "${extra[@]}" --max-steps "$STUDENT_STEPS" --lr "$STUDENT_LR" --seed "$SEED" \
        --eval-data "$out/test.jsonl" --eval-every "$EVAL_EVERY" -o "$out/student-$schedule" --overwrite -q
    echo "student $schedule trained (${SECONDS}s)"
done

# 4. Held-out loss per schedule at each evaluated step, with the teacher at the same steps.
python "$here/distill_gsm8k_table.py" "$out"
echo "done in ${SECONDS}s"
