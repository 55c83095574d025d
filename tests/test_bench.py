"""The benchmarks' --quick modes run end to end, so their code cannot rot."""

import json
import math
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_train_benchmark_quick(tmp_path):
  out = tmp_path / "train.json"
  env = dict(os.environ, XLA_FLAGS="", PYTHONPATH=ROOT)
  result = subprocess.run([sys.executable, "-m", "bench.train", "--quick", f"--out={out}"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  report = json.loads(out.read_text())
  assert report["matmul"]["peak_flops"] > 0
  (row,) = report["rows"]
  assert row["seq_len"] == 512 and row["mesh"]["sequence"] == 4
  assert row["tokens_per_s"] > 0 and 0 < row["mfu"] < 1
  # random tokens: the loss of an untrained model is about ln(vocab)
  assert len(row["losses"]) == 2 and all(abs(loss - math.log(8192)) < 1 for loss in row["losses"])
  assert "| 512 |" in result.stdout


def test_decode_benchmark_quick(tmp_path):
  out = tmp_path / "decode.json"
  env = dict(os.environ, XLA_FLAGS="", PYTHONPATH=ROOT)
  result = subprocess.run([sys.executable, "-m", "bench.decode", "--quick", f"--out={out}",
                           f"--workdir={tmp_path / 'work'}"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  report = json.loads(out.read_text())
  assert report["matmul"]["peak_flops"] > 0
  assert report["model"]["num_hidden_layers"] == 2 and "long" not in report
  decode = report["decode"]
  assert set(decode["runs"]) == {"transformers", "ringlm_cold", "ringlm_warm"}
  for run in decode["runs"].values():
    assert run["end_to_end_s"] > 0 and run["peak_rss_bytes"] > 0
    assert run["generated_tokens"] == 4 * 8  # no EOS: every row runs to max_tokens
    assert 0 < run["decode_percent_of_peak"] < 100
  for name in ("ringlm_cold", "ringlm_warm"):
    ringlm = decode["runs"][name]["report"]
    assert ringlm["requests"] == 4 and ringlm["errors"] == 0 and ringlm["compile_s"] >= 0
    assert decode["tokens"][name]["match"], decode["tokens"][name]
  summary = report["summary"]
  assert summary["tokens_match"] and summary["speedup_cold"] > 0 and summary["speedup_warm"] > 0
  assert "| ringlm warm |" in result.stdout
