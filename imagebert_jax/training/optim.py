"""Optimizer: AdamW with linear warmup and linear decay, global-norm clipping, and no weight decay
on biases and LayerNorm parameters (as in BERT)."""

from __future__ import annotations

import fnmatch
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


def parse_lr_scale(text: str) -> list[tuple[str, float]]:
  """`config.optim.lr_scale`: "pattern=factor,..." -> [(pattern, factor)]. A pattern is matched
  (fnmatch) against a parameter's top-level name: `region_*`, `itc_*`, `itm`, `encoder`."""
  out = []
  for item in filter(None, (t.strip() for t in str(text or "").split(","))):
    pattern, sep, factor = item.partition("=")
    try:
      value = float(factor)
    except ValueError:
      value = -1.0
    if not sep or not pattern.strip() or value <= 0:
      raise ValueError(f"config.optim.lr_scale: {item!r} is not pattern=factor with a positive "
                       "factor (e.g. 'region_*=10,itm=10')")
    out.append((pattern.strip(), value))
  return out


def lr_scale_tree(params: Any, rules: str | list[tuple[str, float]]) -> Any:
  """Per-parameter learning-rate factors: the first matching pattern's factor, else 1. `rules`:
  the config's text or `parse_lr_scale`'s list."""
  rules = parse_lr_scale(rules) if isinstance(rules, str) else rules
  used = set()

  def factor(path, _):
    name = str(getattr(path[0], "key", path[0]))
    for pattern, value in rules:
      if fnmatch.fnmatchcase(name, pattern):
        used.add(pattern)
        return value
    return 1.0

  tree = jax.tree_util.tree_map_with_path(factor, params)
  unused = [p for p, _ in rules if p not in used]
  if unused:
    raise ValueError(f"config.optim.lr_scale: {', '.join(unused)} matches no parameter of the "
                     "model (top-level names such as region_feature, itm, itc_text, encoder)")
  return tree


def scale_by_lr_scale(rules: list[tuple[str, float]]) -> optax.GradientTransformation:
  """Multiplies each update by its parameter's factor (`lr_scale_tree`; found when the step is
  traced, so a jitted step pays nothing for it)."""

  def init(params):
    del params
    return optax.EmptyState()

  def update(updates, state, params=None):
    del params
    factors = lr_scale_tree(updates, rules)
    return jax.tree.map(lambda u, f: u if f == 1.0 else u * f, updates, factors), state

  return optax.GradientTransformation(init, update)


def make_optimizer(cfg: Any, total_steps: int) -> tuple[optax.GradientTransformation,
                                                        optax.Schedule]:
  """cfg: config.optim (learning_rate, warmup_steps, weight_decay, b1, b2, eps, grad_clip_norm,
  lr_scale). `lr_scale` multiplies the step of the parameters it names (the decoupled weight
  decay with it): parameters that start fresh beside pretrained ones (the region side and the
  heads, when the text side comes from BERT) can learn faster than the pretrained ones may."""
  schedule = learning_rate_schedule(cfg, total_steps)
  parts = []
  if cfg.get("grad_clip_norm", 0.0):
    parts.append(optax.clip_by_global_norm(float(cfg.grad_clip_norm)))
  parts.append(optax.adamw(schedule, b1=float(cfg.b1), b2=float(cfg.b2), eps=float(cfg.eps),
                           weight_decay=float(cfg.weight_decay), mask=decay_mask))
  rules = parse_lr_scale(cfg.get("lr_scale", ""))
  if rules:  # only then: the optimizer state of other runs is unchanged
    parts.append(scale_by_lr_scale(rules))
  return optax.chain(*parts), schedule
