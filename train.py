"""Train a ringlm model.

  python train.py --config=configs/tiny.py --workdir=DIR [--config.FIELD=VALUE ...]

Re-running the same command resumes from the newest good checkpoint in DIR; the
resumed run's losses equal an uninterrupted run's. Multi-host: run the same command
on every host (TPU pods and SLURM are detected; elsewhere pass --coordinator_address,
--num_processes and --process_id). On CPU, --cpu_devices sets the virtual device count.

The loop: data (data/) -> zigzag layout (parallel/layout.py) -> jit-compiled step on the
mesh (loss, gradients, AdamW) -> metrics (<workdir>/metrics.jsonl) and checkpoints
(<workdir>/checkpoints, model/checkpoint.py).
"""

import json
import logging
import os
import signal
import sys
import time

from absl import app, flags
from ml_collections import config_flags

from configs.cli import fail, parse_flags

FLAGS = flags.FLAGS


def define_flags():
  """The command line's flags, defined only when run as a program: the tools' flags share
  names (--config, --checkpoint, --cpu_devices), so importing two of them must not define any."""
  config_flags.DEFINE_config_file("config", None, "ringlm config file.", lock_config=True)
  flags.DEFINE_string("workdir", None, "Run directory: checkpoints, metrics, assets.")
  flags.DEFINE_integer("cpu_devices", 8, "Virtual CPU devices (CPU backend only).")
  flags.DEFINE_string("coordinator_address", os.environ.get("RINGLM_COORDINATOR"),
                      "host:port of process 0 (multi-host without a cluster manager); env "
                      "RINGLM_COORDINATOR.")
  flags.DEFINE_integer("num_processes", int(os.environ.get("RINGLM_NUM_PROCESSES", 1)),
                       "Processes in the job; env RINGLM_NUM_PROCESSES.")
  flags.DEFINE_integer("process_id", int(os.environ.get("RINGLM_PROCESS_ID", 0)),
                       "This process' index; env RINGLM_PROCESS_ID.")
  flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() with the "
                    "cluster's own discovery (automatic on TPU VMs and under SLURM).")


# Peak dense bf16 FLOP/s per device, for MFU; CPUs are measured at start-up instead.
PEAK_FLOPS = {"TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12,
              "TPU v5": 459e12, "TPU v6 lite": 918e12, "TPU v6e": 918e12,
              "A100": 312e12, "H100": 989e12, "H200": 989e12}


# --------------------------------------------------------------------------- set-up

def start_jax():
  """Distributed start-up (before any other JAX call) and the CPU device count."""
  import jax
  cluster = any(name in os.environ for name in ("SLURM_NTASKS", "TPU_WORKER_HOSTNAMES",
                                                 "TPU_WORKER_ID", "MEGASCALE_COORDINATOR_ADDRESS"))
  if FLAGS.num_processes > 1:
    from parallel.mesh import initialize_distributed
    initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
  elif FLAGS.distributed or (cluster and int(os.environ.get("SLURM_NTASKS", 2)) > 1):
    jax.distributed.initialize()
  jax.config.update("jax_num_cpu_devices", FLAGS.cpu_devices)
  return jax


def peak_flops_per_device(jax, dtype: str):
  """Dense bf16 peak from PEAK_FLOPS on TPU/GPU; on CPU, measured in the compute `dtype`."""
  device = jax.devices()[0]
  for kind, flops in PEAK_FLOPS.items():
    if device.platform != "cpu" and kind.lower() in device.device_kind.lower():
      return flops
  from bench.common import matmul_peak  # measured on this machine, shared by its devices
  from parallel.mesh import make_mesh
  return matmul_peak(make_mesh({"data": -1}), size=2048, repeats=3,
                     dtype=dtype)["peak_flops"] / jax.device_count()


def check_workdir(workdir: str, model_dict: dict):
  """Refuses a workdir whose saved model shape differs from this config's."""
  path = os.path.join(workdir, "config.json")
  if os.path.exists(path):
    from model.config import ModelConfig
    with open(path) as f:  # fields a config lacks take their defaults
      saved = ModelConfig.from_dict(json.load(f)["model"]).to_dict()
    changed = sorted(k for k in set(saved) | set(model_dict)
                     if k not in ("dtype", "param_dtype", "remat", "rope", "max_seq_len")
                     and saved.get(k) != model_dict.get(k))
    if changed:
      differences = "; ".join(f"model.{k}: {saved.get(k)} there, {model_dict.get(k)} here"
                              for k in changed)
      fail(f"{workdir} holds a run of another model ({differences}); use a new --workdir")


def make_optimizer(config, params):
  import jax
  import optax
  schedule = optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=config.lr, warmup_steps=max(config.warmup_steps, 1),
      decay_steps=max(config.steps, config.warmup_steps + 1), end_value=config.lr * config.min_lr_ratio)
  decay_mask = jax.tree.map(lambda p: p.ndim >= 2, params)  # no decay on norms and biases
  tx = optax.chain(optax.clip_by_global_norm(config.grad_clip),
                   optax.adamw(schedule, b1=config.b1, b2=config.b2,
                               weight_decay=config.weight_decay, mask=decay_mask))
  return tx, schedule


# --------------------------------------------------------------------------- the step

def make_steps(model_graphdef, tx, grad_accum, state_shardings):
  """The jit-compiled train and eval steps on pure (params, opt_state) pytrees.

  state_shardings: the (params, opt_state) shardings the train step returns, so every
  step sees the same input layout and compiles once.
  """
  import jax
  import jax.numpy as jnp
  import optax
  from flax import nnx

  def loss_fn(params, batch):
    model = nnx.merge(model_graphdef, params)
    logits = model(batch["inputs"], batch["positions"], batch["segment_ids"])
    # -log softmax(logits)[target] = logsumexp(logits) - logits[target]: no [B, L, V]
    # log-probability array is formed, which saves a pass over the logits.
    target_logits = jnp.take_along_axis(logits, batch["targets"][..., None], -1)[..., 0]
    token_loss = jax.nn.logsumexp(logits, axis=-1) - target_logits
    real = (batch["segment_ids"] > 0).astype(jnp.float32)
    return (token_loss * real).sum(), real.sum()

  def train_step(params, opt_state, batch):
    def micro(carry, micro_batch):
      grads, loss_sum, tokens = carry
      (loss, count), grad = jax.value_and_grad(loss_fn, has_aux=True)(params, micro_batch)
      return (jax.tree.map(jnp.add, grads, grad), loss_sum + loss, tokens + count), None

    # [B, L] -> [grad_accum, B / grad_accum, L], micro-batch m = rows m, m + grad_accum, ...
    # so every data shard gives each micro-batch its share of rows; gradients summed.
    split = jax.tree.map(lambda x: x.reshape(-1, grad_accum, *x.shape[1:]).swapaxes(0, 1), batch)
    zeros = jax.tree.map(jnp.zeros_like, params)
    (grads, loss_sum, tokens), _ = jax.lax.scan(micro, (zeros, 0.0, 0.0), split)
    tokens = jnp.maximum(tokens, 1.0)
    grads = jax.tree.map(lambda g: g / tokens, grads)
    loss = loss_sum / tokens
    grad_norm = optax.tree.norm(grads)
    updates, new_opt_state = tx.update(grads, opt_state, params)
    new_params = optax.apply_updates(params, updates)
    # A step is applied only when its loss, gradients and resulting parameters are all
    # finite (a huge learning rate can overflow the update of finite gradients).
    params_finite = jnp.all(jnp.stack([jnp.isfinite(p).all() for p in jax.tree.leaves(new_params)]))
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & params_finite
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    return (keep(new_params, params), keep(new_opt_state, opt_state),
            {"loss": loss, "grad_norm": grad_norm, "finite": finite, "tokens": tokens})

  def eval_step(params, batch):
    loss_sum, tokens = loss_fn(params, batch)
    return loss_sum, tokens

  return (jax.jit(train_step, donate_argnums=(0, 1), out_shardings=(*state_shardings, None)),
          jax.jit(eval_step))


# --------------------------------------------------------------------------- main

def train(config, workdir: str, named: set[str]) -> bool:
  """One training run in `workdir` (resumed if it has checkpoints). `named`: the config
  fields the command line set. Returns True when a signal stopped it early."""
  import jax
  import numpy as np
  from flax import nnx
  from tqdm import tqdm

  from data import pipeline, tokenizer as tokenizer_lib
  from model import checkpoint as ckpt_lib, transformer
  from configs import inherit
  from model.config import AttentionConfig, ConfigError, ModelConfig
  from parallel import layout, mesh as mesh_lib, sharding

  logging.getLogger("absl").setLevel(logging.WARNING)
  lead = jax.process_index() == 0
  try:
    model_dict, data_files, init_dir = config.model.to_dict(), config.data.files, None
    if config.init_from:
      init_dir, init_meta = ckpt_lib.load_meta(config.init_from)
      model_dict, data_files = inherit.extension_settings(config, init_meta["config"], named)
    model_config = ModelConfig.from_dict(model_dict)
    attention = AttentionConfig(**config.attention.to_dict())
    mesh = mesh_lib.make_mesh(config.mesh.to_dict())
    mesh_lib.validate(model_config, mesh, seq_len=config.data.seq_len,
                      batch_size=config.data.batch_size)
    data_shards = mesh.shape["data"] * mesh.shape["fsdp"]
    if config.data.batch_size % (config.train.grad_accum * data_shards):
      raise ConfigError(f"data.batch_size={config.data.batch_size} must be a multiple of "
                        f"train.grad_accum={config.train.grad_accum} x mesh.data*mesh.fsdp="
                        f"{data_shards} (every micro-batch is split over the data shards)")
    pipeline.check_packing(config.data.packing)
    if not 0 <= config.data.passkey_fraction < 1:
      raise ConfigError(f"data.passkey_fraction={config.data.passkey_fraction} must be in "
                        "[0, 1): the share of the training documents that are passkey documents")
    files = pipeline.corpus_files([p for p in data_files.split(",") if p.strip()])
    documents = pipeline.load_documents(files)
  except FileNotFoundError as error:
    fail(f"init_from: {error}" if config.init_from and init_dir is None else str(error))
  except (ConfigError, ValueError) as error:
    fail(str(error))
  check_workdir(workdir, model_config.to_dict())
  os.makedirs(workdir, exist_ok=True)

  # Tokenizer: process 0 trains (or finds) it; the others wait and load it.
  # Extending a model: its own tokenizer, copied into this run's assets.
  assets = os.path.join(workdir, "assets")
  if init_dir:
    load_tokenizer = lambda: tokenizer_lib.load(
        assets, (init_meta["config"].get("hf") or {}).get("eos_token_id"))
    if lead:
      copy_assets(os.path.join(ckpt_lib.run_dir(init_dir), "assets"), assets)
  else:
    load_tokenizer = lambda: tokenizer_lib.load_or_train(
        assets, files, lambda: documents, model_config.vocab_size)
  try:
    tokenizer = load_tokenizer() if lead else None
  except ValueError as error:  # e.g. a vocabulary larger than the corpus allows
    fail(str(error))
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices("tokenizer")
  if tokenizer is None:  # the other processes load what process 0 stored
    tokenizer = load_tokenizer()
  # A host reads the rows of the global batch its devices hold (parallel/sharding.py).
  global_shape = (config.data.batch_size, config.data.seq_len)
  batch_sharding = sharding.named_sharding(mesh, ("batch", "sequence"))
  first_row, rows = sharding.host_rows(batch_sharding, global_shape)
  train_docs, validation_docs = pipeline.split(documents)
  if config.data.passkey_fraction > 0:  # synthetic passkey documents teach retrieval
    from data import passkey
    per_filler = len(tokenizer.encode(passkey.FILLER))
    share = config.data.passkey_fraction  # of the training documents, after adding them
    train_docs = train_docs + passkey.training_documents(
        round(share / (1 - share) * len(train_docs)),
        max_fillers=max(1, (config.data.seq_len - 100) // per_filler), seed=config.seed)
  data_options = dict(seq_len=config.data.seq_len, batch_size=config.data.batch_size,
                      first_row=first_row, rows=rows, packing=config.data.packing)
  try:
    train_iter = pipeline.Batches(train_docs, tokenizer, seed=config.seed, **data_options)
  except ValueError as error:
    fail(str(error))

  # Model and optimizer state, created sharded.
  model = transformer.create(model_config, mesh, config.seed, attention)
  graphdef, params = nnx.split(model)
  params = nnx.to_pure_dict(params)
  tx, schedule = make_optimizer(config.train, params)
  opt_state = jax.jit(tx.init)(params)
  replicated = jax.NamedSharding(mesh, jax.P())  # scalars (step counts) live on every device
  opt_state = jax.device_put(opt_state, jax.tree.map(
      lambda x: x.sharding if isinstance(x.sharding, jax.NamedSharding) else replicated,
      opt_state))
  abstract = lambda tree: jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)

  checkpointer = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"),
                                       keep=config.checkpoint.keep)
  start_step = 0
  restored = checkpointer.restore_latest(abstract(params), abstract(opt_state), train_iter)
  if restored:
    start_step, params, opt_state, _ = restored
    if lead:
      print(f"resumed from step {start_step}", flush=True)
  elif config.init_from:
    try:
      params, meta = ckpt_lib.load_params(init_dir, abstract(params))
    except (FileNotFoundError, ValueError) as error:
      fail(f"init_from: {error}")
    if lead:
      print(f"initialised parameters from {config.init_from} (step {meta['step']})", flush=True)
  resolved = dict(config.to_dict(), model=model_config.to_dict(),  # head_dim etc. filled in
                  data=dict(config.data.to_dict(), files=data_files))
  if init_dir and init_meta["config"].get("hf"):
    resolved["hf"] = init_meta["config"]["hf"]
  if lead:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      json.dump(resolved, f, indent=2, default=str)

  state_shardings = jax.tree.map(lambda x: x.sharding, (params, opt_state))
  train_step, eval_step = make_steps(graphdef, tx, config.train.grad_accum, state_shardings)
  ring = mesh.shape["sequence"]

  def to_device(batch):
    """This host's rows (natural order) -> global [B, L] arrays in zigzag order."""
    def build(rows):
      rows = layout.to_zigzag(rows, ring)
      def shard(index):  # index: global slices; this host holds rows from first_row
        start, stop = index[0].indices(global_shape[0])[:2]
        return rows[start - first_row:stop - first_row, index[1]]
      return jax.make_array_from_callback(global_shape, batch_sharding, shard)
    return {key: build(value) for key, value in batch.items()}

  def evaluate(params):
    options = dict(data_options, batch_size=min(config.data.batch_size, len(validation_docs)))
    iterator = pipeline.Batches(validation_docs, tokenizer, seed=0, repeat=False, **options)
    loss_sum = tokens = 0.0
    for _, batch in zip(range(config.log.eval_batches), iterator):
      batch_loss, batch_tokens = eval_step(params, to_device(batch))
      loss_sum, tokens = loss_sum + float(batch_loss), tokens + float(batch_tokens)
    return loss_sum / tokens if tokens else None

  stop = {"signal": None}
  signal.signal(signal.SIGTERM, lambda signum, frame: stop.update(signal=signum))
  peak = peak_flops_per_device(jax, model_config.dtype)
  flops_per_token = model_config.flops_per_token(config.data.seq_len)
  metrics_file = open(os.path.join(workdir, "metrics.jsonl"), "a") if lead else None
  tensorboard = None
  if lead and config.log.tensorboard:
    try:
      from tensorboardX import SummaryWriter
    except ImportError:
      fail("log.tensorboard=True needs tensorboardX: pip install -e '.[tensorboard]'")
    tensorboard = SummaryWriter(os.path.join(workdir, "tensorboard"))
  meta = {"config": resolved}

  saved = {"step": start_step if restored else None}

  def save(step):
    if saved["step"] != step:
      checkpointer.save(step, params, opt_state, train_iter,
                        json.loads(json.dumps(meta, default=str)))
      saved["step"] = step

  bad_steps, skipped_total, step = 0, 0, start_step
  progress = tqdm(total=config.train.steps, initial=start_step, disable=not lead, desc="train",
                  dynamic_ncols=True)
  last_time, last_step = time.perf_counter(), start_step
  try:
    while step < config.train.steps and stop["signal"] is None:
      batch = to_device(next(train_iter))
      params, opt_state, stats = train_step(params, opt_state, batch)
      step += 1
      finite = bool(stats["finite"])
      bad_steps = 0 if finite else bad_steps + 1
      skipped_total += not finite
      progress.update(1)
      progress.set_postfix(loss=f"{float(stats['loss']):.3f}")
      first = step == start_step + 1  # its time includes compilation
      if first or step % config.log.every == 0 or step == config.train.steps:
        jax.block_until_ready(params)
        now = time.perf_counter()
        step_time = (now - last_time) / (step - last_step)
        last_time, last_step = now, step
        tokens = config.data.batch_size * config.data.seq_len
        record = {"step": step, "loss": float(stats["loss"]),
                  "learning_rate": float(schedule(step - 1)),
                  "grad_norm": float(stats["grad_norm"]), "skipped_steps": skipped_total,
                  "includes_compile": first,
                  "tokens_per_sec": tokens / step_time, "step_time_s": step_time,
                  "tflops_per_device": flops_per_token * tokens / step_time / jax.device_count()
                  / 1e12}
        record["mfu"] = record["tflops_per_device"] * 1e12 / peak
        if step % config.log.eval_every == 0 or step == config.train.steps:
          eval_loss = evaluate(params)
          if eval_loss is not None:
            record.update(eval_loss=eval_loss, eval_ppl=float(np.exp(eval_loss)))
        if metrics_file:
          finite_only = {k: v if not isinstance(v, float) or np.isfinite(v) else None
                         for k, v in record.items()}  # strict JSON: NaN/inf as null
          metrics_file.write(json.dumps(finite_only) + "\n")
          metrics_file.flush()
        if tensorboard:
          for name, value in record.items():
            if name != "step":
              tensorboard.add_scalar(name, float(value), step)
          tensorboard.flush()
        last_time = time.perf_counter()  # evaluation and logging are not step time
      if bad_steps >= config.train.max_bad_steps:
        fail(f"{bad_steps} steps in a row had a non-finite loss, gradient or update (last: step "
             f"{step});"
             " lower train.lr or check the data. No checkpoint of this state was written.")
      if step % config.checkpoint.every == 0 and finite:
        save(step)
    save(step)
    if stop["signal"] is not None and lead:
      print(f"stopped by signal {stop['signal']} at step {step}; checkpoint saved, re-run to "
            "resume", flush=True)
    return stop["signal"] is not None
  finally:
    progress.close()
    checkpointer.close()
    if metrics_file:
      metrics_file.close()
    if tensorboard:
      tensorboard.close()


def main(argv):
  config, workdir = FLAGS.config, FLAGS.workdir
  try:
    config.keys()
  except (OSError, AttributeError, ValueError) as error:
    fail(f"--config: {error}")
  start_jax()
  from configs import inherit
  named = inherit.named_fields(sys.argv)  # (absl has consumed them from argv)
  if not config.get("stages"):
    train(config, workdir, named)
    return
  # A progressive schedule: stage i trains in <workdir>/stage-i from stage i-1's result.
  for index, overrides in enumerate(config.stages):
    stage_dir = os.path.join(workdir, f"stage-{index}")
    stage = stage_config(config, overrides, init_from=(
        os.path.join(workdir, f"stage-{index - 1}") if index else config.init_from))
    if newest_step(stage_dir) >= stage.train.steps:
      print(f"stage {index}: done ({stage_dir})", flush=True)
      continue
    print(f"stage {index}: {', '.join(f'{k}={v}' for k, v in overrides.items())}", flush=True)
    if train(stage, stage_dir, named | set(overrides)):
      return  # stopped by a signal: re-running continues this stage


def copy_assets(source: str, target: str):
  """The tokenizer files of the run or converted model being extended."""
  import shutil
  os.makedirs(target, exist_ok=True)
  for name in sorted(os.listdir(source)) if os.path.isdir(source) else ():
    if not os.path.exists(os.path.join(target, name)):
      shutil.copy2(os.path.join(source, name), target)


def stage_config(config, overrides: dict, init_from: str):
  """The config of one stage of a progressive schedule: `overrides` maps dotted fields
  ("data.seq_len", "model.rope.theta", "train.steps", ...) to this stage's values."""
  import ml_collections
  stage = ml_collections.ConfigDict(config.to_dict())
  stage.stages = ()
  stage.init_from = init_from
  for field, value in overrides.items():
    *parents, last = field.split(".")
    node = stage
    try:
      for key in parents:
        node = node[key]
      if last not in node:
        raise KeyError(field)
      node[last] = type(node[last])(value) if isinstance(node[last], (int, float)) else value
    except (KeyError, TypeError, ValueError):
      fail(f"stages: {field}={value!r} is not a config field (or not of its type)")
  return stage


def newest_step(workdir: str) -> int:
  """The newest checkpoint step in a run directory, -1 when it has none."""
  directory = os.path.join(workdir, "checkpoints")
  steps = [int(name) for name in os.listdir(directory) if name.isdigit()] \
      if os.path.isdir(directory) else []
  return max(steps, default=-1)


if __name__ == "__main__":
  define_flags()
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main, flags_parser=parse_flags)
