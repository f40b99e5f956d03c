#!/usr/bin/env bash
# `make demo`: tokenizer -> packed data -> a short warm-up run on the embedded corpus -> loss summary -> the memory
# bank of the knowledge base (every document) -> its retrieval index -> the references of every training chunk.
# Every stage is skipped when its output exists, and training resumes from its last checkpoint.
set -euo pipefail
cd "$(dirname "$0")/.."
DEMO_DIR=${DEMO_DIR:-runs/demo}
PY=${PY:-.venv/bin/python}
export PY

if [[ ! -f "$DEMO_DIR/tokenizer/spm.model" ]]; then
  echo "== 1/6 tokenizer (sentencepiece BPE on the embedded CPython docs corpus)"
  "$PY" tools/train_tokenizer.py --corpus=embedded --out="$DEMO_DIR/tokenizer/spm" --vocab_size=4096
fi
if [[ ! -f "$DEMO_DIR/data/metadata.json" ]]; then
  echo "== 2/6 packed sequences (ArrayRecord, train + held-out documents)"
  "$PY" tools/prepare_data.py --corpus=embedded --tokenizer="$DEMO_DIR/tokenizer/spm.model" \
    --out="$DEMO_DIR/data" --seq_len=256
fi
echo "== 3/6 warm-up training (configs/demo.py)"
bash launch/local.sh configs/demo.py --workdir="$DEMO_DIR/train" --config.data.path="$DEMO_DIR/data" \
  --verbosity=-1 "$@"
"$PY" tools/summarize_run.py --workdir="$DEMO_DIR/train"
echo "== 4/6 memory bank of the knowledge base (every document; the warm-up checkpoint writes it)"
"$PY" tools/write_memory.py --config=configs/demo.py --checkpoint="$DEMO_DIR/train" \
  --tokenizer="$DEMO_DIR/tokenizer/spm.model" --knowledge=embedded --bank="$DEMO_DIR/bank"
if [[ ! -f "$DEMO_DIR/bank/index/index.json" ]]; then
  echo "== 5/6 retrieval index (all-MiniLM-L6-v2 embeddings, ScaNN)"
  "$PY" tools/build_index.py --config=configs/demo.py --bank="$DEMO_DIR/bank" \
    --tokenizer="$DEMO_DIR/tokenizer/spm.model"
fi
echo "== 6/6 references of every 64-token chunk of the training data (leakage-filtered)"
"$PY" tools/retrieve.py --config=configs/demo.py --data="$DEMO_DIR/data" --bank="$DEMO_DIR/bank"
