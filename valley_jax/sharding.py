"""Device mesh and the one list of logical-axis rules.

The model names the logical axes of every parameter (`axes` metadata, e.g. ('embed', 'mlp')) and
of a few activations (`constrain`); `RULES` maps each name to mesh axes. Parameter, optimizer
state and batch shardings are all derived from it, never written per tensor.

Mesh axes:
  data    pure data parallelism (parameters replicated)
  fsdp    data parallelism with parameters and optimizer state sharded (ZeRO-3 style)
  tensor  Megatron-style tensor parallelism over heads and MLP width
"""

from __future__ import annotations

import contextlib
import math
import os
import re
from typing import Iterable, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

# Ordered: for each logical name, the mesh axes it is sharded over. A mesh axis is used at
# most once per array: a later name that wants an axis already taken stays unsharded there.
RULES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("activation_batch", ("data", "fsdp")),
    ("activation_heads", ("tensor",)),
    ("activation_mlp", ("tensor",)),
    ("heads", ("tensor",)),
    ("kv_heads", ("tensor",)),
    ("mlp", ("tensor",)),
    ("vocab", ("tensor",)),
    ("embed", ("fsdp",)),
    ("layers", ()),
    ("head_dim", ()),
    ("norm", ()),
)


def size_cpu_thread_pools(env=os.environ) -> None:
    """Several CPU devices in one process (`--xla_force_host_platform_device_count=N` or
    JAX_NUM_CPU_DEVICES, to try a mesh on a laptop): XLA:CPU's intra-op pool has max(cores, N)
    threads, and a sharded step's collectives, handed to that pool, block it until every device
    joins them, which can deadlock a small pool (XLA then aborts after 40 s). Unless PJRT_NPROC
    is set, give it 8 threads per device. Call before jax creates its CPU client."""
    match = re.search(r"--xla_force_host_platform_device_count=(\d+)", env.get("XLA_FLAGS", ""))
    devices = int(match.group(1)) if match else int(env.get("JAX_NUM_CPU_DEVICES") or 1)
    if devices > 1 and "PJRT_NPROC" not in env:
        env["PJRT_NPROC"] = str(8 * devices)


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, devices=None) -> Mesh:
    """A ('data', 'fsdp', 'tensor') mesh over all devices of all processes; one size may be -1
    (the rest). Auto axis types: GSPMD propagates shardings from the annotated arrays."""
    devices = jax.devices() if devices is None else devices
    sizes = [data, fsdp, tensor]
    if sizes.count(-1) > 1:
        raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))}: at most one axis may be -1")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if len(devices) % known:
            raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))} does not divide "
                             f"{len(devices)} devices")
        sizes[sizes.index(-1)] = len(devices) // known
    if math.prod(sizes) != len(devices):
        raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices, "
                         f"found {len(devices)}")
    return jax.make_mesh(tuple(sizes), MESH_AXES, axis_types=(AxisType.Auto,) * 3,
                         devices=devices)


def spec(axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh,
         rules: Iterable = RULES) -> P:
    """PartitionSpec for an array with these logical axes. A dimension that the mesh axes do not
    divide stays replicated (e.g. 2 kv heads on a tensor axis of 4)."""
    table = dict(rules)
    used: set[str] = set()
    out = []
    for name, dim in zip(axes, shape):
        mesh_axes = [a for a in table.get(name, ()) if a not in used and mesh.shape[a] > 1] \
            if name is not None else []
        if name is not None and name not in table:
            raise KeyError(f"logical axis {name!r} has no sharding rule")
        # Keep the longest prefix of the wanted mesh axes that divides the dimension.
        while mesh_axes and dim % math.prod(mesh.shape[a] for a in mesh_axes):
            mesh_axes.pop()
        used.update(mesh_axes)
        out.append(None if not mesh_axes else mesh_axes[0] if len(mesh_axes) == 1
                   else tuple(mesh_axes))
    return P(*out)


def param_shardings(model, mesh: Mesh, rules=RULES) -> dict:
    """{path: NamedSharding} for every variable of an nnx module, from its `axes` metadata."""
    from flax import nnx
    out = {}
    for path, var in nnx.iter_graph(model):
        if isinstance(var, nnx.Variable):
            axes = var.get_metadata().get("axes", (None,) * len(var.shape))
            out[tuple(path)] = NamedSharding(mesh, spec(axes, var.shape, mesh, rules))
    return out


def batch_spec(ndim: int) -> P:
    """Batches are split over every data-parallel axis; other dimensions are replicated."""
    return P(("data", "fsdp"), *([None] * (ndim - 1)))


def batch_shardings(batch: dict, mesh: Mesh) -> dict:
    return {k: NamedSharding(mesh, batch_spec(np.ndim(v))) for k, v in batch.items()}


# Activation constraints: active while `activation_rules(mesh)` is entered (the train step and
# generation enter it); a no-op otherwise, so the model runs unchanged on one device.
_ACTIVE: list = []


@contextlib.contextmanager
def activation_rules(mesh: Mesh, rules=RULES):
    _ACTIVE.append((mesh, tuple(rules)))
    try:
        yield
    finally:
        _ACTIVE.pop()


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
    if not _ACTIVE:
        return x
    mesh, rules = _ACTIVE[-1]
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec(axes, x.shape, mesh, rules)))
