#!/usr/bin/env bash
# `make demo`: tokenizer -> packed data -> a short warm-up run on the embedded corpus -> loss summary.
# Every stage is skipped when its output exists, and training resumes from its last checkpoint.
set -euo pipefail
cd "$(dirname "$0")/.."
DEMO_DIR=${DEMO_DIR:-runs/demo}
PY=${PY:-.venv/bin/python}
export PY

if [[ ! -f "$DEMO_DIR/tokenizer/spm.model" ]]; then
  echo "== 1/3 tokenizer (sentencepiece BPE on the embedded CPython docs corpus)"
  "$PY" tools/train_tokenizer.py --corpus=embedded --out="$DEMO_DIR/tokenizer/spm" --vocab_size=4096
fi
if [[ ! -f "$DEMO_DIR/data/metadata.json" ]]; then
  echo "== 2/3 packed sequences (ArrayRecord, train + held-out documents)"
  "$PY" tools/prepare_data.py --corpus=embedded --tokenizer="$DEMO_DIR/tokenizer/spm.model" \
    --out="$DEMO_DIR/data" --seq_len=256
fi
echo "== 3/3 warm-up training (configs/demo.py)"
bash launch/local.sh configs/demo.py --workdir="$DEMO_DIR/train" --config.data.path="$DEMO_DIR/data" \
  --verbosity=-1 "$@"
"$PY" tools/summarize_run.py --workdir="$DEMO_DIR/train"
