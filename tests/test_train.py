"""train.py end to end, as a user runs it: subprocesses on 8 virtual CPU devices."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A small, fast run of the tiny model: ring of 4 devices x data 2, 128-token rows.
FAST = ["--config=configs/tiny.py", "--config.model.vocab_size=1024", "--config.model.n_layers=2",
        "--config.data.seq_len=128", "--config.data.batch_size=4", "--config.log.every=1",
        "--config.log.eval_every=1000", "--config.log.eval_batches=1"]


def run_train(workdir, *extra, check=True, **kwargs):
  env = dict(os.environ, XLA_FLAGS="", PYTHONPATH=ROOT)
  result = subprocess.run([sys.executable, "train.py", f"--workdir={workdir}", *FAST, *extra],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
                          **kwargs)
  if check and result.returncode != 0:
    raise AssertionError(f"train.py failed ({result.returncode}):\n{result.stderr[-3000:]}")
  return result


def wait_for_logged_steps(process, workdir, count, timeout=300):
  """Until `workdir`'s metrics.jsonl has `count` lines (the run is past its start-up and
  its SIGTERM handler is installed), or the process ended."""
  metrics = os.path.join(workdir, "metrics.jsonl")
  deadline = time.time() + timeout
  while time.time() < deadline and process.poll() is None:
    if os.path.exists(metrics) and len(open(metrics).readlines()) >= count:
      return
    time.sleep(0.1)


def losses(workdir):
  """{step: loss} from metrics.jsonl; a step logged twice (before and after a resume)
  keeps its last value."""
  from training import metrics
  return {record["step"]: record["loss"]
          for record in metrics.read(os.path.join(workdir, "metrics.jsonl"))}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("uninterrupted"))
  run_train(workdir, "--config.train.steps=12", "--config.checkpoint.every=4",
            "--config.train.warmup_steps=2")
  return workdir, losses(workdir)


def test_loss_falls_on_the_real_corpus(tmp_path):
  run_train(str(tmp_path), "--config.train.steps=60", "--config.train.lr=3e-3",
            "--config.log.eval_every=60", "--config.log.tensorboard=True",
            "--config.train.grad_accum=2")
  logged = losses(str(tmp_path))
  first = sum(logged[s] for s in range(2, 6)) / 4
  last = sum(logged[s] for s in range(56, 61)) / 5
  assert last < first - 1.5, (first, last)
  with open(os.path.join(tmp_path, "metrics.jsonl")) as f:
    record = [json.loads(line) for line in f][-1]
  for key in ("step", "loss", "learning_rate", "grad_norm", "tokens_per_sec", "step_time_s",
              "tflops_per_device", "mfu", "eval_loss", "eval_ppl"):
    assert key in record
  assert 0 < record["mfu"] < 1
  events = os.listdir(os.path.join(tmp_path, "tensorboard"))
  assert any(name.startswith("events.out.tfevents") for name in events)


@pytest.mark.slow  # make fault-check (~50 s)
def test_resume_after_kill_gives_identical_losses(uninterrupted, tmp_path):
  workdir = str(tmp_path)
  args = [sys.executable, "train.py", f"--workdir={workdir}", *FAST, "--config.train.steps=12",
          "--config.checkpoint.every=4", "--config.train.warmup_steps=2"]
  process = subprocess.Popen(args, cwd=ROOT, env=dict(os.environ, XLA_FLAGS="", PYTHONPATH=ROOT),
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  checkpoint = os.path.join(workdir, "checkpoints", "8")
  deadline = time.time() + 300
  while not os.path.isdir(checkpoint) and time.time() < deadline and process.poll() is None:
    time.sleep(0.2)
  process.send_signal(signal.SIGKILL)
  process.wait()
  assert os.path.isdir(checkpoint), "the run ended before its step-8 checkpoint"
  result = run_train(workdir, "--config.train.steps=12", "--config.checkpoint.every=4",
                     "--config.train.warmup_steps=2")
  assert "resumed from step" in result.stdout
  expected = uninterrupted[1]
  resumed = losses(workdir)
  assert [resumed[s] for s in range(9, 13)] == [expected[s] for s in range(9, 13)]


@pytest.mark.slow
def test_sigterm_saves_and_the_rerun_finishes(uninterrupted, tmp_path):
  workdir = str(tmp_path)
  args = [sys.executable, "train.py", f"--workdir={workdir}", *FAST, "--config.train.steps=12",
          "--config.checkpoint.every=100", "--config.train.warmup_steps=2"]
  process = subprocess.Popen(args, cwd=ROOT, env=dict(os.environ, XLA_FLAGS="", PYTHONPATH=ROOT),
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
  wait_for_logged_steps(process, workdir, 3)
  process.send_signal(signal.SIGTERM)
  out, _ = process.communicate(timeout=120)
  assert process.returncode == 0 and "stopped by signal" in out
  saved = [int(name) for name in os.listdir(os.path.join(workdir, "checkpoints")) if name.isdigit()]
  assert saved and max(saved) < 12
  run_train(workdir, "--config.train.steps=12", "--config.checkpoint.every=100",
            "--config.train.warmup_steps=2")
  assert [losses(workdir)[s] for s in range(10, 13)] == \
      [uninterrupted[1][s] for s in range(10, 13)]


@pytest.mark.parametrize("extra, message", [
    (["--config.mesh.sequence=3"], "mesh.sequence=3 does not divide the 8 devices"),
    (["--config.data.seq_len=100"], "data.seq_len=100 must be a multiple of 2*mesh.sequence=8"),
    (["--config.data.files=/nonexistent/*.txt"], "data.files: nothing matches /nonexistent/*.txt"),
    (["--config.model.typo=3"], "typo"),
    (["--config.data.batch_size=1"], "global batch 1 < data*fsdp = 2"),
    (["--config.model.rope.scaling.type=stretchy"],
     "model.rope.scaling.type='stretchy' does not exist; use one of none, linear, ntk"),
    (["--config.model.rope.scaling.type=linear", "--config.model.rope.scaling.factor=-2"],
     "model.rope.scaling.factor=-2.0 must be > 0"),
    (["--config.init_from=/nonexistent/run"], "init_from: no checkpoint in /nonexistent/run"),
    (["--config.data.packing=best"], "data.packing='best': use one of concat, first_fit"),
])
def test_bad_config_is_one_clear_message(tmp_path, extra, message):
  result = run_train(str(tmp_path), *extra, check=False)
  assert result.returncode == 2, result.stderr[-2000:]
  assert message in result.stderr
  assert "Traceback" not in result.stderr


def test_empty_corpus_and_other_model_workdir(tmp_path):
  (tmp_path / "empty.txt").write_text("  \n")
  result = run_train(str(tmp_path / "run"), f"--config.data.files={tmp_path}/empty.txt",
                     check=False)
  assert result.returncode == 2 and "hold no text" in result.stderr
  (tmp_path / "small.txt").write_text("a small corpus: too few pieces for 1024\n" * 50)
  result = run_train(str(tmp_path / "small"), f"--config.data.files={tmp_path}/small.txt",
                     check=False)
  assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
  assert "model.vocab_size=1024 is more than a tokenizer trained on this corpus" in result.stderr
  os.makedirs(tmp_path / "other")
  (tmp_path / "other" / "config.json").write_text(json.dumps({"model": {"dim": 512}}))
  result = run_train(str(tmp_path / "other"), check=False)
  assert result.returncode == 2 and "holds a run of another model" in result.stderr


def test_a_non_finite_step_is_not_applied(single_device_mesh):
  """A batch whose loss is NaN (an out-of-vocabulary target) changes neither the
  parameters nor the optimizer state; the next good batch trains as usual."""
  import jax
  import jax.numpy as jnp
  import numpy as np

  from configs import base
  from model.config import ModelConfig
  from parallel import sharding
  from training import state as state_lib, steps as steps_lib

  config = ModelConfig(vocab_size=64, dim=32, n_layers=1, n_heads=2, n_kv_heads=1, mlp_dim=64)
  state = state_lib.init_state(config, base.get_config().train, single_device_mesh, seed=0)
  params, opt_state = state.params, state.opt_state
  train_step, _ = steps_lib.make_steps(state.graphdef, state.tx, 1, state.shardings)
  counters = steps_lib.new_counters(single_device_mesh)
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, 64, (2, 16)).astype(np.int32)
  batch = {"inputs": tokens, "targets": np.roll(tokens, -1, 1),
           "positions": np.tile(np.arange(16, dtype=np.int32), (2, 1)),
           "segment_ids": np.ones((2, 16), np.int32)}
  bad = dict(batch, targets=batch["targets"].copy())
  bad["targets"][0, 3] = 64  # outside the vocabulary: the loss is NaN
  put = lambda rows: sharding.put_batch(rows, single_device_mesh)
  before = jax.tree.map(np.asarray, (params, opt_state))
  for bad_in_row in (1, 2):
    params, opt_state, counters, stats = train_step(params, opt_state, counters, put(bad))
    assert not bool(stats["finite"]) and not np.isfinite(float(stats["loss"]))
    assert int(counters["bad_in_row"]) == bad_in_row == int(counters["skipped"])
  for old, new in zip(jax.tree.leaves(before), jax.tree.leaves((params, opt_state))):
    np.testing.assert_array_equal(old, np.asarray(new))
  for _ in range(2):  # (the first update has learning rate 0: warmup starts at 0)
    params, opt_state, counters, stats = train_step(params, opt_state, counters, put(batch))
    assert bool(stats["finite"])
  assert int(counters["bad_in_row"]) == 0 and int(counters["skipped"]) == 2
  assert not np.array_equal(before[0]["lm_head"], np.asarray(params["lm_head"]))
  assert all(bool(jnp.isfinite(x).all()) for x in jax.tree.leaves(params))


def test_diverging_run_stops_after_max_bad_steps(tmp_path):
  """A learning rate of 1e30 blows the parameters up after the warmup step: the
  following steps are non-finite, skipped and counted; after train.max_bad_steps in a
  row the run stops with one message, and no checkpoint after the last good step."""
  workdir = str(tmp_path / "run")
  result = run_train(workdir, "--config.train.lr=1e30", "--config.train.warmup_steps=1",
                     "--config.train.steps=20", "--config.checkpoint.every=1",
                     "--config.train.max_bad_steps=3", check=False)
  assert result.returncode == 2, result.stderr[-2000:]
  assert "3 steps in a row had a non-finite loss, gradient or update" in result.stderr
  assert "Traceback" not in result.stderr
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f]
  skipped = [r["skipped_steps"] for r in records]
  assert skipped[-1] == 3 and skipped == sorted(skipped)
  last_step = records[-1]["step"]
  good_steps = last_step - 3
  saved = sorted(int(name) for name in os.listdir(os.path.join(workdir, "checkpoints"))
                 if name.isdigit())
  assert saved and max(saved) <= good_steps, (saved, last_step)


def _random_batch(mesh, seed):
  """Two rows of 64 random tokens (vocabulary 64) on `mesh`, as train.py feeds a step."""
  import numpy as np

  from parallel import sharding
  tokens = np.random.default_rng(seed).integers(0, 64, (2, 64)).astype(np.int32)
  return sharding.put_batch({"inputs": tokens, "targets": np.roll(tokens, -1, 1),
                             "positions": np.tile(np.arange(64, dtype=np.int32), (2, 1)),
                             "segment_ids": np.ones((2, 64), np.int32)}, mesh)


def test_the_state_split_over_the_ring_trains_as_the_replicated_one():
  """train.shard_state_over_sequence: on fsdp 2 x ring 4 every parameter and AdamW moment
  is split 8 ways (2 without it), and three steps give the same losses and parameters
  as the state replicated along the ring (fp32, within summation order)."""
  import jax
  import numpy as np

  from configs import base
  from model.config import ModelConfig
  from parallel import mesh as mesh_lib
  from training import state as state_lib, steps as steps_lib

  config = ModelConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, mlp_dim=64)
  mesh = mesh_lib.make_mesh({"fsdp": 2, "sequence": 4})
  batch = _random_batch(mesh, seed=7)
  runs = {}
  for over_ring in (False, True):
    train = base.get_config().train
    train.shard_state_over_sequence, train.warmup_steps = over_ring, 1
    state = state_lib.init_state(config, train, mesh, seed=0)
    wq = [leaf for path, leaf in jax.tree_util.tree_leaves_with_path((state.params,
                                                                      state.opt_state))
          if jax.tree_util.keystr(path).endswith("[0]['attn']['wq']")]
    assert len(wq) == 3  # the parameter and AdamW's two moments
    for array in wq:  # [M, H, D]: M split over fsdp (x sequence)
      assert array.sharding.shard_shape(array.shape)[0] == 32 // (8 if over_ring else 2)
    train_step, _ = steps_lib.make_steps(state.graphdef, state.tx, 1, state.shardings)
    params, opt_state, counters = state.params, state.opt_state, steps_lib.new_counters(mesh)
    losses = []
    for _ in range(3):
      params, opt_state, counters, stats = train_step(params, opt_state, counters, batch)
      losses.append(float(stats["loss"]))
    runs[over_ring] = losses, jax.tree.map(np.asarray, params)
  np.testing.assert_allclose(runs[True][0], runs[False][0], rtol=1e-5)
  for split, replicated in zip(jax.tree.leaves(runs[True][1]), jax.tree.leaves(runs[False][1])):
    np.testing.assert_allclose(split, replicated, rtol=1e-4, atol=1e-6)


def test_weights_gathered_in_the_compute_dtype_train_alike():
  """model.gather_in_compute_dtype (set by the real-size configs when the state is split
  over the ring): bf16 compute on fp32 master weights, fsdp 2 x ring 4, the state split
  over both: three steps give the losses of gathering the weights in float32 within
  bf16's rounding. (That the gathers are bf16 is checked in the TPU program,
  tests/test_tpu.py: XLA:CPU widens bf16 collectives to float32.)"""
  import numpy as np

  from configs import base
  from model.config import ModelConfig
  from parallel import mesh as mesh_lib
  from training import state as state_lib, steps as steps_lib

  mesh = mesh_lib.make_mesh({"fsdp": 2, "sequence": 4})
  batch = _random_batch(mesh, seed=11)
  losses = {}
  for in_bf16 in (False, True):
    config = ModelConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2,
                         mlp_dim=64, dtype="bfloat16", param_dtype="float32",
                         gather_in_compute_dtype=in_bf16)
    train = base.get_config().train
    train.shard_state_over_sequence, train.warmup_steps = True, 1
    state = state_lib.init_state(config, train, mesh, seed=0)
    train_step, _ = steps_lib.make_steps(state.graphdef, state.tx, 1, state.shardings)
    params, opt_state, counters = state.params, state.opt_state, steps_lib.new_counters(mesh)
    losses[in_bf16] = []
    for _ in range(3):
      params, opt_state, counters, stats = train_step(params, opt_state, counters, batch)
      losses[in_bf16].append(float(stats["loss"]))
  assert losses[True][2] < losses[True][0]  # it trains
  np.testing.assert_allclose(losses[True], losses[False], rtol=2e-2)
