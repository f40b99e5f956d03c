#!/usr/bin/env bash
# Train on this machine: [NUM_PROCESSES=N] launch/local.sh CONFIG --workdir=DIR [--config.key=value ...]
#
# Environment:
#   PY=.venv/bin/python  the interpreter.
#   NUM_PROCESSES=1      N > 1 starts N processes of `python -m m3jax.train` here, joined by jax.distributed
#                        through a coordinator on 127.0.0.1:<free port> (multi-process runs on one host, e.g. CPU
#                        tests; one process already drives every GPU or TPU chip of a host).
#   LOG_DIR=WORKDIR/logs where process <i> writes process_<i>.log (with N > 1; process 0 is also shown here).
# With N > 1: the first process to fail stops the others, and the launcher exits non-zero naming the process whose
# own error came first (a process that died after it, waiting on a collective, is not the cause) and its log.
# SIGTERM is passed on to every process (they save a checkpoint and exit 143); Ctrl-C sends them SIGTERM too, and
# a second Ctrl-C kills them.
set -euo pipefail
if [[ $# -lt 1 ]]; then
  echo "usage: [NUM_PROCESSES=N] launch/local.sh CONFIG --workdir=DIR [--config.key=value ...]" >&2
  exit 2
fi
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
config=$1; shift
num=${NUM_PROCESSES:-1}
if ! [[ $num =~ ^[1-9][0-9]*$ ]]; then
  echo "launch/local.sh: NUM_PROCESSES must be a positive integer, got '$num'" >&2
  exit 2
fi
if (( num == 1 )); then
  exec "$PY" -m m3jax.train --config="$config" "$@"
fi

workdir=runs
prev=
for arg in "$@"; do
  case $arg in
    --workdir=*) workdir=${arg#--workdir=} ;;
    *) if [[ $prev == --workdir ]]; then workdir=$arg; fi ;;
  esac
  prev=$arg
done
log_dir=${LOG_DIR:-$workdir/logs}
mkdir -p "$log_dir"
port=$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')

signal_live() {  # $1: a signal for every process not yet reaped
  local j
  for ((j = 0; j < num; j++)); do
    if [[ -z ${status[j]:-} ]]; then kill -s "$1" "${pids[j]}" 2>/dev/null || true; fi
  done
}

status=()
signalled=0
spawned=0
pending=
forward() {  # $1: the signal received. Background children ignore SIGINT, so both become SIGTERM; twice kills.
  if (( ! spawned )); then pending=$1; return; fi  # while starting: passed on once every process exists
  signalled=$((signalled + 1))
  local sig=TERM
  if (( signalled > 1 )); then sig=KILL; fi
  echo "launch/local.sh: SIG$1 received: sending SIG$sig to the $num processes" >&2
  signal_live "$sig"
}
trap 'forward TERM' TERM
trap 'forward INT' INT

pids=()
for ((i = 0; i < num; i++)); do
  : >"$log_dir/process_$i.log"  # exists before the follower below opens it (a child opens its own redirect later)
  "$PY" -m m3jax.train --config="$config" "$@" \
    --config.distributed.coordinator_address="127.0.0.1:$port" \
    --config.distributed.num_processes="$num" --config.distributed.process_id="$i" \
    >"$log_dir/process_$i.log" 2>&1 </dev/null &
  pids+=("$!")
done
spawned=1
if [[ -n $pending ]]; then forward "$pending"; fi
echo "launch/local.sh: $num processes, coordinator 127.0.0.1:$port, logs in $log_dir/process_<i>.log" >&2
tail --pid="${pids[0]}" -n +1 -f "$log_dir/process_0.log" &
follower=$!


running=$num
failed=-1
kill_at=-1
while (( running > 0 )); do
  for ((i = 0; i < num; i++)); do
    [[ -n ${status[i]:-} ]] && continue
    kill -0 "${pids[i]}" 2>/dev/null && continue
    rc=0
    wait "${pids[i]}" || rc=$?
    status[i]=$rc
    running=$((running - 1))
    if (( rc != 0 && failed < 0 && signalled == 0 )); then
      failed=$i
      echo "launch/local.sh: process $i failed (exit $rc); stopping the others" >&2
      signal_live TERM
      kill_at=$((SECONDS + 10))  # JAX owns SIGTERM in each process and may still wait on the dead peer
    fi
  done
  if (( kill_at >= 0 && SECONDS >= kill_at )); then
    signal_live KILL
  fi
  if (( running > 0 )); then
    sleep 0.2 &  # waited for by the builtin, which a trapped signal interrupts at once (a foreground sleep defers it)
    wait "$!" || true
  fi
done
wait "$follower" 2>/dev/null || true

first_failure() {  # of the failed processes, the one whose own error came first ("failed at" in its log)
  local best=$failed best_t="" i t
  for ((i = 0; i < num; i++)); do
    (( status[i] != 0 )) || continue
    t=$(sed -n 's/^m3jax\.train: failed at \([0-9.]*\).*/\1/p' "$log_dir/process_$i.log" 2>/dev/null | head -n 1) || true
    [[ -n $t ]] || continue
    if [[ -z $best_t ]] || awk -v a="$t" -v b="$best_t" 'BEGIN { exit !(a < b) }'; then best=$i; best_t=$t; fi
  done
  echo "$best"
}

if (( failed >= 0 )); then
  failed=$(first_failure)
  echo "launch/local.sh: FAILED: process $failed exited ${status[failed]}; see $log_dir/process_$failed.log" >&2
  exit "${status[failed]}"
fi
for ((i = 0; i < num; i++)); do
  if (( status[i] != 0 )); then
    echo "launch/local.sh: process $i exited ${status[i]} after a signal; see $log_dir/process_$i.log" >&2
    exit "${status[i]}"
  fi
done
