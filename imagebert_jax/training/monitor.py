"""Alarms for a model that stops learning, or never starts, read from the logged metrics.

A matcher can fail without a non-finite number anywhere: its scores stop spreading across the
batch (every pair gets the same logit, the loss sits at the value of a constant predictor and its
gradients vanish), or its image-text matching accuracy never leaves chance while the other losses
fall. `LearningMonitor.check` is called at every log step with that interval's mean metrics; it
warns in the log and returns alarm metrics (1.0 while an alarm holds, else 0.0) that are logged
beside the losses, so a run's metrics.jsonl shows when it happened.

The spread metrics come from the objectives: `itm_score_std` (pretraining: the matching logits of
a batch), `score_std` (retrieval fine-tuning: every pair the loss scored) and `itc_score_std`
(the contrastive similarities).
"""

from __future__ import annotations

import dataclasses
import logging

SPREAD_METRICS = ("itm_score_std", "score_std", "itc_score_std")


@dataclasses.dataclass(frozen=True)
class MonitorConfig:
  min_score_std: float = 1e-3   # scores spreading less than this across a batch: collapsed
  patience: int = 3             # log intervals in a row before the collapse alarm
  itm_chance_steps: int = 0     # pretraining: alarm when ITM is still at chance after this many
                                # steps (0: no such alarm)
  chance_margin: float = 0.02   # "at chance": accuracy within this of a constant predictor's

  @classmethod
  def from_config(cls, train_cfg) -> "MonitorConfig":
    return cls(min_score_std=float(train_cfg.collapse_min_score_std),
               patience=int(train_cfg.collapse_patience),
               itm_chance_steps=int(train_cfg.itm_chance_steps))


class LearningMonitor:
  """Keeps the run of low-spread intervals and says when an alarm starts and ends."""

  def __init__(self, stage: str, cfg: MonitorConfig):
    self.stage = stage
    self.cfg = cfg
    self._low = {k: 0 for k in SPREAD_METRICS}
    self._raised: set[str] = set()
    self.alarms: list[dict] = []  # every alarm raised: {"step", "alarm", "message"}

  def _raise(self, name: str, step: int, message: str) -> None:
    if name not in self._raised:
      logging.warning("[%s] step %d: %s", self.stage, step, message)
      self.alarms.append({"step": step, "alarm": name, "message": message})
    self._raised.add(name)

  def _clear(self, name: str, step: int) -> None:
    if name in self._raised:
      logging.info("[%s] step %d: %s no longer holds", self.stage, step, name)
    self._raised.discard(name)

  def _update(self, name: str, step: int, holds: bool, message: str) -> float:
    """Raises or clears alarm `name`; its metric value (1.0 while it holds)."""
    if holds:
      self._raise(name, step, message)
      return 1.0
    self._clear(name, step)
    return 0.0

  def check(self, step: int, scalars: dict[str, float]) -> dict[str, float]:
    out = {}
    for key in SPREAD_METRICS:
      if key not in scalars:
        continue
      name = f"alarm/{key.replace('_std', '')}_collapse"
      value = scalars[key]
      self._low[key] = self._low[key] + 1 if value < self.cfg.min_score_std else 0
      out[name] = self._update(
          name, step, self._low[key] >= self.cfg.patience,
          f"the {key.replace('_std', '').replace('_', ' ')}s have lost their spread across the "
          f"batch (std {value:.2e} < {self.cfg.min_score_std:g} for {self._low[key]} log "
          "intervals): the scorer is collapsing to a constant and its gradients vanish")
    if self.cfg.itm_chance_steps and "itm_accuracy" in scalars:
      p = scalars.get("itm_positive_share", 0.5)
      chance = max(p, 1.0 - p)
      name = "alarm/itm_at_chance"
      at_chance = (step >= self.cfg.itm_chance_steps
                   and scalars["itm_accuracy"] <= chance + self.cfg.chance_margin)
      out[name] = self._update(
          name, step, at_chance,
          f"image-text matching accuracy {scalars['itm_accuracy']:.3f} is still at chance "
          f"({chance:.3f}) after {step} steps: the model is not learning to match")
    return out
