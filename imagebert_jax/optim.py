"""Optimizer: AdamW with linear warmup and linear decay, global-norm clipping, and no weight decay
on biases and LayerNorm parameters (as in BERT)."""

from __future__ import annotations

from typing import Any

import jax
import optax

# Parameter names (the last path entry) that are exempt from weight decay (the region feature
# statistics are never trained: their gradients are zero, and so must their decay be).
NO_DECAY_NAMES = ("bias", "scale", "mlm_bias", "region_feature_mean", "region_feature_scale",
                  "itc_log_scale")


def learning_rate_schedule(cfg: Any, total_steps: int) -> optax.Schedule:
  """0 -> cfg.learning_rate over cfg.warmup_steps, then linearly to cfg.end_lr_fraction x lr."""
  peak = float(cfg.learning_rate)
  warmup = int(cfg.warmup_steps)
  end = peak * float(cfg.get("end_lr_fraction", 0.0))
  if total_steps <= 0:
    raise ValueError(f"total training steps must be positive, got {total_steps}")
  warmup = min(warmup, total_steps)
  decay_steps = max(total_steps - warmup, 1)
  return optax.join_schedules(
      [optax.linear_schedule(0.0, peak, max(warmup, 1)),
       optax.linear_schedule(peak, end, decay_steps)],
      boundaries=[warmup])


def decay_mask(params: Any) -> Any:
  """True for parameters that get weight decay: everything but biases and LayerNorm."""

  def keep(path, _):
    name = str(getattr(path[-1], "key", path[-1]))
    return name not in NO_DECAY_NAMES

  return jax.tree_util.tree_map_with_path(keep, params)


def make_optimizer(cfg: Any, total_steps: int) -> tuple[optax.GradientTransformation,
                                                        optax.Schedule]:
  """cfg: config.optim (learning_rate, warmup_steps, weight_decay, b1, b2, eps, grad_clip_norm)."""
  schedule = learning_rate_schedule(cfg, total_steps)
  parts = []
  if cfg.get("grad_clip_norm", 0.0):
    parts.append(optax.clip_by_global_norm(float(cfg.grad_clip_norm)))
  parts.append(optax.adamw(schedule, b1=float(cfg.b1), b2=float(cfg.b2), eps=float(cfg.eps),
                           weight_decay=float(cfg.weight_decay), mask=decay_mask))
  return optax.chain(*parts), schedule
