"""On-device throughput benchmark on synthetic batches; imports without TensorFlow.

  python -m imagebert_jax.bench --config configs/imagebert_base.py --batch_size 128

Times the jitted pretraining step (all four objectives) on batches generated on the device, and
prints one table: samples/s, model-FLOP utilisation, peak device memory, parameter count. Any
config field can be overridden (`--config.model.remat=full`, `--config.model.attention_impl=xla`).

`--modes finetune --candidates 2,4,8,16` times the retrieval fine-tuning step instead, once per
number of mined candidates M (the stage `--stage`'s objective when it is a fine-tuning stage,
otherwise the paper's three losses; K = `--num_hard`): mining scores M candidates per pair and
direction without gradients, so a step costs about 2 M forward passes per pair on top of the
3 x (1 + 2 K) of training on the pair and its 2 K negatives.

FLOPs per sample (matrix products only, multiply-add = 2), for L = text + region positions,
d = hidden, m = MLP width, R regions of F features, V vocabulary, P masked text positions:
  forward = layers x (8 L d^2 + 4 L d m + 4 L^2 d) + 2 R F d + 2 P d V
  training = 3 x forward
With m = 4d this is the count used for the PyTorch reference points (12 x (24 L d^2 + 4 L^2 d)
+ 2 x 100 x 2048 d, times 3, plus the decoder on the masked positions).
"""

from __future__ import annotations

import functools
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from imagebert_jax import allocator, cli, parallel, paths
from imagebert_jax.config import defaults as config_defaults
from imagebert_jax.training import optim
from imagebert_jax.training import train
from imagebert_jax.training import state as state_lib
from imagebert_jax.model import ModelConfig
from imagebert_jax.objectives.pretraining import PretrainObjective, pretrain_loss
from imagebert_jax.objectives.retrieval import RetrievalObjective, retrieval_loss

# Dense bf16 peak of each accelerator, TFLOP/s (vendor datasheets).
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L4": 121.0, "TPU v4": 275.0,
               "TPU v5 lite": 197.0, "TPU v5e": 197.0, "TPU v5p": 459.0, "TPU v6 lite": 918.0}

_CONFIG = config_flags.DEFINE_config_file("config", None, "The run config to benchmark.",
                                          lock_config=True)
_BATCH = flags.DEFINE_integer("batch_size", 128, "Global batch size.")
_STEPS = flags.DEFINE_integer("steps", 20, "Timed steps.")
_WARMUP = flags.DEFINE_integer("warmup", 3, "Untimed steps first (compilation included).")
_STAGE = flags.DEFINE_string("stage", "pretrain", "The stage whose objective and optimizer run.")
_VOCAB = flags.DEFINE_integer("vocab_size", 30522, "Vocabulary size when the config leaves it 0.")
_PEAK = flags.DEFINE_float("peak_tflops", 0.0, "Peak TFLOP/s for MFU (0: known accelerators).")
_MODES = flags.DEFINE_list("modes", ["train", "score"],
                           "What to time: train (synthetic batches made on the device), input "
                           "(the train step fed by the tf.data pipeline), score, finetune (the retrieval "
                           "step for each of --candidates).")
_TILE = flags.DEFINE_string("score_tile", "8x128", "Scoring tile: images x captions per step.")
_DATA = flags.DEFINE_string("data_dir", "", "Mode 'input': a built dataset to feed the train "
                            "step through the real tf.data pipeline (the split 'train').")
_RESULTS = flags.DEFINE_string("results", "", "Also append each row, as one JSON object with "
                               "--label, to this JSON-lines file.")
_LABEL = flags.DEFINE_string("label", "", "This run's name in --results.")
_CANDIDATES = flags.DEFINE_list("candidates", ["2", "4", "8", "16"],
                                "Mode 'finetune': the numbers of mined candidates M to time.")
_NUM_HARD = flags.DEFINE_integer("num_hard", 2, "Mode 'finetune': negatives kept per pair and "
                                 "direction (K; M = K is random negatives, no mining).")
_SUMMARY = flags.DEFINE_string("summary", "", "Print one table of every row of this JSON-lines "
                               "file (written with --results) and exit.")


def encoder_flops(cfg: ModelConfig, length: int) -> float:
  """Forward FLOPs of the Transformer layers over `length` positions."""
  d, m = cfg.hidden_size, cfg.mlp_dim
  return cfg.num_layers * (8 * length * d * d + 4 * length * d * m + 4 * length**2 * d)


def flops_per_sample(cfg: ModelConfig, text_words: int, mlm_rate: float = 0.15) -> dict:
  """Model FLOPs of one sample, forward and training, by the formula in the module doc."""
  d = cfg.hidden_size
  encoder = encoder_flops(cfg, cfg.seq_len)
  regions = 2 * cfg.max_regions * cfg.region_feature_dim * d
  decoder = 2 * (mlm_rate * text_words) * d * cfg.vocab_size
  forward = encoder + regions + decoder
  return {"forward": forward, "train": 3 * forward}


def retrieval_flops_per_pair(cfg: ModelConfig, text_words: int, obj: RetrievalObjective) -> float:
  """Model FLOPs of one matched pair in a fine-tuning step: 2 M forward passes of mining (none
  when M = K or when the contrastive similarities mine), 3 x (1 + 2 K) of training, and with the contrastive loss 3 x each modality alone."""
  forward = flops_per_sample(cfg, text_words, mlm_rate=0.0)["forward"]
  mined = obj.num_candidates > obj.num_hard and obj.mine_with == "cross_encoder"
  mining = 2 * obj.num_candidates * forward if mined else 0
  total = mining + 3 * (1 + 2 * obj.num_hard) * forward
  if obj.itc_weight or obj.mine_with == "itc":
    region_input = 2 * cfg.max_regions * cfg.region_feature_dim * cfg.hidden_size
    total += 3 * (encoder_flops(cfg, cfg.max_text_len)
                  + encoder_flops(cfg, cfg.max_regions) + region_input)
  return total


def peak_tflops(device) -> float | None:
  if _PEAK.value:
    return _PEAK.value
  kind = getattr(device, "device_kind", "")
  for name, value in PEAK_TFLOPS.items():
    if name.lower() in kind.lower():
      return value
  return None


def synthetic_batch(key: jax.Array, cfg: ModelConfig, batch: int, obj: PretrainObjective,
                    text_words: int) -> dict[str, jax.Array]:
  """A pretraining batch drawn on the device: full-length captions, 100 regions per image."""
  k = jax.random.split(key, 5)
  t = cfg.max_text_len
  words = jax.random.randint(k[0], (batch, t), *obj.random_token_range, dtype=jnp.int32)
  pos = jnp.arange(t)[None]
  ids = jnp.where(pos == 0, obj.cls_id, jnp.where(pos == text_words + 1, obj.sep_id,
                                                  jnp.where(pos <= text_words, words, obj.pad_id)))
  return {
      "text_ids": ids.astype(jnp.int32),
      "region_feat": jax.nn.relu(jax.random.normal(
          k[1], (batch, cfg.max_regions, cfg.region_feature_dim))).astype(jnp.float16),
      "region_loc": jax.random.uniform(k[2], (batch, cfg.max_regions, 5)),
      "num_regions": jnp.full((batch,), cfg.max_regions, jnp.int32),
      "region_class": jax.random.randint(k[3], (batch, cfg.max_regions), 0,
                                         cfg.num_object_classes, dtype=jnp.int32),
      "image_key": jax.random.randint(k[4], (batch,), 0, 2**30, dtype=jnp.int32),
  }


def _special_ids(model_cfg: ModelConfig):
  """The special ids of a BERT-uncased vocabulary, or of the demo's, by the vocabulary size."""
  from imagebert_jax.data.tokenizer import SpecialIds
  v = model_cfg.vocab_size
  if v >= 30522:  # BERT uncased layout
    return SpecialIds(pad_id=0, unk_id=100, cls_id=101, sep_id=102, mask_id=103, vocab_size=v,
                      random_token_range=(999, v))
  return SpecialIds(pad_id=0, unk_id=1, cls_id=2, sep_id=3, mask_id=4, vocab_size=v,
                    random_token_range=(5, v))


def _objective(config, model_cfg: ModelConfig, stage: str) -> PretrainObjective:
  """The stage's pretraining objective (the defaults for a stage of another kind)."""
  pretraining = stage in config.stages and config.stages[stage].kind == "pretrain"
  obj_cfg = config.stages[stage].objective if pretraining else config_defaults.objective_default()
  return train.pretrain_objective(obj_cfg, _special_ids(model_cfg))


def _memory(device, compiled) -> tuple[float | None, str]:
  stats = device.memory_stats() if hasattr(device, "memory_stats") else None
  if stats and "peak_bytes_in_use" in stats:
    return stats["peak_bytes_in_use"] / 2**30, "device peak"
  try:
    ma = compiled.memory_analysis()
    total = ma.temp_size_in_bytes + ma.argument_size_in_bytes + ma.output_size_in_bytes
    return total / 2**30, "compiler estimate"
  except Exception:  # noqa: BLE001 - not every backend reports it
    return None, "n/a"


def retrieval_objective(config, model_cfg: ModelConfig, stage: str, num_candidates: int,
                        num_hard: int) -> RetrievalObjective:
  """The fine-tuning objective of `stage` (the paper's three losses for a stage of another kind)
  with M = num_candidates mined candidates and K = min(num_hard, M) negatives."""
  finetuning = stage in config.stages and config.stages[stage].kind == "finetune"
  obj_cfg = (config.stages[stage].objective if finetuning
             else config_defaults.retrieval_objective_default()).copy_and_resolve_references()
  obj_cfg.update(num_candidates=num_candidates, num_hard=min(num_hard, num_candidates),
                 hard_from_step=0)
  return train.objective_for("finetune", obj_cfg, _special_ids(model_cfg))


def bench_train(config, batch_size: int, steps: int, warmup: int, stage: str,
                data_dir: str = "", num_candidates: int = 0) -> dict[str, Any]:
  """The training step's throughput: pretraining, or with `num_candidates` > 0 retrieval
  fine-tuning mining that many candidates (samples are matched pairs)."""
  model_cfg = train.model_config(config, _VOCAB.value)
  obj = _objective(config, model_cfg, stage)
  loss_fn = functools.partial(pretrain_loss, obj=obj)
  ft_obj = None
  if num_candidates:
    ft_obj = retrieval_objective(config, model_cfg, stage, num_candidates, _NUM_HARD.value)
    loss_fn = functools.partial(retrieval_loss, obj=ft_obj)
  text_words = model_cfg.max_text_len - 2
  mesh, rules = train.make_mesh(config)
  optim_cfg = (config.stages[stage].optim if stage in config.stages
               else config_defaults.optim_default(1e-4))
  tx, schedule = optim.make_optimizer(optim_cfg, 10_000)
  spec = state_lib.state_spec(model_cfg, tx, mesh, rules, seed=0)
  state = state_lib.create_state(spec, model_cfg, tx, seed=0)
  n_params = parallel.tree_size(state.params)
  grad_accum = config.stages[stage].train.grad_accum_steps if stage in config.stages else 1
  step = state_lib.make_train_step(spec, loss_fn, tx, seed=0,
                                   schedule=schedule, grad_accum_steps=grad_accum)
  batch_sharding = {k: parallel.batch_sharding(mesh, rules, nd) for k, nd in (
      ("text_ids", 2), ("region_feat", 3), ("region_loc", 3), ("num_regions", 1),
      ("region_class", 2), ("image_key", 1))}
  with jax.set_mesh(mesh):
    make_batch = jax.jit(functools.partial(synthetic_batch, cfg=model_cfg, batch=batch_size,
                                           obj=obj, text_words=text_words),
                         out_shardings=batch_sharding)
    batches = [make_batch(jax.random.key(i)) for i in range(2)]
  if data_dir:
    # Real input: the tf.data pipeline, made into global arrays each step as training does.
    from imagebert_jax.data import pipeline
    from imagebert_jax.data.records import read_info
    pipeline.hide_gpus_from_tf()
    info = read_info(pipeline.data_dirs(data_dir)[0])
    if info["options"]["feature_dim"] != model_cfg.region_feature_dim:
      raise ValueError(f"--data_dir {data_dir}: {info['options']['feature_dim']}-d features, the "
                       f"model takes {model_cfg.region_feature_dim}")
    it = pipeline.TrainIterator(pipeline.train_dataset(pipeline.PipelineConfig(
        data_dir=data_dir, split="train", batch_size=batch_size,
        max_text_len=model_cfg.max_text_len, max_regions=model_cfg.max_regions,
        pad_id=obj.pad_id, sep_id=obj.sep_id)))
    next_batch = lambda i: parallel.global_batch(
        {k: v for k, v in next(it).items() if k in batch_sharding}, mesh, rules)
  else:
    next_batch = lambda i: batches[i % 2]
  # Compiled once, ahead of time, and timed: the steps below run this executable.
  with jax.set_mesh(mesh), parallel.logical_rules(rules):
    start = time.perf_counter()
    lowered = step.jitted.lower(state, batches[0])
    compile_start = time.perf_counter()
    compiled = lowered.compile()
    lower_s, compile_s = compile_start - start, time.perf_counter() - compile_start
    # Batches from the input pipeline go through the jitted step, which takes whatever layout
    # they arrive in (an executable compiled ahead of time insists on the one it was built for).
    run = step.jitted if data_dir else compiled
    for i in range(warmup):
      state, metrics = run(state, next_batch(i))
    jax.block_until_ready(state)  # also with --warmup 0
    start = time.perf_counter()
    for i in range(steps):
      state, metrics = run(state, next_batch(i))
    jax.block_until_ready((state, metrics))
    seconds = time.perf_counter() - start
  device = jax.devices()[0]
  mem, mem_kind = _memory(device, compiled)
  samples_per_s = batch_size * steps / seconds
  if ft_obj is None:
    flops = flops_per_sample(model_cfg, text_words, obj.mlm_rate)["train"]
  else:
    flops = retrieval_flops_per_pair(model_cfg, text_words, ft_obj)
  peak = peak_tflops(device)
  achieved = samples_per_s * flops / 1e12
  extra = {} if ft_obj is None else {"candidates": ft_obj.num_candidates,
                                      "negatives": ft_obj.num_hard}
  return {**extra, **_run_fields(model_cfg, compiled, lower_s, compile_s),
      "device": f"{device.device_kind} x{jax.device_count()}", "jax": jax.__version__,
      "dtype": model_cfg.dtype, "attention": model_cfg.attention_impl, "remat": model_cfg.remat,
      "batch": batch_size, "positions": model_cfg.seq_len, "step_ms": 1000 * seconds / steps,
      "samples_per_s": samples_per_s, "train_gflop_per_sample": flops / 1e9,
      "achieved_tflops": achieved, "mfu": achieved / peak if peak else None,
      "peak_mem_gib": mem, "mem_kind": mem_kind, "params": n_params,
      "loss": float(metrics["loss"]),
  }


def _run_fields(model_cfg: ModelConfig, compiled, lower_s: float, compile_s: float) -> dict:
  """What a row records of how it ran: ours, with which dropout rates, how long the step took
  to trace and to compile, and the compiled step's FLOPs as XLA counts them (a CPU-checkable
  figure beside the formula's)."""
  flops = None
  try:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    flops = float(cost["flops"]) / 1e9 if cost and "flops" in cost else None
  except Exception:  # noqa: BLE001 - not every backend reports it
    pass
  return {"impl": "ours", "hidden_dropout": model_cfg.dropout_rate,
          "attention_dropout": model_cfg.attention_dropout_rate,
          "malloc": "tcmalloc" if allocator.loaded() else "system", "trace_s": round(lower_s, 2),
          "compile_s": round(compile_s, 2), "xla_gflop_per_step": flops}


def bench_score(config, tile: tuple[int, int], steps: int, warmup: int) -> dict[str, Any]:
  """Cross-encoder scoring throughput, the way evaluation runs: a split on the devices, tiles of
  images x captions formed by indexing there."""
  from imagebert_jax.retrieval import evaluate
  model_cfg = train.model_config(config, _VOCAB.value)
  mesh, rules = train.make_mesh(config)
  graphdef, params = state_lib.create_params(model_cfg, mesh, rules, seed=0)
  ti, tc = tile
  n_img, n_cap = 4 * ti, 4 * tc
  rng = np.random.default_rng(0)
  obj = _objective(config, model_cfg, "")
  words = model_cfg.max_text_len - 2
  text = rng.integers(*obj.random_token_range, size=(n_cap, model_cfg.max_text_len))
  text[:, 0], text[:, words + 1] = obj.cls_id, obj.sep_id
  arrays = tuple(parallel.replicated_array(x, mesh) for x in (
      rng.uniform(0, 2, (n_img, model_cfg.max_regions, model_cfg.region_feature_dim)).astype(
          np.float16),
      rng.uniform(0, 1, (n_img, model_cfg.max_regions, 5)).astype(np.float32),
      np.full((n_img,), model_cfg.max_regions, np.int32), text.astype(np.int32)))
  scorer = evaluate.make_scorer(graphdef, mesh, rules, tile_images=ti, tile_captions=tc,
                                pad_id=obj.pad_id)
  tiles = [(i, j) for i in range(0, n_img, ti) for j in range(0, n_cap, tc)]
  start = time.perf_counter()
  jax.block_until_ready(scorer(params, arrays, *tiles[0]))  # compiles
  first_call_s = time.perf_counter() - start
  jax.block_until_ready([scorer(params, arrays, *tiles[k % len(tiles)])
                         for k in range(warmup)])
  start = time.perf_counter()
  outs = [scorer(params, arrays, *tiles[k % len(tiles)]) for k in range(steps)]
  jax.block_until_ready(outs)
  seconds = time.perf_counter() - start
  pairs_per_s = ti * tc * steps / seconds
  flops = flops_per_sample(model_cfg, words, mlm_rate=0.0)["forward"]
  device = jax.devices()[0]
  peak = peak_tflops(device)
  achieved = pairs_per_s * flops / 1e12
  mem, mem_kind = _memory(device, None)
  return {"impl": "ours", "hidden_dropout": 0.0, "attention_dropout": 0.0,  # scoring: eval mode
          "compile_s": round(first_call_s, 2),  # the first call, compilation included
          "device": f"{device.device_kind} x{jax.device_count()}", "jax": jax.__version__,
          "dtype": model_cfg.dtype, "batch": ti * tc, "positions": model_cfg.seq_len,
          "step_ms": 1000 * seconds / steps, "pairs_per_s": pairs_per_s,
          "achieved_tflops": achieved, "mfu": achieved / peak if peak else None,
          "peak_mem_gib": mem, "mem_kind": mem_kind, "params": parallel.tree_size(params),
          "flickr30k_1k_minutes": 5_000_000 / pairs_per_s / 60}


def format_table(rows: list[dict[str, Any]]) -> str:
  cols = [("mode", "{}"), ("device", "{}"), ("dtype", "{}"), ("batch", "{}"),
          ("positions", "{}"), ("step_ms", "{:.1f}"), ("samples_per_s", "{:,.0f}"),
          ("pairs_per_s", "{:,.0f}"), ("achieved_tflops", "{:.1f}"), ("mfu", "{:.1%}"),
          ("peak_mem_gib", "{:.2f}"), ("params", "{:,}")]
  header = [c for c, _ in cols]
  lines = [header]
  for r in rows:
    lines.append([fmt.format(r[c]) if r.get(c) is not None else "-" for c, fmt in cols])
  widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
  out = ["  ".join(v.rjust(w) for v, w in zip(line, widths)) for line in lines]
  out.insert(1, "  ".join("-" * w for w in widths))
  return "\n".join(out)


SUMMARY_COLUMNS = (("label", "{}"), ("status", "{}"), ("impl", "{}"), ("mode", "{}"),
                   ("dropout", "{}"), ("dtype", "{}"), ("batch", "{}"), ("step_ms", "{:.1f}"),
                   ("samples_per_s", "{:,.0f}"), ("pairs_per_s", "{:,.0f}"),
                   ("images_per_s", "{:.2f}"), ("x_peer", "{:.2f}x"), ("mfu", "{:.1%}"),
                   ("compile_s", "{:.0f}"), ("peak_mem_gib", "{:.2f}"), ("seconds", "{:.0f}"))


def _rate(row: dict[str, Any]) -> float | None:
  return row.get("samples_per_s") or row.get("pairs_per_s")


def against_peer(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
  """Each row with `x_peer`: its rate over the PyTorch peer's (impl 'torch-peer') of the same
  mode, batch and dropout rates, where the peer ran one; the peer's rows get the MFU of ours
  scaled by that ratio (the same model FLOPs per sample), and every row a `dropout` column
  (hidden/attention)."""
  key = lambda r: (r.get("mode"), r.get("batch"), r.get("hidden_dropout"),
                   r.get("attention_dropout"))
  out = [dict(r) for r in rows]
  peers = {key(r): r for r in out if r.get("impl") == "torch-peer" and _rate(r)}
  for r in out:
    if "hidden_dropout" in r:
      r["dropout"] = f"{r['hidden_dropout']:g}/{r['attention_dropout']:g}"
    peer = peers.get(key(r))
    if peer is not None and r.get("impl") == "ours" and _rate(r):
      r["x_peer"] = _rate(r) / _rate(peer)
      if r.get("mfu") is not None and peer.get("mfu") is None:
        peer["mfu"] = r["mfu"] / r["x_peer"]
  return out


def summary_table(rows: list[dict[str, Any]]) -> str:
  """One table of result rows, by label in the order labels first came: a label's figure rows
  (those with a mode) with its status row's fields (a session script's status and seconds), or
  the status row alone when the label has no figures."""
  rows = against_peer(rows)
  labels = list(dict.fromkeys(r.get("label", "") for r in rows))
  table = []
  for label in labels:
    status: dict[str, Any] = {}
    for r in rows:
      if r.get("label", "") == label and not r.get("mode"):
        status.update(r)
    figures = [r for r in rows if r.get("label", "") == label and r.get("mode")]
    table.extend([{**status, **r} for r in figures] or [status])
  lines = [[c for c, _ in SUMMARY_COLUMNS]]
  for r in table:
    lines.append(["-" if r.get(c) is None else
                  (r[c] if isinstance(r[c], str) else fmt.format(r[c]))
                  for c, fmt in SUMMARY_COLUMNS])
  widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
  out = ["  ".join(v.ljust(w) for v, w in zip(line, widths)).rstrip() for line in lines]
  out.insert(1, "  ".join("-" * w for w in widths))
  return "\n".join(out)


def append_results(path: str, label: str, rows: list[dict[str, Any]]) -> None:
  import json
  with paths.open(path, "a", encoding="utf-8") as f:
    for r in rows:
      f.write(json.dumps({"label": label, **r}, default=str) + "\n")


PROG = "imagebert-bench"


def main(argv):
  del argv
  if _SUMMARY.value:
    import json
    with paths.open(_SUMMARY.value, encoding="utf-8") as f:
      print(summary_table([json.loads(line) for line in f if line.strip()]))
    return
  if _CONFIG.value is None:
    cli.refuse(PROG, "--config is required, e.g. --config configs/imagebert_base.py")
  config = _CONFIG.value
  rows = []
  if "train" in _MODES.value:
    rows.append(dict(mode="train", **bench_train(config, _BATCH.value, _STEPS.value,
                                                 _WARMUP.value, _STAGE.value)))
  if "input" in _MODES.value:
    if not _DATA.value:
      cli.refuse(PROG, "--modes input needs --data_dir (a built dataset)")
    rows.append(dict(mode="input", **bench_train(config, _BATCH.value, _STEPS.value,
                                                 _WARMUP.value, _STAGE.value, _DATA.value)))
  if "finetune" in _MODES.value:
    for m in _CANDIDATES.value:
      r = bench_train(config, _BATCH.value, _STEPS.value, _WARMUP.value, _STAGE.value,
                      num_candidates=int(m))
      rows.append(dict(mode=f"ft-M{r['candidates']}K{r['negatives']}", **r))
  if "score" in _MODES.value:
    ti, tc = (int(x) for x in _TILE.value.split("x"))
    rows.append(dict(mode="score", **bench_score(config, (ti, tc), _STEPS.value, _WARMUP.value)))
  r = rows[0]
  print(f"jax {r['jax']}; {r['positions']} positions; attention={config.model.attention_impl}, "
        f"remat={config.model.remat}; memory: {r['mem_kind']}")
  for row in rows:
    if row["mode"].startswith("ft-"):
      mined = (f"the best {row['negatives']} of {row['candidates']} candidates"
               if row["candidates"] > row["negatives"] else f"{row['negatives']} random")
      print(f"{row['mode']}: {row['train_gflop_per_sample']:.2f} GFLOP per matched pair "
            f"(negatives per direction: {mined})")
    elif row["mode"] in ("train", "input"):
      print(f"train: {row['train_gflop_per_sample']:.2f} GFLOP per sample (3 x forward matrix "
            "products, see imagebert_jax/bench/model.py)")
    else:
      print(f"score: {row['batch']} pairs per step; the Flickr30k 1K test (5M pairs) would take "
            f"{row['flickr30k_1k_minutes']:.1f} min")
  print(format_table(rows))
  if _RESULTS.value:
    append_results(_RESULTS.value, _LABEL.value, rows)


def command() -> None:
  """The console command `imagebert-bench` (started again with tcmalloc where the system has it,
  as runs are: imagebert_jax/allocator.py)."""
  allocator.reexec("imagebert_jax.bench")
  app.run(main, flags_parser=cli.absl_parser(PROG))


if __name__ == "__main__":
  command()
