"""Multi-host training on localhost: 2 processes x 4 CPU devices over gloo."""

import os
import socket
import subprocess
import sys
import time

import pytest

from tests.test_faults import wait_for_save_in_progress
from tests.test_train import FAST, ROOT, losses, run_train

STEPS = ["--config.train.steps=6", "--config.checkpoint.every=3"]


def _free_port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _start_pair(workdir):
  port = _free_port()
  env = dict(os.environ, XLA_FLAGS="", PYTHONPATH=ROOT)
  return [subprocess.Popen(
      [sys.executable, "train.py", f"--workdir={workdir}", *FAST, *STEPS, "--cpu_devices=4",
       "--num_processes=2", f"--process_id={index}", f"--coordinator_address=localhost:{port}"],
      cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
      for index in range(2)]


def _finish(processes, timeout=400):
  outputs = [p.communicate(timeout=timeout)[0] for p in processes]
  for process, output in zip(processes, outputs):
    assert process.returncode == 0, output[-3000:]
  return outputs


@pytest.mark.slow
def test_two_processes_match_one_process(tmp_path):
  single = str(tmp_path / "single")
  run_train(single, *STEPS)
  pair = str(tmp_path / "pair")
  _finish(_start_pair(pair))
  # Equal up to float32 rounding: gloo's cross-process all-reduce sums in another order
  # than XLA's in-process one (seen: steps 1-4 bitwise equal, a 1e-7 difference at step 5).
  single_losses, pair_losses = losses(single), losses(pair)
  assert sorted(pair_losses) == sorted(single_losses) == list(range(1, 7))
  for step, loss in single_losses.items():
    assert abs(pair_losses[step] - loss) <= 1e-5 * abs(loss), step
  data_files = sorted(f for f in os.listdir(os.path.join(pair, "checkpoints", "6", "data"))
                      if f.endswith(".json"))
  assert data_files == ["process_0-of-2.json", "process_1-of-2.json"]


@pytest.mark.slow
def test_a_dead_process_stops_the_other_and_the_rerun_resumes(tmp_path):
  workdir = str(tmp_path)
  processes = _start_pair(workdir)
  checkpoint = os.path.join(workdir, "checkpoints", "3")
  deadline = time.time() + 300
  while not os.path.isdir(checkpoint) and time.time() < deadline:
    assert all(p.poll() is None for p in processes), "a process ended early"
    time.sleep(0.2)
  processes[1].kill()
  killed_at = time.time()
  try:
    processes[0].wait(timeout=60)
  except subprocess.TimeoutExpired:
    processes[0].kill()
    raise AssertionError("the surviving process did not exit within 60 s")
  assert processes[0].returncode != 0
  assert time.time() - killed_at < 60
  for process in processes:
    process.communicate()
  outputs = _finish(_start_pair(workdir))
  assert "resumed from step" in outputs[0]
  assert max(losses(workdir)) == 6


@pytest.mark.slow
def test_a_process_killed_during_a_save_and_both_rerun(tmp_path):
  """kill -9 of process 1 between the start and the commit of step 3's save: process 0
  stops too, and both re-run to the one-process losses (from scratch, or from step 3
  when process 1 had finished its share before the kill and process 0 committed it)."""
  single = str(tmp_path / "single")
  run_train(single, *STEPS)
  workdir = str(tmp_path / "pair")
  processes = _start_pair(workdir)
  wait_for_save_in_progress(processes, workdir, 3)
  processes[1].kill()
  try:
    processes[0].wait(timeout=90)
  except subprocess.TimeoutExpired:
    processes[0].kill()
    raise AssertionError("the surviving process did not exit within 90 s")
  for process in processes:
    process.communicate()
  assert processes[0].returncode != 0
  _finish(_start_pair(workdir))
  pair_losses, single_losses = losses(workdir), losses(single)
  assert sorted(pair_losses) == list(range(1, 7))
  for step, loss in single_losses.items():
    assert abs(pair_losses[step] - loss) <= 1e-5 * abs(loss), step
