"""Saving and restoring models that hold QArrays with orbax, and the size a checkpoint takes on disk.

A QArray is a pytree, so orbax stores its packed data and scales as ordinary arrays (float8 scales included) and
the format, block axis and shape come back from the target's structure: a restored model runs with no
re-quantization. A `PreparedWeight` is saved as its canonical QArray (the saved form does not depend on a GPU
kernel's layout) and prepared again on restore where the target holds one. The target is an nnx Module, typically
abstract (`nnx.eval_shape` of a function that builds and quantizes the model, which computes no weights), or any
pytree such as linen variables.
"""

from __future__ import annotations

import os
from typing import Any, TypeVar

import jax
import orbax.checkpoint as ocp
from flax import nnx

from lowbit_jax.prepared import PreparedWeight, canonical, prepare

__all__ = ["save", "restore", "disk_bytes"]

T = TypeVar("T")


def _state(target):
  return nnx.state(target) if isinstance(target, nnx.Module) else target


def save(directory: str | os.PathLike, model: Any, *, force: bool = False) -> int:
  """Writes `model` (an nnx Module, an nnx State or any pytree of arrays and QArrays) to `directory` and waits
  for the write to finish. `force` overwrites an existing checkpoint. Returns the bytes on disk.

  Example:
    >>> import tempfile, jax.numpy as jnp
    >>> from flax import nnx
    >>> from lowbit_jax import checkpoint
    >>> from lowbit_jax.flax import QLinear
    >>> make = lambda: QLinear(256, 256, weight_format="mxfp4", rngs=nnx.Rngs(0))
    >>> path = tempfile.mkdtemp() + "/ckpt"
    >>> n = checkpoint.save(path, make())
    >>> restored = checkpoint.restore(path, nnx.eval_shape(make))
    >>> restored.kernel.get_value()
    QArray(mxfp4, shape=(256, 256), axis=0, dtype=float32)
  """
  directory = os.path.abspath(os.fspath(directory))
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(directory, canonical(_state(model)), force=force)
    ckptr.wait_until_finished()
  return disk_bytes(directory)


def restore(directory: str | os.PathLike, target: T) -> T:
  """Reads a checkpoint written by `save` into the structure of `target`.

  `target`: an nnx Module (abstract or concrete) whose layers are already of the saved kinds and formats (for a
  quantized model: build it, then `quantize_model`, under `nnx.eval_shape`); returns a new Module of that
  structure holding the saved values. Any other pytree (an nnx State, linen variables, abstract or concrete)
  returns the restored pytree.
  """
  directory = os.path.abspath(os.fspath(directory))
  state = _state(target)
  is_prepared = lambda x: isinstance(x, PreparedWeight)
  abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, state)
  if any(map(is_prepared, jax.tree_util.tree_leaves(state, is_leaf=is_prepared))):
    abstract = jax.eval_shape(canonical, abstract)  # (what was saved: the canonical QArrays)
  with ocp.StandardCheckpointer() as ckptr:
    restored = ckptr.restore(directory, abstract)
  restored = jax.tree_util.tree_map(lambda t, r: prepare(r) if is_prepared(t) else r, state, restored,
                                    is_leaf=is_prepared)
  if isinstance(target, nnx.Module):
    graphdef, _ = nnx.split(target)
    return nnx.merge(graphdef, restored)
  return restored


def disk_bytes(directory: str | os.PathLike) -> int:
  """Total size of the files under `directory`."""
  total = 0
  for root, _, files in os.walk(os.fspath(directory)):
    total += sum(os.path.getsize(os.path.join(root, f)) for f in files)
  return total
