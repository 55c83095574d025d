"""Faults a run meets on a pod, each followed by the same command: a damaged checkpoint
is set aside and the step saved again, a second run on a workdir is refused, a bad
corpus line is named by file and line (or skipped when the user says so)."""

import glob
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.test_train import FAST, ROOT, losses, run_train

STEPS = ["--config.train.steps=8", "--config.checkpoint.every=4",
         "--config.train.warmup_steps=2"]


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


def test_a_damaged_newest_checkpoint_is_set_aside_and_saved_again(finished, tmp_path):
  workdir = copy_run(finished[0], tmp_path)
  flip_bytes(os.path.join(workdir, "checkpoints", "8"))
  result = run_train(workdir, *STEPS)  # (exit 0, or run_train raises)
  assert "resumed from step 4" in result.stdout
  assert "moved it to" in result.stderr and "8.damaged" in result.stderr
  assert os.path.isdir(os.path.join(workdir, "checkpoints", "8.damaged"))  # kept to inspect
  assert os.path.isdir(os.path.join(workdir, "checkpoints", "8"))          # saved again
  assert [losses(workdir)[s] for s in range(5, 9)] == [finished[1][s] for s in range(5, 9)]
  run_train(workdir, *STEPS)  # and the next re-run finds a good newest step


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
