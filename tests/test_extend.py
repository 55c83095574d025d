"""Context extension end to end: init_from across meshes, the eval tools, progressive stages.

Subprocesses as a user runs them, on 8 virtual CPU devices; one short source run is
shared by the module.
"""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from tests.test_train import ROOT, run_train

ENV = dict(os.environ, XLA_FLAGS="", PYTHONPATH=ROOT)


def run(args, check=True):
  result = subprocess.run([sys.executable, *args], cwd=ROOT, env=ENV, capture_output=True,
                          text=True, timeout=600)
  if check and result.returncode != 0:
    raise AssertionError(f"{args[:2]} failed ({result.returncode}):\n{result.stderr[-3000:]}")
  return result


@pytest.fixture(scope="module")
def source(tmp_path_factory):
  """`tiny` (2 layers, vocabulary 1024) trained 3 steps at 128 tokens on a ring of 2."""
  workdir = str(tmp_path_factory.mktemp("source") / "run")
  run_train(workdir, "--config.train.steps=3", "--config.mesh.sequence=2",
            "--config.mesh.data=4")
  return workdir


def extend(workdir, init_from, *extra):
  """configs/extend.py for one step: its update is zero (warmup starts at lr 0), so the
  extended checkpoint holds exactly the parameters it started from."""
  return run(["train.py", "--config=configs/extend.py", f"--workdir={workdir}",
              f"--config.init_from={init_from}", "--config.train.steps=1", "--config.log.every=1",
              "--config.log.eval_every=1000", "--config.log.eval_batches=1", *extra])


def params(workdir):
  import jax

  from flax import nnx

  from model import transformer
  from parallel.mesh import make_mesh
  model, meta = transformer.load(workdir, make_mesh({"data": 1}, jax.devices()[:1]))
  return jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model))), meta


def test_extend_across_meshes(source, tmp_path):
  """Written on sequence=2 -> extended on sequence=8 (512 tokens) -> extended again on
  sequence=2 (1024 tokens): the parameters arrive unchanged, the shape and tokenizer
  come from the source, and the PI factor counts from the original 128 tokens."""
  wide, back = str(tmp_path / "wide"), str(tmp_path / "back")
  result = extend(wide, source, "--config.data.seq_len=512", "--config.data.batch_size=2")
  assert "initialised parameters from" in result.stdout
  extend(back, wide, "--config.data.seq_len=1024", "--config.data.batch_size=4",
         "--config.mesh.sequence=2", "--config.mesh.data=-1")
  original, _ = params(source)
  for workdir, factor, mesh in ((wide, 4.0, 8), (back, 8.0, 2)):
    with open(os.path.join(workdir, "config.json")) as f:
      config = json.load(f)
    assert config["model"]["vocab_size"] == 1024 and config["model"]["n_layers"] == 2
    assert config["model"]["rope"]["scaling"] == dict(
        config["model"]["rope"]["scaling"], type="linear", factor=factor, original_max_len=128)
    assert config["train"]["lr"] == 2e-5 and config["train"]["weight_decay"] == 0.0
    assert config["mesh"]["sequence"] in (-1, mesh)
    with open(os.path.join(workdir, "assets", "tokenizer.model"), "rb") as f, \
        open(os.path.join(source, "assets", "tokenizer.model"), "rb") as g:
      assert f.read() == g.read()
    loaded, _ = params(workdir)
    import jax
    for a, b in zip(jax.tree.leaves(original), jax.tree.leaves(loaded), strict=True):
      np.testing.assert_array_equal(a, b)


def test_extend_refuses_another_shape(source, tmp_path):
  result = run(["train.py", "--config=configs/extend.py", f"--workdir={tmp_path / 'x'}",
                f"--config.init_from={source}", "--config.model.dim=128"], check=False)
  assert result.returncode == 2 and "Traceback" not in result.stderr
  assert "--config.model.dim=128, but init_from=" in result.stderr
  assert "holds a model with model.dim=256" in result.stderr


def test_eval_ppl_and_passkey(source, tmp_path):
  plot = tmp_path / "ppl.png"
  result = run(["-m", "tools.eval_ppl", f"--checkpoint={source}", "--seq_len=128,256",
                "--max_tokens=2000", f"--plot={plot}", "--config.model.rope.scaling.type=linear",
                "--config.model.rope.scaling.factor=2"])
  results = json.loads(result.stdout.strip().splitlines()[-1])["results"]
  assert [r["seq_len"] for r in results] == [128, 256]
  assert results[0]["tokens"] == results[1]["tokens"] > 1000  # the same tokens at each length
  assert all(1 < r["ppl"] < 1024 * 2 for r in results)
  assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  # on CPU one device, and the process made no other (tools/evaluation.eval_devices)
  assert json.loads(result.stdout.strip().splitlines()[-1])["devices"] == 1

  out = tmp_path / "passkey.json"
  result = run(["-m", "tools.eval_passkey", f"--checkpoint={source}", "--lengths=256,512",
                "--depths=0,1", "--trials=2", f"--out={out}"])
  summary = json.loads(out.read_text())
  assert len(summary["cells"]) == 4 and summary["trials"] == 2
  assert all(0 <= cell["accuracy"] <= 1 for cell in summary["cells"])
  assert summary["k_max"] in (0, 256, 512)
  assert (tmp_path / "passkey.png").read_bytes()[:4] == b"\x89PNG"
  assert json.loads(result.stdout.strip().splitlines()[-1])["k_max"] == summary["k_max"]


def test_copy_probe_scores_each_copy(source):
  from tools import copy_probe
  rows = copy_probe.probe_rows(vocab_size=50, length=10, rows=3, multiple=8, seed=1)
  assert rows.shape == (3, 25)  # 2 x 10 tokens rounded up to 24, plus the last target
  np.testing.assert_array_equal(rows[:, 10:20], rows[:, :10])
  assert rows.min() >= copy_probe.FIRST_ID and rows.max() < 50
  # An oracle that knows exactly the tokens a copy repeats: targets 10..19 are the
  # second copy's tokens 11..20; only 11..19 are predictable from the first copy.
  log_probs = np.full((3, 24), -3.0)
  log_probs[:, 10:19] = 0.0
  assert copy_probe.copy_losses(log_probs, 10) == (3.0, 0.0)
  log_probs[:, 19] = -5.0  # target 19 is the padding after the second copy: not scored
  assert copy_probe.copy_losses(log_probs, 10) == (3.0, 0.0)

  result = run(["-m", "tools.copy_probe", f"--checkpoint={source}", "--length=20", "--rows=2"])
  summary = json.loads(result.stdout.strip().splitlines()[-1])
  assert summary["length"] == 20 and summary["first"] > 1
  assert 0.5 < summary["copy_ratio"] < 1.5  # 3 training steps: no copying yet


def test_passkey_prompts_have_the_asked_length(tmp_path):
  from data import pipeline, tokenizer as tokenizer_lib
  from data.passkey import k_max, prompt_ids
  documents = pipeline.load_documents(pipeline.default_corpus()[:20])
  tokenizer = tokenizer_lib.load_or_train(str(tmp_path), [], lambda: documents, 512)
  for length in (256, 400):
    for depth in (0.0, 0.5, 1.0):
      ids, answer_start = prompt_ids(tokenizer, "12345", length, depth)
      assert len(ids) == length + 1
      assert tokenizer.decode(ids).endswith("What is the pass key? The pass key is 12345")
      assert tokenizer.decode(ids[answer_start:]).strip() == "12345"
  assert k_max([256, 512, 1024], {256: 1.0, 512: 0.1, 1024: 0.9}, 0.2) == 256


PROGRESSIVE = """
from configs import progressive

def get_config():
  config = progressive.get_config()
  config.mesh.data, config.mesh.sequence = 2, 4
  config.stages = (
      {"data.seq_len": 256, "data.batch_size": 2, "model.rope.theta": 40000.0,
       "train.steps": 2},
      {"data.seq_len": 512, "data.batch_size": 2, "model.rope.theta": 160000.0,
       "train.steps": 2},
  )
  return config
"""


@pytest.mark.slow
def test_progressive_schedule_resumes_after_a_kill(source, tmp_path):
  config_file = tmp_path / "schedule.py"
  config_file.write_text(PROGRESSIVE)
  workdir = tmp_path / "progressive"
  args = [sys.executable, "train.py", f"--config={config_file}", f"--workdir={workdir}",
          f"--config.init_from={source}", "--config.log.every=1", "--config.log.eval_every=1000",
          "--config.log.eval_batches=1"]
  process = subprocess.Popen(args, cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL, text=True)
  deadline = time.time() + 300
  for line in process.stdout:  # kill -9 as soon as stage 1 starts
    if line.startswith("stage 1:") or time.time() > deadline:
      process.send_signal(signal.SIGKILL)
      break
  process.wait(timeout=60)
  stage0 = workdir / "stage-0"
  finished = os.path.getmtime(stage0 / "metrics.jsonl")
  result = subprocess.run(args, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  assert f"stage 0: done ({stage0})" in result.stdout
  assert os.path.getmtime(stage0 / "metrics.jsonl") == finished  # not trained again
  with open(workdir / "stage-1" / "config.json") as f:
    stage1 = json.load(f)
  assert stage1["init_from"] == str(stage0) and stage1["data"]["seq_len"] == 512
  assert stage1["model"]["rope"]["theta"] == 160000.0 and stage1["model"]["vocab_size"] == 1024
  with open(workdir / "stage-1" / "metrics.jsonl") as f:
    assert max(json.loads(line)["step"] for line in f) == 2
