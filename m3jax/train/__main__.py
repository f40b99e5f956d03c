"""`python -m m3jax.train --config=configs/warmup.py --workdir=DIR [--config.key=value ...] [--dry_run]`."""

from __future__ import annotations

import json
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from m3jax.config import validate

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory: checkpoints, metrics, TensorBoard.")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "Build the model abstractly and print its size; no training.")


def main(argv):
    del argv
    from m3jax.train import loop  # after flag parsing, so jax picks up XLA_FLAGS set by launchers

    config = _CONFIG.value
    if _DRY_RUN.value:
        validate(config)
        print(json.dumps(loop.describe_model(config), indent=2))
        return
    if not _WORKDIR.value:
        raise app.UsageError("--workdir is required to train")
    summary = loop.train(config, _WORKDIR.value)
    logging.info("summary: %s", json.dumps(summary))
    if summary["preempted_at"] is not None:  # saved on a preemption notice: tell the scheduler work remains
        sys.exit(loop.PREEMPTED_EXIT_CODE)


if __name__ == "__main__":
    flags.mark_flag_as_required("config")
    app.run(main)
