"""Train state, its sharded creation, and the jitted update step. TensorFlow-free.

Parameters live in the state as a plain nested dict of arrays (the model's `nnx.Param` values);
the model's structure (`graphdef`) is kept aside and the module is rebuilt inside the step with
`nnx.merge`, which costs nothing at run time.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Callable, Mapping

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from imagebert_jax import parallel
from imagebert_jax.model import ImageBert, ModelConfig


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any
  # Updates skipped because the loss or the gradients were not finite (all, and in a row).
  skipped: jax.Array
  skipped_in_a_row: jax.Array


@dataclasses.dataclass
class StateSpec:
  """What is needed to build, shard and restore a TrainState."""

  graphdef: Any
  abstract: TrainState      # ShapeDtypeStructs with shardings
  shardings: TrainState     # NamedShardings
  mesh: Mesh
  rules: parallel.Rules


def _model_factory(model_cfg: ModelConfig, seed: int) -> Callable[[], ImageBert]:
  return lambda: ImageBert(model_cfg, rngs=nnx.Rngs(seed))


def params_spec(model_cfg: ModelConfig, mesh: Mesh, rules: parallel.Rules,
                seed: int = 0) -> tuple[Any, Any, Any]:
  """(graphdef, abstract params as ShapeDtypeStructs, their PartitionSpecs), nothing allocated."""
  with jax.set_mesh(mesh):
    abstract_model = nnx.eval_shape(_model_factory(model_cfg, seed))
  graphdef, abstract_params = nnx.split(abstract_model)
  pspecs = parallel.param_specs(abstract_params, rules, mesh)
  shapes = nnx.to_pure_dict(jax.tree.map(
      lambda v: jax.ShapeDtypeStruct(v.get_value().shape, v.get_value().dtype), abstract_params,
      is_leaf=lambda x: isinstance(x, nnx.Variable)))
  return graphdef, shapes, pspecs


def state_spec(model_cfg: ModelConfig, tx: optax.GradientTransformation, mesh: Mesh,
               rules: parallel.Rules, seed: int = 0) -> StateSpec:
  """Shapes and shardings of the train state, computed without allocating it."""
  graphdef, params_shape, pspecs = params_spec(model_cfg, mesh, rules, seed)
  opt_shape = jax.eval_shape(tx.init, params_shape)
  opt_specs = optax.tree_map_params(tx, lambda _, spec: spec, opt_shape, pspecs,
                                    transform_non_params=lambda _: P(),
                                    is_leaf=lambda x: isinstance(x, P))
  specs = TrainState(step=P(), params=pspecs, opt_state=opt_specs, skipped=P(),
                     skipped_in_a_row=P())
  shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), specs,
                           is_leaf=lambda x: isinstance(x, P))
  shapes = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=params_shape,
                      opt_state=opt_shape, skipped=jax.ShapeDtypeStruct((), jnp.int32),
                      skipped_in_a_row=jax.ShapeDtypeStruct((), jnp.int32))
  abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          shapes, shardings)
  return StateSpec(graphdef, abstract, shardings, mesh, rules)


def create_params(model_cfg: ModelConfig, mesh: Mesh, rules: parallel.Rules,
                  seed: int = 0) -> tuple[Any, Any]:
  """(graphdef, freshly initialised parameters created already sharded)."""
  graphdef, _, pspecs = params_spec(model_cfg, mesh, rules, seed)
  shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), pspecs,
                           is_leaf=lambda x: isinstance(x, P))

  def init():
    return nnx.to_pure_dict(nnx.state(_model_factory(model_cfg, seed)(), nnx.Param))

  with jax.set_mesh(mesh), parallel.logical_rules(rules):
    return graphdef, jax.jit(init, out_shardings=shardings)()


def create_state(spec: StateSpec, model_cfg: ModelConfig, tx: optax.GradientTransformation,
                 seed: int = 0) -> TrainState:
  """A freshly initialised state, created already sharded inside jit."""

  def init():
    model = _model_factory(model_cfg, seed)()
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    zero = jnp.zeros((), jnp.int32)
    return TrainState(step=zero, params=params, opt_state=tx.init(params), skipped=zero,
                      skipped_in_a_row=zero)

  with jax.set_mesh(spec.mesh), parallel.logical_rules(spec.rules):
    return jax.jit(init, out_shardings=spec.shardings)()


def state_with_params(spec: StateSpec, tx: optax.GradientTransformation, params: Any) -> TrainState:
  """A step-0 state around given parameters (placed with the state's shardings)."""

  def init(p):
    zero = jnp.zeros((), jnp.int32)
    return TrainState(step=zero, params=p, opt_state=tx.init(p), skipped=zero,
                      skipped_in_a_row=zero)

  with jax.set_mesh(spec.mesh):
    return jax.jit(init, in_shardings=(spec.shardings.params,), out_shardings=spec.shardings,
                   donate_argnums=(0,))(params)


# loss_fn(model, batch, key, step=...) -> (loss, scalar metrics); step is None when evaluating.
LossFn = Callable[..., tuple[jax.Array, dict]]


def global_norm(tree: Any) -> jax.Array:
  return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)))


def _tree_add(a, b):
  return jax.tree.map(jnp.add, a, b)


def make_train_step(spec: StateSpec, loss_fn: LossFn, tx: optax.GradientTransformation, *,
                    seed: int, grad_accum_steps: int = 1,
                    schedule: optax.Schedule | None = None,
                    skip_nonfinite: bool = True) -> Callable:
  """Returns a jitted `step(state, batch) -> (state, metrics)` with the state donated.

  `loss_fn(model, batch, key)` returns (loss, scalar metrics). The randomness of a step (ITM
  negatives, masks, dropout) comes from fold_in(key(seed), step) only. With
  `grad_accum_steps` > 1 the batch is split into that many micro-batches (strided, so each keeps
  its rows on their devices) whose gradients are averaged before one update. A step whose loss or
  gradient norm is not finite leaves the parameters and optimizer state unchanged (when
  `skip_nonfinite`) and counts itself in `skipped` / `skipped_in_a_row`.
  """
  graphdef = spec.graphdef
  accum = int(grad_accum_steps)

  def loss_on(params, batch, key, step):
    return loss_fn(nnx.merge(graphdef, params), batch, key, step=step)

  grad_fn = jax.value_and_grad(loss_on, has_aux=True)

  def step_fn(state: TrainState, batch: Mapping[str, jax.Array]):
    key = jax.random.fold_in(jax.random.key(seed), state.step)
    if accum == 1:
      (_, metrics), grads = grad_fn(state.params, batch, key, state.step)
    else:
      def split(x):
        if x.shape[0] % accum:
          raise ValueError(f"batch size {x.shape[0]} is not divisible by "
                           f"grad_accum_steps={accum}")
        x = x.reshape(x.shape[0] // accum, accum, *x.shape[1:]).swapaxes(0, 1)
        return parallel.constrain(x, (None, "batch") + (None,) * (x.ndim - 2))
      micro = jax.tree.map(split, batch)

      def body(carry, inp):
        mb, i = inp
        (_, m), g = grad_fn(state.params, mb, jax.random.fold_in(key, i), state.step)
        return _tree_add(carry, (g, m)), None

      (_, metric_shapes), grad_shapes = jax.eval_shape(
          grad_fn, state.params, jax.tree.map(lambda x: x[0], micro), key, state.step)
      zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), (grad_shapes, metric_shapes))
      (grads, metrics), _ = jax.lax.scan(body, zeros, (micro, jnp.arange(accum)))
      grads = jax.tree.map(lambda g: g / accum, grads)
      metrics = jax.tree.map(lambda m: m / accum, metrics)
    grad_norm = global_norm(grads)
    updates, new_opt = tx.update(grads, state.opt_state, state.params)
    new_params = optax.apply_updates(state.params, updates)
    finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm)
    if skip_nonfinite:
      keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
      new_params = keep(new_params, state.params)
      new_opt = keep(new_opt, state.opt_state)
    bad = (~finite).astype(jnp.int32)
    new_state = state.replace(step=state.step + 1, params=new_params, opt_state=new_opt,
                              skipped=state.skipped + bad,
                              skipped_in_a_row=(state.skipped_in_a_row + bad) * bad)
    metrics = dict(metrics, grad_norm=grad_norm,
                   skipped_updates=new_state.skipped.astype(jnp.float32),
                   nonfinite_in_a_row=new_state.skipped_in_a_row.astype(jnp.float32))
    if schedule is not None:
      # AdamW counts only the updates it applied; skipped steps leave its count behind.
      applied = state.step - state.skipped if skip_nonfinite else state.step
      metrics["learning_rate"] = schedule(applied)
    return new_state, metrics

  jitted = jax.jit(step_fn, in_shardings=(spec.shardings, None),
                   out_shardings=(spec.shardings, None), donate_argnums=(0,))

  def step(state, batch):
    with jax.set_mesh(spec.mesh), parallel.logical_rules(spec.rules):
      return jitted(state, batch)

  step.jitted = jitted
  return step


def make_eval_step(spec: StateSpec, loss_fn: LossFn, *, seed: int) -> Callable:
  """Jitted `eval(params, batch, index) -> metrics`, deterministic (fixed keys, no dropout)."""
  graphdef = spec.graphdef

  def eval_fn(params, batch, index):
    key = jax.random.fold_in(jax.random.key(seed), index)
    _, metrics = loss_fn(nnx.merge(graphdef, params), batch, key)
    return metrics

  jitted = jax.jit(eval_fn, in_shardings=(spec.shardings.params, None, None))

  def run(params, batch, index):
    with jax.set_mesh(spec.mesh), parallel.logical_rules(spec.rules):
      return jitted(params, batch, index)

  return run


@jax.jit
def all_finite(tree: Any) -> jax.Array:
  """True when every floating-point value of the tree is finite."""
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
            if jnp.issubdtype(x.dtype, jnp.floating)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)


def log_param_count(params: Any) -> int:
  n = parallel.tree_size(params)
  logging.info("Model parameters: %s", f"{n:,}")
  return n
