"""Checkpoints: orbax steps that hold everything a run needs to continue exactly.

A step directory `<workdir>/checkpoints/<step>/` holds the items
  params     the model parameters (nnx pure dict), sharded arrays
  opt_state  the optimizer state (absent in parameter-only checkpoints)
  data       the input iterator's state (grain), one file per process
  meta       JSON: step, the resolved config, and a checksum of every saved array

orbax writes each step to a temporary directory and renames it when complete, so a
killed save leaves no step behind. orbax does not notice flipped bits (a damaged data
file can restore wrong values silently), hence the checksums: a bit-level weighted
sum of every array, computed on device, recorded at save and verified at restore. A
step that fails to restore or verify is moved aside (renamed `<step>.damaged`, kept for
inspection) with a warning naming both places, and the previous step is used; the run
then saves that step again as if it had never been written. When every step is
damaged, `restore_latest` raises DamagedCheckpoints instead of starting over silently.
"""

import json
import logging
import os

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from etils import epath

_UINT = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}


@jax.jit
def _checksum(x):
  """A uint32 sum of every element's bits times a position-dependent odd weight (mod 2**32)."""
  bits = x.reshape(-1)
  if bits.dtype == jnp.int4:  # (4-bit values widened: each distinct value stays distinct)
    bits = bits.astype(jnp.int8)
  if bits.dtype.itemsize == 8:
    bits = jax.lax.bitcast_convert_type(bits, jnp.uint32).reshape(-1)
  else:
    bits = jax.lax.bitcast_convert_type(bits, _UINT[bits.dtype.itemsize])
  weights = jnp.arange(bits.size, dtype=jnp.uint32) * jnp.uint32(2654435761) | jnp.uint32(1)
  return jnp.sum(bits.astype(jnp.uint32) * weights, dtype=jnp.uint32)


def checksums(tree) -> dict:
  """{path: checksum} of every array leaf of a pytree."""
  leaves = jax.tree_util.tree_leaves_with_path(tree)
  return {jax.tree_util.keystr(path): int(_checksum(leaf)) for path, leaf in leaves}


class CorruptCheckpoint(Exception):
  pass


class DamagedCheckpoints(Exception):
  """Every checkpoint of a run failed to restore (each was moved aside)."""


class CheckpointWriteFailed(Exception):
  """An asynchronous save did not complete (a full disk, a lost filesystem). The steps
  saved before it are intact; its partial `<step>.orbax-checkpoint-tmp` directory is
  removed when the next run starts (orbax's cleanup_tmp_directories)."""

  def __init__(self, step: int, directory: str, cause: Exception, saved: list[int]):
    reason = (str(cause).splitlines() or [repr(cause)])[0]
    self.no_space = "No space left on device" in reason or "os_error_code='28'" in reason
    self.step, self.saved = step, saved
    newest = f"the newest complete checkpoint is step {max(saved)}" if saved else \
        "no complete checkpoint was saved"
    what = "the disk is full" if self.no_space else reason[:300]
    super().__init__(f"could not write checkpoint {step} in {directory}: {what}; {newest}")


def _everyone(ok: bool) -> bool:
  """True when `ok` holds on every process (a step is usable only if all read it)."""
  if jax.process_count() == 1:
    return ok
  import numpy as np
  from jax.experimental import multihost_utils
  return bool(np.all(multihost_utils.process_allgather(np.array(ok))))


def set_aside(step_dir: str) -> str:
  """Renames a damaged step directory to `<step>.damaged` (`.damaged-2`, ... when taken),
  on process 0 with the others waiting; returns the new path."""
  target, number = f"{step_dir}.damaged", 1
  while os.path.exists(target):
    number += 1
    target = f"{step_dir}.damaged-{number}"
  if jax.process_index() == 0 and os.path.exists(step_dir):
    os.rename(step_dir, target)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(f"set aside {step_dir}")
  return target


def _verify(restored: dict, expected: dict, step_dir: str):
  for item, tree in restored.items():
    got = checksums(tree)
    for path, value in got.items():
      if expected.get(item, {}).get(path) != value:
        raise CorruptCheckpoint(f"checksum mismatch in {step_dir} {item}{path}")


class Checkpointer:
  """Saves and restores training steps in `directory` (see the module docstring)."""

  def __init__(self, directory: str, *, keep: int = 3):
    self.directory = os.path.abspath(directory)
    self.manager = ocp.CheckpointManager(
        self.directory, options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, enable_async_checkpointing=True, cleanup_tmp_directories=True))
    self.writing = None  # the step whose asynchronous save may still be running

  def _finish_writing(self):
    """Waits for the running save; CheckpointWriteFailed when it failed."""
    try:
      self.manager.wait_until_finished()
    except Exception as error:  # noqa: BLE001  (whatever the storage raised)
      step, self.writing = self.writing, None
      self.manager.reload()
      raise CheckpointWriteFailed(step, self.directory, error,
                                  sorted(self.manager.all_steps())) from error
    self.writing = None

  def save(self, step: int, params, opt_state, data_iterator, meta: dict) -> None:
    """Starts an asynchronous save of `step` (the data iterator's state is taken now),
    after the previous one finished; CheckpointWriteFailed when that one failed."""
    self._finish_writing()
    meta = dict(meta, step=step, checksums={"params": checksums(params),
                                            "opt_state": checksums(opt_state)})
    items = dict(params=ocp.args.StandardSave(params), opt_state=ocp.args.StandardSave(opt_state),
                 meta=ocp.args.JsonSave(meta))
    if data_iterator is not None:
      import grain
      items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
    self.manager.save(step, args=ocp.args.Composite(**items), force=True)
    self.writing = step

  def restore_latest(self, params_target, opt_state_target, data_iterator):
    """(step, params, opt_state, meta) of the newest step that restores and verifies, or
    None when there is no checkpoint. A step that does not restore is moved aside
    (`set_aside`); DamagedCheckpoints when every one was.

    Targets are trees of jax.ShapeDtypeStruct with the shardings to restore onto; the
    data iterator is restored in place.
    """
    steps = sorted(self.manager.all_steps(), reverse=True)
    moved = []
    for step in steps:
      step_dir = os.path.join(self.directory, str(step))
      restored, reason = self._restore(step, step_dir, params_target, opt_state_target,
                                       data_iterator)
      if _everyone(restored is not None):
        return restored
      moved.append(set_aside(step_dir))
      self.manager.reload()  # the step is gone: saving it again is a new save
      logging.warning("skipping checkpoint %s: %s; moved it to %s", step_dir,
                      reason or "another process could not read it", moved[-1])
    if moved:
      raise DamagedCheckpoints(
          f"every checkpoint in {self.directory} is damaged (steps "
          f"{', '.join(map(str, steps))}; moved aside to {', '.join(moved)})")
    return None

  def _restore(self, step, step_dir, params_target, opt_state_target, data_iterator):
    """((step, params, opt_state, meta), None) or (None, why it failed)."""
    try:
      items = dict(params=ocp.args.StandardRestore(params_target),
                   opt_state=ocp.args.StandardRestore(opt_state_target),
                   meta=ocp.args.JsonRestore())
      if data_iterator is not None:
        import grain
        items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
      restored = self.manager.restore(step, args=ocp.args.Composite(**items))
      meta = restored["meta"]
      _verify({"params": restored["params"], "opt_state": restored["opt_state"]},
              meta["checksums"], step_dir)
      return (step, restored["params"], restored["opt_state"], meta), None
    except Exception as error:  # noqa: BLE001  (any damage: fall back to an older step)
      return None, (str(error).splitlines() or [repr(error)])[0][:300]

  def close(self):
    """Waits for the running save (CheckpointWriteFailed when it failed) and closes."""
    try:
      self._finish_writing()
    finally:
      self.manager.close()


def find_step_dir(path: str) -> str:
  """A checkpoint step directory from a workdir, its checkpoints/ folder, or a step itself."""
  path = os.path.abspath(path)
  for candidate in (os.path.join(path, "checkpoints"), path):
    if os.path.isdir(candidate):
      steps = [int(name) for name in os.listdir(candidate) if name.isdigit()]
      if steps:
        return os.path.join(candidate, str(max(steps)))
  if os.path.isdir(os.path.join(path, "params")):
    return path
  raise FileNotFoundError(f"no checkpoint in {path}")


def run_dir(step_dir: str) -> str:
  """The run directory (workdir) that holds a checkpoint step: <run>/checkpoints/<step>."""
  return os.path.dirname(os.path.dirname(os.path.abspath(step_dir)))


def save_params(step_dir: str, params, meta: dict) -> None:
  """A parameter-only checkpoint step (params + meta with checksums), written synchronously.

  `params` may hold NumPy or JAX arrays; load_params and train.py's init_from read it.
  """
  meta = dict(meta, checksums={"params": checksums(params)})
  checkpointer = ocp.Checkpointer(ocp.CompositeCheckpointHandler())
  checkpointer.save(os.path.abspath(step_dir), args=ocp.args.Composite(
      params=ocp.args.StandardSave(params), meta=ocp.args.JsonSave(meta)))
  checkpointer.close()


def load_meta(path: str) -> tuple[str, dict]:
  """(step directory, meta JSON) of the newest checkpoint under `path`, parameters unread.

  Read as the file orbax's JsonSave wrote (<step>/meta/metadata), not through orbax,
  whose restore asks JAX for the process index and so starts JAX's backends: serve.py
  reads the meta before it knows how many virtual CPU devices to make."""
  step_dir = find_step_dir(path)
  with open(os.path.join(step_dir, "meta", "metadata")) as f:
    return step_dir, json.load(f)


def check_param_shapes(step_dir: str, params_target) -> None:
  """Raises ValueError naming the first parameter whose stored shape differs from the
  target's (a checkpoint of another model shape, or of an older parameter layout)."""
  stored = {name: tuple(array.shape) for name, array in _stored_arrays(step_dir).items()}
  for path, target in jax.tree_util.tree_flatten_with_path(params_target)[0]:
    param, shape = _param_name(path), tuple(target.shape)
    if param not in stored:
      raise ValueError(f"checkpoint {step_dir} has no parameter {param}")
    if stored[param] != shape:
      hint = (" (checkpoints written before 2026-11-26 stored lm_head as [dim, vocab]; it "
              "is now [vocab, dim]: retrain, or convert the model again)"
              if param == "lm_head" and stored[param] == shape[::-1] else "")
      raise ValueError(f"checkpoint {step_dir} stores {param} with shape {stored[param]}, "
                       f"but this model needs {shape}{hint}")


def load_params(path: str, params_target, check_shapes: bool = True):
  """Parameters only, from a workdir / checkpoints dir / step dir, onto the target shardings.

  Works whatever mesh wrote them: the target's shardings decide the layout. Returns
  (params, meta). Raises ValueError when a stored shape differs from the target's
  (`check_shapes=False`: the caller has checked them).
  """
  step_dir = find_step_dir(path)
  if check_shapes:
    check_param_shapes(step_dir, params_target)
  # Read as stored, since the checksums are of the stored bits; then cast to the
  # target's dtypes (serving a float32 checkpoint in bfloat16: model.param_dtype).
  stored = _stored_arrays(step_dir)
  as_stored = jax.tree_util.tree_map_with_path(
      lambda path, target: jax.ShapeDtypeStruct(
          target.shape, getattr(stored.get(_param_name(path)), "dtype", target.dtype),
          sharding=getattr(target, "sharding", None)), params_target)
  checkpointer = ocp.Checkpointer(ocp.CompositeCheckpointHandler())
  restored = checkpointer.restore(step_dir, args=ocp.args.Composite(
      params=ocp.args.StandardRestore(as_stored), meta=ocp.args.JsonRestore()))
  _verify({"params": restored["params"]},
          {"params": restored["meta"]["checksums"]["params"]}, step_dir)
  params = jax.tree.map(lambda x, target: x if x.dtype == target.dtype else
                        x.astype(target.dtype), restored["params"], params_target)
  return params, restored["meta"]


def _param_name(path) -> str:
  return "/".join(str(getattr(key, "key", key)) for key in path)


def _stored_arrays(step_dir: str) -> dict:
  """{"blocks/0/attn/wq": its stored metadata (shape, dtype), ...} of a checkpoint's
  parameters, nothing read but the metadata."""
  stored = ocp.StandardCheckpointHandler().metadata(epath.Path(step_dir) / "params")
  return {_param_name(path): array for path, array in
          jax.tree_util.tree_flatten_with_path(getattr(stored, "tree", stored))[0]}

