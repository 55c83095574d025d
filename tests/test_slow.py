"""Slow checks (`make test-slow`, i.e. `pytest -m slow`): run by developers, not by CI."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_ring_check_at_8k_tokens():
  """The tiny model at 8K tokens: a ring of 8 devices equals one device (~1 min)."""
  result = subprocess.run(
      [sys.executable, "-m", "tools.ring_check", "--config=configs/tiny.py", "--seq_len=8192"],
      cwd=ROOT, env=dict(os.environ, XLA_FLAGS="", PYTHONPATH=ROOT), capture_output=True,
      text=True, timeout=900)
  assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
  assert "ring equals one device: yes" in result.stdout
