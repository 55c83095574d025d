"""Faults a run meets on a pod, each followed by the same command, which must end with
exit 0 and the uninterrupted run's losses (or stop with one message naming what to do):
a damaged checkpoint (flipped bytes, a truncated array, missing metadata, an empty
directory, another model's) is set aside and the step saved again; every checkpoint
damaged; a second run on a workdir; a metrics line cut by a kill; a corpus changed
between runs; a bad corpus line; SIGTERM twice; kill -9 and SIGTERM in the middle of an
asynchronous save; a full disk. (kill -9 and SIGTERM between saves: tests/test_train.py;
a dead process of two, between and during saves: tests/test_multihost.py.)

`make fault-check` runs them all; the default test run leaves the slow ones out."""

import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from tests.test_train import FAST, ROOT, losses, run_train, wait_for_logged_steps

STEPS = ["--config.train.steps=8", "--config.checkpoint.every=4",
         "--config.train.warmup_steps=2"]


def start_train(workdir, *extra, **kwargs):
  return subprocess.Popen([sys.executable, "train.py", f"--workdir={workdir}", *FAST, *extra],
                          cwd=ROOT, env=dict(os.environ, XLA_FLAGS="", PYTHONPATH=ROOT),
                          **kwargs)


def wait_for_save_in_progress(processes, workdir, step, timeout=300):
  """Polls (every ~1 ms) until orbax's temporary directory of `step`'s save exists, i.e. the
  asynchronous save has started and not committed; asserts it was seen."""
  directory, partial = os.path.join(workdir, "checkpoints"), f"{step}.orbax-checkpoint-tmp"
  deadline = time.time() + timeout
  while time.time() < deadline and all(p.poll() is None for p in processes):
    if os.path.isdir(directory) and partial in os.listdir(directory):
      return
    time.sleep(0.001)
  raise AssertionError(f"never saw step {step}'s save in progress")


def flip_bytes(step_dir):
  """Flips 8 bytes in the middle of the step's first parameter data file."""
  files = sorted(f for f in glob.glob(os.path.join(step_dir, "params", "**", "*"), recursive=True)
                 if os.path.isfile(f) and os.path.getsize(f) > 256 and "/d/" in f)
  data = bytearray(open(files[0], "rb").read())
  for offset in range(len(data) // 2, len(data) // 2 + 8):
    data[offset] ^= 0x5A
  open(files[0], "wb").write(bytes(data))


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
  """A finished 8-step run (checkpoints at 4 and 8) and its losses."""
  workdir = str(tmp_path_factory.mktemp("finished"))
  run_train(workdir, *STEPS)
  return workdir, losses(workdir)


def copy_run(source, target):
  subprocess.run(["cp", "-a", f"{source}/.", str(target)], check=True)
  os.remove(os.path.join(target, "metrics.jsonl"))  # the re-run's own losses only
  return str(target)


def truncate_array(step_dir):
  files = sorted(f for f in glob.glob(os.path.join(step_dir, "params", "**", "*"), recursive=True)
                 if os.path.isfile(f) and os.path.getsize(f) > 256 and "/d/" in f)
  with open(files[0], "r+b") as f:
    f.truncate(os.path.getsize(files[0]) // 2)


def remove_meta(step_dir):
  shutil.rmtree(os.path.join(step_dir, "meta"))


def empty(step_dir):
  shutil.rmtree(step_dir)
  os.makedirs(step_dir)


def another_model(step_dir):
  """The step replaced by a (parameter-only) checkpoint of another model's shapes."""
  from model import checkpoint as ckpt_lib
  shutil.rmtree(step_dir)
  rng = np.random.default_rng(0)
  ckpt_lib.save_params(step_dir, {"embed": rng.standard_normal((64, 16)),
                                  "lm_head": rng.standard_normal((64, 16))}, {"step": 8})


DAMAGE = {"flipped bytes": flip_bytes, "truncated array": truncate_array,
          "missing metadata": remove_meta, "empty directory": empty,
          "another model": another_model}


@pytest.mark.parametrize("damage", [
    *(pytest.param(name, marks=pytest.mark.slow) for name in DAMAGE)])
def test_a_damaged_newest_checkpoint_is_set_aside_and_saved_again(finished, tmp_path, damage):
  workdir = copy_run(finished[0], tmp_path)
  DAMAGE[damage](os.path.join(workdir, "checkpoints", "8"))
  result = run_train(workdir, *STEPS)  # (exit 0, or run_train raises)
  assert "resumed from step 4" in result.stdout
  assert "moved it to" in result.stderr and "8.damaged" in result.stderr
  assert os.path.isdir(os.path.join(workdir, "checkpoints", "8.damaged"))  # kept to inspect
  assert os.path.isdir(os.path.join(workdir, "checkpoints", "8"))          # saved again
  assert [losses(workdir)[s] for s in range(5, 9)] == [finished[1][s] for s in range(5, 9)]
  run_train(workdir, *STEPS)  # and the next re-run finds a good newest step


@pytest.mark.slow
def test_every_checkpoint_damaged_stops_unless_told_to_start_over(finished, tmp_path):
  workdir = copy_run(finished[0], tmp_path)
  for step in (4, 8):
    flip_bytes(os.path.join(workdir, "checkpoints", str(step)))
  result = run_train(workdir, *STEPS, check=False)
  assert result.returncode == 2, result.stderr[-2000:]
  assert "every checkpoint in" in result.stderr
  assert "--config.checkpoint.fresh_start_if_damaged=True" in result.stderr
  run_train(workdir, *STEPS, "--config.checkpoint.fresh_start_if_damaged=True")
  assert [losses(workdir)[s] for s in range(1, 9)] == [finished[1][s] for s in range(1, 9)]


def test_a_second_run_on_a_workdir_is_refused_and_a_dead_ones_lock_taken_over(tmp_path):
  workdir = str(tmp_path)
  first = subprocess.Popen(
      [sys.executable, "train.py", f"--workdir={workdir}", *FAST, "--config.train.steps=400"],
      cwd=ROOT, env=dict(os.environ, XLA_FLAGS="", PYTHONPATH=ROOT),
      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  lock = os.path.join(workdir, ".lock.process-0")
  deadline = time.time() + 120
  while time.time() < deadline and not (os.path.exists(lock) and os.path.getsize(lock)):
    time.sleep(0.2)
  try:
    second = run_train(workdir, "--config.train.steps=400", check=False)
    assert second.returncode == 2, second.stderr[-2000:]
    assert f"is in use by process {first.pid}" in second.stderr
    assert "Traceback" not in second.stderr
  finally:
    first.send_signal(signal.SIGKILL)
    first.wait()
  third = run_train(workdir, "--config.train.steps=2")  # the dead run's lock: taken over
  assert f"took over the workdir lock of process {first.pid}" in third.stderr


@pytest.mark.slow
def test_a_bad_corpus_line_is_named_or_skipped(tmp_path):
  good = [json.dumps({"text": f"def f{i}(x):\n    return x * {i}\n" * 20}) for i in range(300)]
  lines = good[:100] + ['{"text": "unterminated'] + good[100:200] + ['{"title": "no text"}'] \
      + good[200:]
  (tmp_path / "corpus.jsonl").write_text("\n".join(lines) + "\n")
  (tmp_path / "empty.jsonl").write_text("")
  files = f"--config.data.files={tmp_path}/*.jsonl"
  small = "--config.model.vocab_size=300"  # (a tokenizer this small corpus can hold)
  result = run_train(str(tmp_path / "run"), files, small, "--config.train.steps=2", check=False)
  assert result.returncode == 2 and "Traceback" not in result.stderr
  assert f"{tmp_path}/corpus.jsonl, line 101: invalid JSON" in result.stderr
  assert "data.bad_lines=skip" in result.stderr
  result = run_train(str(tmp_path / "run"), files, small, "--config.train.steps=2",
                     "--config.data.bad_lines=skip")
  assert "skipped 2 bad corpus line(s)" in result.stderr
  assert 'corpus.jsonl, line 202: no "text" field' in result.stderr
  assert "2 bad corpus lines skipped" in result.stdout
  with open(tmp_path / "run" / "metrics.jsonl") as f:
    assert [json.loads(line)["skipped_corpus_lines"] for line in f] == [2, 2]


@pytest.mark.slow
def test_a_metrics_line_cut_by_a_kill_is_dropped_and_the_file_stays_whole(finished, tmp_path):
  workdir = copy_run(finished[0], tmp_path)
  with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
    f.write(json.dumps({"step": 7, "loss": 1.0}) + "\n" + '{"step": 8, "lo')  # cut mid-line
  run_train(workdir, "--config.train.steps=10", "--config.checkpoint.every=4",
            "--config.train.warmup_steps=2")
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f]  # every line whole
  assert [r["step"] for r in records] == [7, 9, 10]


@pytest.mark.slow
def test_a_changed_corpus_stops_the_resume_naming_the_file(tmp_path):
  corpus = tmp_path / "corpus"
  corpus.mkdir()
  for i in range(12):
    (corpus / f"{i}.txt").write_text("".join(f"def f{i}_{j}(x):\n    return x + {j}\n"
                                             for j in range(200)))
  files, small = f"--config.data.files={corpus}/*.txt", "--config.model.vocab_size=300"
  workdir = str(tmp_path / "run")
  run_train(workdir, files, small, "--config.train.steps=2", "--config.checkpoint.every=2")
  (corpus / "3.txt").write_text("changed\n" * 500)
  result = run_train(workdir, files, small, "--config.train.steps=4", check=False)
  assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
  assert f"{corpus}/3.txt changed" in result.stderr
  assert "--config.data.allow_corpus_change=True" in result.stderr
  result = run_train(workdir, files, small, "--config.train.steps=4",
                     "--config.data.allow_corpus_change=True")
  assert "resumed from step 2" in result.stdout and "changed corpus" in result.stderr


@pytest.mark.slow
def test_sigterm_twice_saves_once_and_the_rerun_finishes(finished, tmp_path):
  workdir = str(tmp_path)
  process = subprocess.Popen(
      [sys.executable, "train.py", f"--workdir={workdir}", *FAST, *STEPS],
      cwd=ROOT, env=dict(os.environ, XLA_FLAGS="", PYTHONPATH=ROOT),
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  wait_for_logged_steps(process, workdir, 2)
  process.send_signal(signal.SIGTERM)
  time.sleep(0.05)
  process.send_signal(signal.SIGTERM)
  out, err = process.communicate(timeout=120)
  assert process.returncode == 0 and "stopped by signal" in out, err[-2000:]
  run_train(workdir, *STEPS)
  assert [losses(workdir)[s] for s in range(5, 9)] == [finished[1][s] for s in range(5, 9)]


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGKILL, signal.SIGTERM], ids=["kill -9", "SIGTERM"])
def test_a_signal_during_an_asynchronous_save(finished, tmp_path, signum):
  """kill -9 between the save's start and its commit leaves no step 4 (orbax commits by a
  rename) and the re-run resumes from scratch; SIGTERM lets the save finish, stops after
  the step in flight with a checkpoint, and the re-run resumes from it. Either way the
  losses are the uninterrupted run's."""
  workdir = str(tmp_path)
  process = start_train(workdir, *STEPS, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                        text=True)
  wait_for_save_in_progress([process], workdir, 4)
  process.send_signal(signum)
  out, err = process.communicate(timeout=120)
  saved = sorted(int(n) for n in os.listdir(os.path.join(workdir, "checkpoints")) if n.isdigit())
  if signum == signal.SIGKILL:
    assert saved == [], saved  # killed before the commit: nothing half-written counts
  else:
    assert process.returncode == 0 and "stopped by signal" in out, err[-2000:]
    assert 4 in saved and max(saved) < 8, saved
  result = run_train(workdir, *STEPS)
  assert "Traceback" not in result.stderr
  if signum == signal.SIGTERM:
    assert f"resumed from step {max(saved)}" in result.stdout
  assert losses(workdir) == finished[1]


@pytest.mark.slow
def test_a_full_disk_stops_the_run_and_it_resumes_once_space_is_back(finished, tmp_path):
  """The workdir on a 32 MiB tmpfs: checkpoint 4 (21 MB) fits, checkpoint 8 does not."""
  if os.geteuid() != 0:
    pytest.skip("mounting a small tmpfs needs root")
  mount = str(tmp_path / "small-disk")
  os.makedirs(mount)
  subprocess.run(["mount", "-t", "tmpfs", "-o", "size=32m", "tmpfs", mount], check=True)
  try:
    workdir = os.path.join(mount, "run")
    result = run_train(workdir, *STEPS, check=False)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert ("error: could not write checkpoint 8 in " in result.stderr and
            "the disk is full; the newest complete checkpoint is step 4. Free some space"
            in result.stderr), result.stderr[-2000:]
    subprocess.run(["mount", "-o", "remount,size=128m", mount], check=True)  # space is back
    result = run_train(workdir, *STEPS)
    assert "resumed from step 4" in result.stdout
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["4", "8"]
    assert losses(workdir) == finished[1]
  finally:
    subprocess.run(["umount", mount], check=False)
