"""One process of the multi-host test (tests/test_multihost.py starts it, once per process).

  python tests/multihost_worker.py <process_id> <num_processes> <port> <devices_per_process>
      <workdir> <mode>

The runtime starts through imagebert_jax.distributed from the environment the test sets.

mode 'train': 3 training steps, mesh data 4 x fsdp 2, on global batches that every process builds
from its own share of the rows through parallel.global_batch (as training does from its input
pipeline); prints the losses, saves a checkpoint to <workdir>/ckpt (written by every process), then
scores a small split with the evaluation code, every pair and in two stages. The whole parameters and score matrix go to
<workdir>/params_<process>.npz and scores_<process>.npy
(two-stage: itc_<process>.npy, rerank_<process>.npy). mode 'restore:<dir>': restores the
checkpoint in <dir> on this topology and writes its whole parameters the same way.
"""

import json
import os
import sys

pid, nproc, port, ndev, workdir, mode = (int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]),
                                         int(sys.argv[4]), sys.argv[5], sys.argv[6])
os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={ndev}"
os.environ["JAX_PLATFORMS"] = "cpu"
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402

from imagebert_jax import distributed  # noqa: E402

if nproc > 1:
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
# As main starts it: JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID come from the
# test; process 1's JAX_PROCESS_ID is wrong on purpose and its --process_id (the argument here)
# overrides it. One process: no settings, nothing started.
STARTED = distributed.initialize(process_id=pid if pid == 1 else -1)
assert STARTED == (nproc > 1) and jax.process_index() == pid and jax.process_count() == nproc

import functools  # noqa: E402
import types  # noqa: E402

import numpy as np  # noqa: E402

from helpers import CLS, MASK, PAD, RANDOM_RANGE, SEP, TINY, random_batch  # noqa: E402
from imagebert_jax import parallel
from imagebert_jax.training import checkpoint
from imagebert_jax.config import defaults as config_defaults
from imagebert_jax.retrieval import evaluate
from imagebert_jax.training import optim  # noqa: E402
from imagebert_jax.retrieval import two_stage  # noqa: E402
from imagebert_jax.training import state as state_lib  # noqa: E402
from imagebert_jax.objectives.pretraining import PretrainObjective, pretrain_loss  # noqa: E402
import ml_collections  # noqa: E402

RULES = parallel.rules_from_config(config_defaults.DEFAULT_RULES)
OBJ = PretrainObjective(pad_id=PAD, cls_id=CLS, sep_id=SEP, mask_id=MASK,
                        random_token_range=RANDOM_RANGE)


def own_rows(mesh, n):
  """The rows of a global batch of `n` that this process's devices hold under the batch
  sharding, read off the sharding: the share its input pipeline would give it."""
  sharding = parallel.batch_sharding(mesh, RULES, 1)
  index = sharding.addressable_devices_indices_map((n,))
  return np.asarray(sorted({i for (rows,) in index.values() for i in range(*rows.indices(n))}))


def save_params(tree, path):
  """Every parameter, gathered whole from all processes, keyed by its path."""
  from imagebert_jax.training.checkpoint import flatten_paths
  whole = {"/".join(k): np.asarray(jax.experimental.multihost_utils.process_allgather(
      v, tiled=True)) for k, v in flatten_paths(tree).items()}
  np.savez(path, **whole)


def main():
  import jax.experimental.multihost_utils  # noqa: F401
  mesh = parallel.make_mesh((4, 2, 1))
  tx, schedule = optim.make_optimizer(ml_collections.ConfigDict(dict(
      learning_rate=1e-3, warmup_steps=1, weight_decay=0.01, b1=0.9, b2=0.999, eps=1e-6,
      grad_clip_norm=1.0)), 10)
  spec = state_lib.state_spec(TINY, tx, mesh, RULES, seed=0)
  out = {"process": jax.process_index(), "processes": jax.process_count(),
         "devices": jax.device_count()}
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, "ckpt"), keep=1)
  if mode == "train":
    state = state_lib.create_state(spec, TINY, tx, seed=0)
    step = state_lib.make_train_step(spec, functools.partial(pretrain_loss, obj=OBJ), tx,
                                     seed=0, schedule=schedule)
    rng = np.random.default_rng(0)
    rows = own_rows(mesh, 16)
    out["rows"] = rows.tolist()
    losses = []
    for _ in range(3):
      whole = random_batch(rng, 16, TINY)  # the same on every process; each keeps its share
      batch = parallel.global_batch({k: v[rows] for k, v in whole.items()}, mesh, RULES)
      state, metrics = step(state, batch)
      losses.append(float(metrics["loss"]))
    out["losses"] = losses
    ckpt.save(3, state)
    ckpt.close()
    save_params(state.params, os.path.join(workdir, f"params_{pid}.npz"))
    # Evaluation sharded over every device of every process.
    split = evaluate.Split(*_split(np.random.default_rng(1)))
    graphdef = spec.graphdef
    scores = evaluate.score_all(state.params, split, graphdef, mesh, RULES,
                                os.path.join(workdir, "eval"), pad_id=PAD, tile_images=2,
                                tile_captions=8, chunk_images=4, progress=False)
    np.save(os.path.join(workdir, f"scores_{pid}.npy"), scores)
    # The same split in two stages: embeddings, then the cross-encoder on each query's top 2.
    ecfg = ml_collections.ConfigDict(dict(rerank_k=2, tile_images=2, tile_captions=8,
                                          chunk_images=4, protocol="full", progress=False))
    ids = types.SimpleNamespace(pad_id=PAD, cls_id=CLS, sep_id=SEP)
    two = two_stage.evaluate_split(state.params, split, graphdef, mesh, RULES,
                                   os.path.join(workdir, "two_stage"), ids=ids, ecfg=ecfg)
    np.save(os.path.join(workdir, f"itc_{pid}.npy"), two.itc_scores)
    np.save(os.path.join(workdir, f"rerank_{pid}.npy"), two.scores)
    out["pairs_scored"] = two.extra["pairs_scored"]
  else:
    ckpt.close()
    source = mode.split(":", 1)[1]
    other = checkpoint.Checkpointer(source, keep=1)
    restored = other.restore(other.latest_step(), spec.abstract)
    save_params(restored.params, os.path.join(workdir, f"params_{pid}.npz"))
    out["step"] = int(jax.device_get(restored.step))
    leaf = restored.params["encoder"]["layers"][0]["mlp_in"]["kernel"]
    out["shard_shape"] = list(leaf.addressable_shards[0].data.shape)
  print("RESULT " + json.dumps(out), flush=True)


def _split(rng, n_img=6, caps=2):
  b = random_batch(rng, n_img, TINY)
  text = np.concatenate([random_batch(rng, n_img, TINY)["text_ids"] for _ in range(caps)])
  owner = np.tile(np.arange(n_img), caps).astype(np.int32)
  return (b["region_feat"].astype(np.float16), b["region_loc"], b["num_regions"], text, owner,
          [str(i) for i in range(n_img)], np.arange(n_img))


if __name__ == "__main__":
  main()
  if nproc > 1:
    jax.distributed.shutdown()
