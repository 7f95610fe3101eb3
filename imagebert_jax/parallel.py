"""Device mesh, logical axis rules, sharded state creation and global batches.

Weights carry logical axis names (`logical_axes` metadata on each `nnx.Param`, e.g.
('embed', 'mlp')). A rules table from the config maps each logical name to mesh axes:

    rules = (('batch', ('data', 'fsdp')), ('embed', 'fsdp'), ('mlp', 'tensor'), ...)

The mesh has three axes, ('data', 'fsdp', 'tensor'): pure data parallelism, fully sharded data
parallelism (the batch and the weights' `embed` dimension are split over it) and tensor parallelism
(heads, MLP and vocabulary dimensions). Activations are constrained at block boundaries through the
same table (`constrain`).

TensorFlow-free.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import math
from typing import Any, Iterable, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

Rules = tuple[tuple[str, Any], ...]

# The rules in force while tracing the model (set by `logical_rules`); `constrain` reads them.
_RULES: contextvars.ContextVar[Rules | None] = contextvars.ContextVar("imagebert_rules",
                                                                      default=None)


def make_mesh(shape: Sequence[int], devices: Sequence[Any] | None = None) -> Mesh:
  """A ('data', 'fsdp', 'tensor') mesh. One entry may be -1: it takes the devices left over.

  Raises ValueError naming config.mesh.shape when the shape does not match the devices.
  """
  devices = list(devices if devices is not None else jax.devices())
  shape = list(shape)
  if len(shape) != len(MESH_AXES):
    raise ValueError(f"config.mesh.shape={tuple(shape)}: want 3 entries for {MESH_AXES}")
  if shape.count(-1) > 1:
    raise ValueError(f"config.mesh.shape={tuple(shape)}: at most one entry may be -1")
  if -1 in shape:
    known = math.prod(s for s in shape if s != -1)
    if known <= 0 or len(devices) % known:
      raise ValueError(f"config.mesh.shape={tuple(shape)} does not fit {len(devices)} devices")
    shape[shape.index(-1)] = len(devices) // known
  if any(s < 1 for s in shape) or math.prod(shape) != len(devices):
    raise ValueError(f"config.mesh.shape={tuple(shape)} needs {math.prod(shape)} devices, "
                     f"but {len(devices)} are available")
  auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
  return jax.make_mesh(tuple(shape), MESH_AXES, axis_types=auto, devices=devices)


def rules_from_config(rules: Iterable[Sequence[Any]]) -> Rules:
  """Normalises a config's rules table to ((logical, mesh_axes_or_None), ...)."""
  out = []
  for entry in rules:
    if len(entry) != 2:
      raise ValueError(f"config.mesh.rules entry {tuple(entry)!r}: want (logical_name, mesh_axes)")
    name, axes = entry
    if isinstance(axes, list):
      axes = tuple(axes)
    for axis in (axes if isinstance(axes, tuple) else (axes,)):
      if axis is not None and axis not in MESH_AXES:
        raise ValueError(f"config.mesh.rules: {name!r} maps to unknown mesh axis {axis!r}; "
                         f"mesh axes are {MESH_AXES}")
    out.append((str(name), axes))
  return tuple(out)


def logical_to_spec(names: Sequence[str | None] | None, rules: Rules,
                    shape: Sequence[int] | None = None, mesh: Mesh | None = None) -> P:
  """Maps logical axis names to a PartitionSpec.

  A mesh axis is used at most once per spec (first come, first served). When `shape` and `mesh`
  are given, a dimension that the mesh axes do not divide evenly is replicated instead.
  """
  if names is None:
    return P()
  table = dict(rules)
  used: set[str] = set()
  spec = []
  for i, name in enumerate(names):
    axes = table.get(name) if name is not None else None
    if axes is None:
      spec.append(None)
      continue
    axes = axes if isinstance(axes, tuple) else (axes,)
    axes = tuple(a for a in axes if a not in used)
    if mesh is not None:
      axes = tuple(a for a in axes if mesh.shape[a] > 1)
      if shape is not None and axes and shape[i] % math.prod(mesh.shape[a] for a in axes):
        axes = ()
    used.update(axes)
    spec.append(axes[0] if len(axes) == 1 else (axes or None))
  return P(*spec)


@contextlib.contextmanager
def logical_rules(rules: Rules):
  """Makes `rules` the table that `constrain` uses while tracing."""
  token = _RULES.set(rules)
  try:
    yield
  finally:
    _RULES.reset(token)


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
  """Sharding constraint on an activation by logical names; a no-op without mesh or rules."""
  rules = _RULES.get()
  mesh = jax.sharding.get_abstract_mesh()
  if rules is None or mesh is None or mesh.empty or mesh.size == 1:
    return x
  spec = logical_to_spec(names, rules)
  spec = P(*[_drop_trivial(s, mesh) for s in spec])
  return jax.lax.with_sharding_constraint(x, spec)


def _drop_trivial(entry, mesh):
  if entry is None:
    return None
  axes = entry if isinstance(entry, tuple) else (entry,)
  axes = tuple(a for a in axes if mesh.shape[a] > 1)
  return axes[0] if len(axes) == 1 else (axes or None)


def batch_sharding(mesh: Mesh, rules: Rules, ndim: int = 1) -> NamedSharding:
  """Sharding of a batch array: the leading dimension over the 'batch' rule's mesh axes."""
  spec = logical_to_spec(("batch",) + (None,) * (ndim - 1), rules, mesh=mesh)
  return NamedSharding(mesh, spec)


def param_specs(abstract_state: Any, rules: Rules, mesh: Mesh) -> Any:
  """A pure dict of PartitionSpecs for an `nnx.State` of abstract Variables."""
  from flax import nnx  # local: keeps this module's import light for data-only users

  def spec(v):
    value = v.get_value()
    names = v.get_metadata().get("logical_axes")
    if names is not None and len(names) != len(value.shape):
      raise ValueError(f"logical axes {names} do not match shape {value.shape}")
    return logical_to_spec(names, rules, value.shape, mesh)

  specs = jax.tree.map(spec, abstract_state, is_leaf=lambda x: isinstance(x, nnx.Variable))
  return nnx.to_pure_dict(specs)


def global_batch(host_batch: Mapping[str, np.ndarray], mesh: Mesh,
                 rules: Rules) -> dict[str, jax.Array]:
  """Turns this process's share of a batch into global arrays sharded over the batch axes."""
  out = {}
  for key, value in host_batch.items():
    value = np.asarray(value)
    sharding = batch_sharding(mesh, rules, value.ndim)
    out[key] = jax.make_array_from_process_local_data(sharding, value)
  return out


def log_mesh(mesh: Mesh) -> None:
  logging.info("Mesh %s over %d devices (%s), %d processes", dict(mesh.shape), mesh.size,
               jax.devices()[0].platform, jax.process_count())


def replicated_array(x: np.ndarray, mesh: Mesh) -> jax.Array:
  """A host array copied to every device of every process (each process holds all of `x`)."""
  return jax.make_array_from_callback(x.shape, NamedSharding(mesh, P()), lambda index: x[index])


def barrier(name: str) -> None:
  """All processes wait for each other here; nothing with one process."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


def process_max(x: Any) -> np.ndarray:
  """The elementwise maximum of `x` over all processes (`x` itself with one process)."""
  x = np.asarray(x)
  if jax.process_count() == 1:
    return x
  from jax.experimental import multihost_utils
  return np.max(multihost_utils.process_allgather(x), axis=0)


def any_process(flag: bool) -> bool:
  return bool(process_max(bool(flag)))


def all_processes(flag: bool) -> bool:
  return not any_process(not flag)


def tree_size(tree: Any) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree) if hasattr(x, "shape"))
