"""`python -m m3jax.train --config=configs/warmup.py --workdir=DIR [--config.key=value ...] [--dry_run]`.

`--dry_run --topology=v5p:4x4x4` also compiles the train step ahead of time for that TPU topology (needs libtpu:
`make venv-tpu` puts it in .venv/tpu-extra, which only this compilation loads, see `m3jax.train.aot.tpu_devices`) and
checks that it fits in HBM; the exit status says whether it does (see `m3jax.train.aot.dry_run`).
"""

from __future__ import annotations

import json
import sys
import time

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory: checkpoints, metrics, TensorBoard.")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "Build the model abstractly and print its size; no training.")
_TOPOLOGY = flags.DEFINE_string(
    "topology", None, "With --dry_run: compile the train step ahead of time for this TPU topology (e.g. v5p:4x4x4, "
    "v5e:4x4) and check that it fits in HBM (needs libtpu: make venv-tpu).")


def main(argv):
    del argv
    from m3jax.train import aot, loop  # after flag parsing, so jax picks up XLA_FLAGS set by launchers

    config = _CONFIG.value
    if _TOPOLOGY.value and not _DRY_RUN.value:
        raise app.UsageError("--topology is for --dry_run (the ahead-of-time fit check); it does not train")
    if _DRY_RUN.value:
        return aot.dry_run(config, _TOPOLOGY.value)
    if not _WORKDIR.value:
        raise app.UsageError("--workdir is required to train")
    try:
        summary = loop.train(config, _WORKDIR.value)
    except Exception as e:
        # When, to the microsecond: of the processes of a run that fail, a launcher names the one whose own error
        # came first, not one that died after it waiting on a collective (launch/local.sh reads this line).
        print(f"m3jax.train: failed at {time.time():.6f} ({type(e).__name__})", file=sys.stderr, flush=True)
        raise
    logging.info("summary: %s", json.dumps(summary))
    if summary["preempted_at"] is not None:  # saved on a preemption notice: tell the scheduler work remains
        sys.exit(loop.PREEMPTED_EXIT_CODE)


if __name__ == "__main__":
    flags.mark_flag_as_required("config")
    app.run(main)
