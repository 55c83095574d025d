"""Train a ringlm model.

  python train.py --config=configs/tiny.py --workdir=DIR [--config.FIELD=VALUE ...]

Re-running the same command resumes from the newest good checkpoint in DIR; the
resumed run's losses equal an uninterrupted run's. Multi-host: run the same command
on every host (TPU pods and SLURM are detected; elsewhere pass --coordinator_address,
--num_processes and --process_id). On CPU, --cpu_devices sets the virtual device count.

The loop: data (data/) -> onto the mesh in zigzag order (parallel/sharding.put_batch,
prepared while the step before runs: training/prefetch.py) -> the jit-compiled step
(training/: loss, gradients, AdamW, device-side counters) -> metrics
(<workdir>/metrics.jsonl, read from the device only on logging steps) and checkpoints
(<workdir>/checkpoints, model/checkpoint.py). The last stdout lines say where the
checkpoint is and what to run next.
"""

import contextlib
import errno
import json
import os
import signal
import sys
import time

from absl import app, flags
from ml_collections import config_flags

import cli

FLAGS = flags.FLAGS


def define_flags():
  """The command line's flags, defined only when run as a program: the tools' flags share
  names (--config, --checkpoint, --cpu_devices), so importing two of them must not define any."""
  config_flags.DEFINE_config_file("config", None, "ringlm config file.", lock_config=True)
  flags.DEFINE_string("workdir", None, "Run directory: checkpoints, metrics, assets.")
  cli.define_flags(multihost=True)


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
      cli.fail(f"{workdir} holds a run of another model ({differences}); use a new --workdir")


# --------------------------------------------------------------------------- main

def train(config, workdir: str, named: set[str]) -> dict:
  """One training run in `workdir` (resumed if it has checkpoints). `named`: the config
  fields the command line set. Returns what the run did: {"step", "stopped_by_signal",
  "loss", "eval_loss", "eval_ppl", "checkpoint"}."""
  import jax
  import numpy as np
  from tqdm import tqdm

  from core.errors import ConfigError
  from data import pipeline, tokenizer as tokenizer_lib
  from model import checkpoint as ckpt_lib, inherit
  from model.config import AttentionConfig, ModelConfig
  from parallel import layout, mesh as mesh_lib, sharding
  from training import metrics, peak, prefetch, state as state_lib, steps as steps_lib

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
                      batch_size=config.data.batch_size,
                      state_over_sequence=config.train.shard_state_over_sequence)
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
    skipped_lines = []
    documents = pipeline.load_documents(files, config.data.bad_lines, skipped_lines)
  except FileNotFoundError as error:
    cli.fail(f"init_from: {error}" if config.init_from and init_dir is None else str(error))
  except (ConfigError, ValueError) as error:
    cli.fail(str(error))
  check_workdir(workdir, model_config.to_dict())
  os.makedirs(workdir, exist_ok=True)
  if skipped_lines and lead:
    shown = "; ".join(skipped_lines[:3]) + ("; ..." if len(skipped_lines) > 3 else "")
    print(f"warning: skipped {len(skipped_lines)} bad corpus line(s) (data.bad_lines=skip): "
          f"{shown}", file=sys.stderr, flush=True)

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
        assets, files, lambda: documents, model_config.vocab_size, verbose=cli.verbose())
  try:
    tokenizer = load_tokenizer() if lead else None
  except ValueError as error:  # e.g. a vocabulary larger than the corpus allows
    cli.fail(str(error))
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices("tokenizer")
  if tokenizer is None:  # the other processes load what process 0 stored
    tokenizer = load_tokenizer()
  # A host reads the rows of the global batch its devices hold (parallel/sharding.py).
  batch_size = config.data.batch_size
  first_row, rows = sharding.host_rows(sharding.named_sharding(mesh, ("batch", "sequence")),
                                       (batch_size, config.data.seq_len))
  order = layout.order_for(model_config)  # zigzag, or natural for a windowed model
  put = lambda batch: sharding.put_batch(batch, mesh, batch_size, first_row, order)
  train_docs, validation_docs = pipeline.split(documents)
  if config.data.passkey_fraction > 0:  # synthetic passkey documents teach retrieval
    from data import passkey
    per_filler = len(tokenizer.encode(passkey.FILLER))
    share = config.data.passkey_fraction  # of the training documents, after adding them
    train_docs = train_docs + passkey.training_documents(
        round(share / (1 - share) * len(train_docs)),
        max_fillers=max(1, (config.data.seq_len - 100) // per_filler), seed=config.seed)
  data_options = dict(seq_len=config.data.seq_len, batch_size=batch_size,
                      first_row=first_row, rows=rows, packing=config.data.packing)
  try:
    train_iter = pipeline.Batches(train_docs, tokenizer, seed=config.seed, **data_options)
  except ValueError as error:
    cli.fail(str(error))

  # Model and optimizer state, created sharded; a checkpoint's, when there is one.
  state = state_lib.init_state(model_config, config.train, mesh, config.seed, attention)
  params, opt_state = state.params, state.opt_state
  checkpointer = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"),
                                       keep=config.checkpoint.keep)
  start_step = 0
  try:
    restored = checkpointer.restore_latest(*state.abstract(), train_iter)
  except ckpt_lib.DamagedCheckpoints as error:
    if not config.checkpoint.fresh_start_if_damaged:
      checkpointer.close()
      cli.fail(f"{error}. To train this run again from step 0, re-run with "
               "--config.checkpoint.fresh_start_if_damaged=True")
    print(f"warning: {error}; starting again from step 0 "
          "(checkpoint.fresh_start_if_damaged=True)", file=sys.stderr, flush=True)
    restored = None
    train_iter = pipeline.Batches(train_docs, tokenizer, seed=config.seed, **data_options)
  corpus = pipeline.fingerprint(files)
  if restored:
    start_step, params, opt_state, restored_meta = restored
    changes = pipeline.corpus_changes(restored_meta.get("corpus", corpus), corpus)
    if changes and not config.data.allow_corpus_change:
      checkpointer.close()
      shown = "; ".join(changes[:3]) + (f"; and {len(changes) - 3} more" if len(changes) > 3
                                         else "")
      cli.fail(f"the corpus changed since checkpoint {start_step} was saved ({shown}): the data "
               "iterator's position there would now mean other tokens. Restore the files, or "
               "re-run with --config.data.allow_corpus_change=True to resume on the new corpus")
    if changes and lead:
      print(f"warning: resuming on a changed corpus ({len(changes)} files differ; "
            "data.allow_corpus_change=True)", file=sys.stderr, flush=True)
    if lead:
      print(f"resumed from step {start_step}", flush=True)
  elif config.init_from:
    try:
      params, meta = ckpt_lib.load_params(init_dir, state.abstract()[0])
    except (FileNotFoundError, ValueError) as error:
      cli.fail(f"init_from: {error}")
    if lead:
      print(f"initialised parameters from {config.init_from} (step {meta['step']})", flush=True)
  resolved = dict(config.to_dict(), model=model_config.to_dict(),  # head_dim etc. filled in
                  data=dict(config.data.to_dict(), files=data_files))
  if init_dir and init_meta["config"].get("hf"):
    resolved["hf"] = init_meta["config"]["hf"]
  if lead:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      json.dump(resolved, f, indent=2, default=str)

  train_step, eval_step = steps_lib.make_steps(state.graphdef, state.tx,
                                               config.train.grad_accum, state.shardings)
  counters = steps_lib.new_counters(mesh)

  def evaluate(params):
    options = dict(data_options, batch_size=min(batch_size, len(validation_docs)))
    iterator = pipeline.Batches(validation_docs, tokenizer, seed=0, repeat=False, **options)
    loss_sum = tokens = 0.0
    for _, batch in zip(range(config.log.eval_batches), iterator):
      batch_loss, batch_tokens = eval_step(
          params, sharding.put_batch(batch, mesh, options["batch_size"], first_row, order))
      loss_sum, tokens = loss_sum + float(batch_loss), tokens + float(batch_tokens)
    return loss_sum / tokens if tokens else None

  stop = {"signal": None}
  signal.signal(signal.SIGTERM, lambda signum, frame: stop.update(signal=signum))
  peak_flops = peak.peak_flops_per_device(mesh, model_config.dtype)
  flops_per_token = model_config.flops_per_token(config.data.seq_len)
  metrics_file = metrics.open_for_append(os.path.join(workdir, "metrics.jsonl")) \
      if lead else None
  tensorboard = None
  if lead and config.log.tensorboard:
    try:
      from tensorboardX import SummaryWriter
    except ImportError:
      cli.fail("log.tensorboard=True needs tensorboardX: pip install -e '.[tensorboard]'")
    tensorboard = SummaryWriter(os.path.join(workdir, "tensorboard"))
  meta = {"config": resolved, "corpus": corpus}
  # The batch of the next step is read, laid out and put on the mesh while a step runs;
  # checkpoints save the iterator's state after the batches the steps consumed.
  batches = prefetch.Prefetch(train_iter, put)
  saved = {"step": start_step if restored else None}

  def save(step):
    if saved["step"] != step:
      checkpointer.save(step, params, opt_state, batches,
                        json.loads(json.dumps(meta, default=str)))
      saved["step"] = step

  def check_bad_steps(step, counters):
    """Stops the run once train.max_bad_steps steps in a row were not applied."""
    bad = int(counters["bad_in_row"])
    if bad >= config.train.max_bad_steps:
      cli.fail(f"{bad} steps in a row had a non-finite loss, gradient or update (last: step "
               f"{step}); lower train.lr or check the data. No checkpoint of this state was "
               "written.")

  step, last = start_step, {}
  progress = tqdm(total=config.train.steps, initial=start_step, disable=not lead, desc="train",
                  dynamic_ncols=True)
  last_time, last_step = time.perf_counter(), start_step
  previous = None  # (step, counters) of the step before, read once the next one is queued
  try:
    while step < config.train.steps and stop["signal"] is None:
      params, opt_state, counters, stats = train_step(params, opt_state, counters, next(batches))
      step += 1
      progress.update(1)
      # The host reads the step before's counters while this step runs: the device queue
      # never drains, and a run of non-finite steps still stops one step later at most.
      if previous is not None:
        check_bad_steps(*previous)
      previous = step, counters
      first = step == start_step + 1  # its time includes compilation
      if first or step % config.log.every == 0 or step == config.train.steps:
        jax.block_until_ready(params)
        now = time.perf_counter()
        step_time = (now - last_time) / (step - last_step)
        last_time, last_step = now, step
        tokens = batch_size * config.data.seq_len
        record = {"step": step, "loss": float(stats["loss"]),
                  "learning_rate": float(state.schedule(step - 1)),
                  "grad_norm": float(stats["grad_norm"]),
                  "skipped_steps": int(counters["skipped"]),
                  "skipped_corpus_lines": len(skipped_lines), "includes_compile": first,
                  "tokens_per_sec": tokens / step_time, "step_time_s": step_time,
                  "tflops_per_device": flops_per_token * tokens / step_time / mesh.devices.size
                  / 1e12}
        record["mfu"] = record["tflops_per_device"] * 1e12 / peak_flops
        progress.set_postfix(loss=f"{record['loss']:.3f}")
        if step % config.log.eval_every == 0 or step == config.train.steps:
          eval_loss = evaluate(params)
          if eval_loss is not None:
            record.update(eval_loss=eval_loss, eval_ppl=float(np.exp(eval_loss)))
        last = record
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
      if step % config.checkpoint.every == 0 and bool(stats["finite"]):
        save(step)
    if previous is not None:
      check_bad_steps(*previous)
    save(step)
    if stop["signal"] is not None and lead:
      print(f"stopped by signal {stop['signal']} at step {step}; checkpoint saved, re-run to "
            "resume", flush=True)
    return {"step": step, "stopped_by_signal": stop["signal"] is not None,
            "skipped_corpus_lines": len(skipped_lines),
            "loss": last.get("loss"), "eval_loss": last.get("eval_loss"),
            "eval_ppl": last.get("eval_ppl"),
            "checkpoint": os.path.join(checkpointer.directory, str(step))}
  finally:
    progress.close()
    batches.close()
    checkpointer.close()
    if metrics_file:
      metrics_file.close()
    if tensorboard:
      tensorboard.close()


def main(argv):
  del argv
  config, workdir = FLAGS.config, FLAGS.workdir
  try:
    config.keys()
  except (OSError, AttributeError, ValueError) as error:
    cli.fail(f"--config: {error}")
  named = cli.start()  # (absl has consumed the flags from argv; start reads sys.argv)
  from model.checkpoint import CheckpointWriteFailed
  with workdir_lock(workdir):
    try:
      if not config.get("stages"):
        report(train(config, workdir, named), workdir)
      else:
        train_stages(config, workdir, named)
    except CheckpointWriteFailed as error:
      cli.fail(f"{error}. {'Free some space' if error.no_space else 'Fix the storage'} and "
               "re-run the same command: it resumes from the newest complete checkpoint "
               "with the same losses.")
    except OSError as error:
      if error.errno != errno.ENOSPC:
        raise
      cli.fail(f"no space left on device writing {error.filename or 'the workdir'}; free some "
               "space and re-run the same command: it resumes from the newest complete "
               "checkpoint with the same losses.")


@contextlib.contextmanager
def workdir_lock(workdir: str):
  """One run per workdir (training/lock.py): a second one stops at once, naming the first."""
  import jax

  from training.lock import WorkdirBusy, WorkdirLock
  os.makedirs(workdir, exist_ok=True)
  lock = WorkdirLock(workdir, jax.process_index())
  try:
    dead_holder = lock.acquire()
  except WorkdirBusy as error:
    cli.fail(str(error))
  if dead_holder:
    print(f"note: took over the workdir lock of process {dead_holder.get('pid')} on "
          f"{dead_holder.get('host')}, which is gone", file=sys.stderr, flush=True)
  try:
    yield
  finally:
    lock.release()


def train_stages(config, workdir: str, named: set[str]):
  """A progressive schedule: stage i trains in <workdir>/stage-i from stage i-1's result;
  finished stages are skipped, so re-running continues where a run stopped."""
  result = None
  for index, overrides in enumerate(config.stages):
    stage_dir = os.path.join(workdir, f"stage-{index}")
    stage = stage_config(config, overrides, init_from=(
        os.path.join(workdir, f"stage-{index - 1}") if index else config.init_from))
    if newest_step(stage_dir) >= stage.train.steps:
      print(f"stage {index}: done ({stage_dir})", flush=True)
      continue
    print(f"stage {index}: {', '.join(f'{k}={v}' for k, v in overrides.items())}", flush=True)
    result = train(stage, stage_dir, named | set(overrides))
    if result["stopped_by_signal"]:
      return  # re-running continues this stage
  if result is not None:
    report(result, stage_dir)


def report(result: dict, workdir: str):
  """The run's last words on stdout (process 0): what ran, the figures, what is next."""
  import jax
  if jax.process_index() != 0 or result["stopped_by_signal"]:
    return
  figures = [f"loss {result['loss']:.3f}" if result["loss"] is not None else "",
             f"validation loss {result['eval_loss']:.3f} (perplexity {result['eval_ppl']:.1f})"
             if result["eval_loss"] is not None else ""]
  if result["skipped_corpus_lines"]:
    figures.append(f"{result['skipped_corpus_lines']} bad corpus lines skipped")
  cli.summary([
      f"trained to step {result['step']}: {', '.join(f for f in figures if f)}",
      f"checkpoint: {result['checkpoint']}",
      f"metrics: {os.path.join(workdir, 'metrics.jsonl')}",
      f"next: python -m tools.eval_ppl --checkpoint={workdir}   (perplexity at several lengths)",
      f"      python serve.py --checkpoint={workdir} --input=requests.jsonl "
      "--output=results.jsonl"])


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
      cli.fail(f"stages: {field}={value!r} is not a config field (or not of its type)")
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
  app.run(main, flags_parser=cli.parse_flags)
