#!/usr/bin/env bash
# Train on a Cloud TPU VM pod slice:
#   TPU_NAME=... ZONE=... [GCSFUSE=BUCKET:MOUNT] launch/tpu_pod.sh CONFIG --workdir=gs://BUCKET/runs/NAME \
#     [--config.data.path=MOUNT/data] [--config.key=value ...]
#
# Packs this checkout (tracked files and untracked ones git does not ignore), copies it to every worker, unpacks it
# into REMOTE_DIR, installs the pinned requirements there (requirements.txt + requirements-tpu.txt into
# REMOTE_DIR/.venv, then m3jax itself with --no-deps) and starts `python -m m3jax.train --config=CONFIG ARGS` on all
# workers at once. Worker i is jax process i; the jax.distributed coordinator runs on worker 0 (its internal IP, as
# `gcloud compute tpus tpu-vm describe` lists it). Each worker's output goes to LOG_DIR/worker_<i>.log (worker 0's is
# also shown here). The launcher waits for every worker, prints its exit status and exits non-zero naming the
# workers that failed.
#
# Every worker must see the same workdir, bank and retrieval files: give them as gs:// URLs (checkpoints,
# metrics, TensorBoard, banks, indexes and retrieved ids are read and written in the bucket itself) or as paths on a
# file system all workers mount. Prepared data (ArrayRecord shards) is read by local path only: GCSFUSE mounts
# buckets read-only on every worker with Cloud Storage FUSE before training (`gcsfuse --implicit-dirs -o ro`; gcsfuse
# must be installed on the workers), and --config.data.path names the directory under the mount. A --workdir that is not a gs://
# URL gets a warning (it must be a shared mount).
# Stopping this script does not stop the workers; to stop them (they save a checkpoint on SIGTERM):
#   gcloud compute tpus tpu-vm ssh $TPU_NAME --zone=$ZONE --worker=all --command='pkill -TERM -f m3jax.train'
#
# Environment:
#   TPU_NAME, ZONE           required: the TPU VM and its zone
#   PROJECT                  the GCP project (default: gcloud's configured project)
#   REMOTE_DIR=m3jax         the checkout on each worker, relative to the remote home unless absolute
#   REMOTE_PYTHON=python3.11 the workers' interpreter that creates REMOTE_DIR/.venv
#   LOG_DIR=runs/tpu_logs/<TPU_NAME>-<YYYYmmdd-HHMMSS>   where the worker logs are written, here
#   COORDINATOR_PORT=8482    the jax.distributed coordinator's port on worker 0
#   GCSFUSE                  BUCKET:MOUNT[,BUCKET:MOUNT...]: buckets to mount read-only on every worker (e.g.
#                            my-data:/tmp/gcs/my-data; a mount point already mounted is left as it is)
set -euo pipefail
die() {
  echo "launch/tpu_pod.sh: $*" >&2
  exit 2
}
if [[ $# -lt 1 ]]; then
  echo "usage: TPU_NAME=NAME ZONE=ZONE launch/tpu_pod.sh CONFIG --workdir=DIR [--config.key=value ...]" >&2
  exit 2
fi
[[ -n ${TPU_NAME:-} ]] || die "TPU_NAME is not set: name the TPU VM pod slice to train on"
[[ -n ${ZONE:-} ]] || die "ZONE is not set: give the zone of TPU '$TPU_NAME' (e.g. us-central2-b)"
command -v gcloud >/dev/null 2>&1 || die "gcloud not found on PATH: install and log in to the Google Cloud SDK"
here=${BASH_SOURCE[0]%/*}
if [[ $here == "${BASH_SOURCE[0]}" ]]; then here=.; fi
cd "$here/.."
config=$1; shift
for arg in "$@"; do
  if [[ $arg == --workdir=* && $arg != --workdir=gs://* ]]; then
    echo "launch/tpu_pod.sh: warning: ${arg#--workdir=} is not a gs:// URL: every worker must see it (a shared mount)" >&2
  fi
done
mounts=()
if [[ -n ${GCSFUSE:-} ]]; then
  IFS=, read -r -a mounts <<<"$GCSFUSE"
  for m in "${mounts[@]}"; do
    [[ ${m#gs://} =~ ^[^:/]+:/.+ ]] || die "GCSFUSE entry '$m' is not BUCKET:/MOUNT/POINT (a bucket and an absolute path)"
  done
fi

gcloud_opts=(--zone="$ZONE")
if [[ -n ${PROJECT:-} ]]; then gcloud_opts+=(--project="$PROJECT"); fi
endpoints=$(gcloud compute tpus tpu-vm describe "$TPU_NAME" "${gcloud_opts[@]}" \
  --format='value(networkEndpoints[].ipAddress)')
read -r -d '' -a workers <<<"${endpoints//[;,]/ }" || true  # ';'-separated (or one per line)
num=${#workers[@]}
(( num > 0 )) || die "'gcloud compute tpus tpu-vm describe $TPU_NAME' listed no network endpoints"
stamp=$(date +%Y%m%d-%H%M%S)
log_dir=${LOG_DIR:-runs/tpu_logs/$TPU_NAME-$stamp}
mkdir -p "$log_dir"
echo "launch/tpu_pod.sh: $TPU_NAME has $num workers (${workers[*]}); logs in $log_dir/worker_<i>.log" >&2

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
git ls-files -z --cached --others --exclude-standard | while IFS= read -r -d '' f; do
  if [[ -e $f ]]; then printf '%s\0' "$f"; fi  # a tracked file deleted in the worktree is left out
done | tar -czf "$tmp/code.tgz" --null -T -
remote_pkg=/tmp/m3jax-code-$stamp.tgz
gcloud compute tpus tpu-vm scp "$tmp/code.tgz" "$TPU_NAME:$remote_pkg" "${gcloud_opts[@]}" --worker=all

remote_dir=${REMOTE_DIR:-m3jax}
remote_dir=${remote_dir#\~/}
q() { printf '%q' "$1"; }
setup="set -e; mkdir -p $(q "$remote_dir"); tar -xzf $(q "$remote_pkg") -C $(q "$remote_dir")"
setup+="; rm -f $(q "$remote_pkg")"
for m in "${mounts[@]}"; do
  m=${m#gs://} bucket=${m%%:*} mount=${m#*:}
  setup+="; mkdir -p $(q "$mount"); mountpoint -q $(q "$mount") || gcsfuse --implicit-dirs -o ro $(q "$bucket") $(q "$mount")"
done
setup+="; cd $(q "$remote_dir")"
setup+="; if [ ! -x .venv/bin/python ]; then $(q "${REMOTE_PYTHON:-python3.11}") -m venv .venv; fi"
setup+="; .venv/bin/pip install --quiet -r requirements.txt -r requirements-tpu.txt"
setup+="; .venv/bin/pip install --quiet --no-deps -e ."
coordinator=${workers[0]}:${COORDINATOR_PORT:-8482}

pids=()
for ((i = 0; i < num; i++)); do
  train=(.venv/bin/python -m m3jax.train --config="$config" "$@"
         --config.distributed.coordinator_address="$coordinator" --config.distributed.num_processes="$num"
         --config.distributed.process_id="$i")
  gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${gcloud_opts[@]}" --worker="$i" \
    --command="$setup; exec $(printf '%q ' "${train[@]}")" >"$log_dir/worker_$i.log" 2>&1 </dev/null &
  pids+=("$!")
done
tail --pid="${pids[0]}" -n +1 -f "$log_dir/worker_0.log" &
follower=$!

failed=()
for ((i = 0; i < num; i++)); do
  rc=0
  wait "${pids[i]}" || rc=$?
  echo "launch/tpu_pod.sh: worker $i exited $rc" >&2
  if (( rc != 0 )); then failed+=("$i"); fi
done
wait "$follower" 2>/dev/null || true
if (( ${#failed[@]} > 0 )); then
  for i in "${failed[@]}"; do
    echo "launch/tpu_pod.sh: FAILED: worker $i, log: $log_dir/worker_$i.log" >&2
  done
  exit 1
fi
echo "launch/tpu_pod.sh: all $num workers finished; logs in $log_dir" >&2
