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
