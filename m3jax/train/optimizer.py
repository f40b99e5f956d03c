"""AdamW with masked weight decay, global-norm clipping and the learning-rate schedules."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def lr_schedule(opt_cfg, num_steps: int) -> optax.Schedule:
    """Linear warm-up to `peak_lr`, then one of:

    - `wsd` (warmup-stable-decay, MiniCPM's schedule used by Memory3): constant until the last
      `decay_fraction` of training, then an exponential decay to `peak_lr * min_lr_ratio` at `num_steps`;
    - `cosine`: cosine from `peak_lr` to `peak_lr * min_lr_ratio` at `num_steps`;
    - `constant`.
    """
    peak, warmup, floor = opt_cfg.peak_lr, int(opt_cfg.warmup_steps), opt_cfg.peak_lr * opt_cfg.min_lr_ratio
    rest = max(num_steps - warmup, 1)

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        warm = peak * jnp.minimum((step + 1.0) / max(warmup, 1), 1.0)
        if opt_cfg.schedule == "constant":
            after = jnp.asarray(peak, jnp.float32)
        elif opt_cfg.schedule == "cosine":
            frac = jnp.clip((step - warmup) / rest, 0.0, 1.0)
            after = floor + 0.5 * (peak - floor) * (1.0 + jnp.cos(jnp.pi * frac))
        else:  # wsd
            decay_steps = max(round(opt_cfg.decay_fraction * num_steps), 1)
            frac = jnp.clip((step - (num_steps - decay_steps)) / decay_steps, 0.0, 1.0)
            ratio = max(opt_cfg.min_lr_ratio, 1e-8)
            after = peak * ratio**frac
        return jnp.where(step < warmup, warm, after)

    return schedule


def decay_mask(params, decay_norms_and_embeddings: bool):
    """True for the leaves that take weight decay: matrices, but not norms or the input embedding (by path)."""

    def wants_decay(path, _):
        name = jax.tree_util.keystr(path)
        return decay_norms_and_embeddings or not ("norm" in name or "'embed'" in name)

    return jax.tree_util.tree_map_with_path(wants_decay, params)


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformation:
    """Scales the updates by min(1, max_norm / global_norm): `optax.clip_by_global_norm`'s math and state.

    Written as one multiply by a scalar factor (optax selects between the gradient and its rescaled copy per
    element), which XLA fuses into the AdamW moment updates instead of materialising a clipped copy of every
    gradient: the optimizer step of the 168M-parameter benchmark model drops from ~350 ms to ~170 ms on CPU.
    """

    def init_fn(params):
        del params
        return optax.EmptyState()

    def update_fn(updates, state, params=None):
        del params
        norm = optax.tree.norm(updates)
        factor = jnp.minimum(1.0, max_norm / jnp.maximum(norm, jnp.finfo(jnp.float32).tiny))
        return jax.tree.map(lambda g: g * factor.astype(g.dtype), updates), state

    return optax.GradientTransformation(init_fn, update_fn)


def make_optimizer(opt_cfg, num_steps: int) -> optax.GradientTransformation:
    """Clip by global norm (when clip_norm > 0), then AdamW. States are float32 like the parameters."""
    adamw = optax.adamw(
        learning_rate=lr_schedule(opt_cfg, num_steps),
        b1=opt_cfg.b1,
        b2=opt_cfg.b2,
        eps=opt_cfg.eps,
        weight_decay=opt_cfg.weight_decay,
        mask=lambda p: decay_mask(p, opt_cfg.decay_norms_and_embeddings),
    )
    if opt_cfg.clip_norm > 0:
        return optax.chain(clip_by_global_norm(opt_cfg.clip_norm), adamw)
    return adamw
