"""Defaults for every run; stages and presets start from here (see m3jax/config.py for each key)."""

from m3jax.config import base_config


def get_config():
    return base_config()
