#!/usr/bin/env bash
# `make demo`: the whole Memory3 pipeline on the embedded corpus and a generated knowledge task, ending in the
# result that matters: held-out entities, whose facts exist only in the knowledge base, answered with memory and not
# without it. Real tools at every stage (the commands are printed):
#
#    1 entities     tools/make_entities.py: fictional people; held-out ones are in the knowledge base only
#    2 tokenizer    tools/train_tokenizer.py on the continued stage's text
#    3 data         tools/prepare_data.py: the embedded corpus (warm-up) and bios mixed with it (continued stage)
#    4 warmup       launch/local.sh configs/quickstart.py: plain pretraining on the embedded corpus
#    5 bank         tools/write_memory.py: the knowledge base's memories, written by the warm-up checkpoint
#    6 index        tools/build_index.py: the references' embeddings in a ScaNN index
#    7 retrieve     tools/retrieve.py: the reference of every 64-token chunk of the continued stage's data
#    8 continued    launch/local.sh configs/quickstart_continued.py: the continued stage, reading memory
#    9 control      the same run with memory.read=False (one per seed of DEMO_CONTROL_SEEDS: their seed noise)
#   10 rewrite      tools/write_memory.py: the bank rewritten by the continued stage's final checkpoint
#   11 evaluate     tools/evaluate.py: held-out entities, held-out real text and decode speed, with memory /
#                   without / RAG for the continued model; without memory for the controls and the warm-up
#   12 sample       tools/generate.py --show_references: a held-out entity's answer and the references it read
#   13 plots        tools/plot_run.py: both stages' curves, the controls' beside
#   then            tools/demo_report.py: the results table (results.md, results.json) and the evaluation plot
#
# Each stage records its wall time in DEMO_DIR/stages/NAME.json and is skipped when that record exists; an
# interrupted training run or bank writer resumes where it stopped. Everything a stage prints goes to
# DEMO_DIR/logs/NAME.log (its last lines are shown when it fails).
#
# Environment: DEMO_DIR (runs/demo), PY (.venv/bin/python), DEMO_SIZE: full (the default, 15-20 min on 2 CPU cores)
# or tiny (a few steps of everything: the pipeline's plumbing, for tests; its numbers mean nothing).
set -euo pipefail
cd "$(dirname "$0")/.."
DEMO_DIR=${DEMO_DIR:-runs/demo}
PY=${PY:-.venv/bin/python}
DEMO_SIZE=${DEMO_SIZE:-full}
export PY JAX_PLATFORMS=${JAX_PLATFORMS:-cpu}
# Programs compiled by one stage's process and again by another's (the evaluations, a resumed stage) compile once.
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-$DEMO_DIR/.jax_cache}
export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=${JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS:-0.5}

case $DEMO_SIZE in
  full) ENTITIES=400; WARMUP_STEPS=100; WARMUP_EVAL=25; STEPS=600; EVAL_EVERY=100; CONTROL_SEEDS=${DEMO_CONTROL_SEEDS:-"0 1"}
        ENTITY_ITEMS=0; PASSAGES=64; DECODE_PROMPTS=32; DECODE_TOKENS=128; LR_WARMUP=10 ;;
  tiny) ENTITIES=40; WARMUP_STEPS=4; WARMUP_EVAL=2; STEPS=6; EVAL_EVERY=3; CONTROL_SEEDS=${DEMO_CONTROL_SEEDS:-"0"}
        ENTITY_ITEMS=8; PASSAGES=4; DECODE_PROMPTS=4; DECODE_TOKENS=8; LR_WARMUP=1 ;;
  *) echo "tools/demo.sh: DEMO_SIZE must be full or tiny, got '$DEMO_SIZE'" >&2; exit 2 ;;
esac

D=$DEMO_DIR
ENT=$D/entities
SPM=$D/tokenizer/spm.model
mkdir -p "$D/stages" "$D/logs" "$D/eval"
T_START=$SECONDS

# stage NAME TITLE COMMAND...: runs COMMAND unless NAME's record exists; its output goes to DEMO_DIR/logs/NAME.log,
# and every tool command it runs (through `run`) is printed here.
stage() {
  local name=$1 title=$2; shift 2
  local record="$D/stages/$name.json" log="$D/logs/$name.log"
  if [[ -f $record ]]; then
    echo "== $name: done ($(sed 's/[^0-9]//g' "$record") s when it ran), skipped"
    return
  fi
  echo "== $name: $title"
  local t0=$SECONDS
  if ! "$@" 3>&1 >"$log" 2>&1; then
    echo "tools/demo.sh: stage '$name' failed; the end of $log:" >&2
    tail -n 30 "$log" >&2
    exit 1
  fi
  printf '{"seconds": %d}\n' $((SECONDS - t0)) >"$record"
  echo "   $name: $((SECONDS - t0)) s"
}
run() {
  echo "   \$ $*" >&3
  "$@"
}

# The continued stage's inputs and length (configs/quickstart*.py set the model, memory geometry and recipe).
CONTINUED=(--config.init_from="$D/warmup" --config.data.path="$D/data" --config.data.tokenizer="$SPM"
           --config.memory.bank="$D/bank" --config.memory.knowledge="$ENT/knowledge.jsonl"
           --config.train.num_steps="$STEPS" --config.train.checkpoint_every="$STEPS"
           --config.train.eval_every="$EVAL_EVERY" --config.optimizer.warmup_steps="$LR_WARMUP")
# Evaluation reads one memory per chunk, as each chunk did in training (the paper layout: a one-chunk prompt has no
# earlier chunks whose references it would also read).
EVAL=(--entities="$ENT" --entity_items="$ENTITY_ITEMS" --heldout_data="$D/data_warmup" --passages="$PASSAGES"
      --noknowledge_cloze --tokenizer="$SPM" --slots=1)

prepare_both() {
  run "$PY" tools/prepare_data.py --corpus=embedded --tokenizer="$SPM" --out="$D/data_warmup" --seq_len=128
  run "$PY" tools/prepare_data.py --corpus="$ENT/train.jsonl" --tokenizer="$SPM" --out="$D/data" --seq_len=128
}
retrieve_both() {
  local split
  for split in train heldout; do
    run "$PY" tools/retrieve.py --config=configs/quickstart.py --data="$D/data" --split=$split --bank="$D/bank" \
      --knowledge=
  done
}
evaluate_all() {
  run "$PY" tools/evaluate.py --checkpoint="$D/continued" --bank="$D/bank_continued" --index="$D/bank/index" \
    "${EVAL[@]}" --decode_prompts="$DECODE_PROMPTS" --decode_tokens="$DECODE_TOKENS" --out="$D/eval/continued.json"
  local run_name
  for run_name in warmup $(printf 'control_s%s ' $CONTROL_SEEDS); do
    run "$PY" tools/evaluate.py --checkpoint="$D/$run_name" --modes=none "${EVAL[@]}" --out="$D/eval/$run_name.json"
  done
}
sample() {
  grep -m1 '"heldout": true' "$ENT/cloze.jsonl" >"$D/eval/sample_prompt.jsonl"
  local mode
  for mode in memory3 none; do
    run "$PY" tools/generate.py --checkpoint="$D/continued" --bank="$D/bank_continued" --index="$D/bank/index" \
      --tokenizer="$SPM" --prompts_file="$D/eval/sample_prompt.jsonl" --mode=$mode --max_new_tokens=8 \
      --slots=1 --show_references >"$D/eval/sample_$mode.txt"
  done
}
plots() {
  local controls=() seed
  for seed in $CONTROL_SEEDS; do controls+=(--run="control, seed $seed=$D/control_s$seed"); done
  run "$PY" tools/plot_run.py --run="warm-up=$D/warmup" --out="$D/plots/warmup.png" \
    --title="warm-up: the embedded corpus"
  run "$PY" tools/plot_run.py --run="memory=$D/continued" "${controls[@]}" --eval_keys=loss,loss_memory_off \
    --out="$D/plots/continued.png" --title="continued stage: reading memory vs the memory-off control"
  run "$PY" tools/plot_run.py --run="memory=$D/continued" \
    --eval_keys=entity_accuracy,entity_accuracy_empty_memory,entity_accuracy_memory_off \
    --out="$D/plots/continued_entities.png" --title="continued stage: held-out entities while training"
}

stage entities "fictional people: $ENTITIES, 20% held out (knowledge base only), 2 attributes" \
  run "$PY" tools/make_entities.py --out="$ENT" --num_entities="$ENTITIES" --num_attributes=2 --mix_ratio=0.8
stage tokenizer "sentencepiece BPE (512 pieces) on the continued stage's text" \
  run "$PY" tools/train_tokenizer.py --corpus="$ENT/train.jsonl" --out="$D/tokenizer/spm" --vocab_size=512
stage data "packed sequences of 128 tokens: the embedded corpus, and bios mixed with it" prepare_both
stage warmup "warm-up: plain pretraining on the embedded corpus ($WARMUP_STEPS steps)" \
  run bash launch/local.sh configs/quickstart.py --workdir="$D/warmup" --config.data.path="$D/data_warmup" \
  --config.train.num_steps="$WARMUP_STEPS" --config.train.checkpoint_every="$WARMUP_STEPS" \
  --config.train.eval_every="$WARMUP_EVAL" --config.optimizer.warmup_steps="$LR_WARMUP"
stage bank "the knowledge base's memories, written by the warm-up checkpoint" \
  run "$PY" tools/write_memory.py --config=configs/quickstart.py --checkpoint="$D/warmup" --tokenizer="$SPM" \
  --knowledge="$ENT/knowledge.jsonl" --bank="$D/bank"
stage index "retrieval index of the references (all-MiniLM-L6-v2 embeddings, ScaNN)" \
  run "$PY" tools/build_index.py --config=configs/quickstart.py --bank="$D/bank" --tokenizer="$SPM"
stage retrieve "the reference of every 64-token chunk of the continued stage's data (train, held-out)" retrieve_both
stage continued "the continued stage: $STEPS steps reading memory (held-out entities scored every $EVAL_EVERY)" \
  run bash launch/local.sh configs/quickstart_continued.py --workdir="$D/continued" "${CONTINUED[@]}" \
  --config.eval.cloze="$ENT/cloze.jsonl" --config.eval.cloze_index="$D/bank/index"
for seed in $CONTROL_SEEDS; do
  stage "control_s$seed" "the memory-off control, seed $seed (same init, data and schedule; memory.read=False)" \
    run bash launch/local.sh configs/quickstart_continued.py --workdir="$D/control_s$seed" "${CONTINUED[@]}" \
    --config.memory.read=False --config.seed="$seed" --config.data.shuffle_seed="$seed"
done
stage rewrite "the bank rewritten by the continued stage's final checkpoint" \
  run "$PY" tools/write_memory.py --config=configs/quickstart.py --checkpoint="$D/continued" --tokenizer="$SPM" \
  --knowledge="$ENT/knowledge.jsonl" --bank="$D/bank_continued"
stage evaluate "held-out entities, held-out real text, decode speed: memory / none / RAG" evaluate_all
stage sample "a held-out entity's answer, and the references each chunk read" sample
stage plots "training curves of both stages, the control's beside" plots
run "$PY" tools/demo_report.py --demo_dir="$D" --total_seconds=$((SECONDS - T_START)) 3>&1
