"""The tiny model for CPU runs: 4 layers of width 256 (7.2M parameters, 3.0M of them outside the embeddings).

  make demo    # = python -m tools.demo --config=configs/tiny.py
runs it forward and backward at 16K tokens on 8 virtual CPU devices (sequence=8) and
on one device, and checks they agree (~3 min on 2 CPU cores).
"""

from configs import base


def get_config():
  config = base.get_config()
  config.model.max_seq_len = 16384
  config.mesh.data = 1
  config.mesh.sequence = -1          # every device on the ring
  config.data.seq_len = 16384
  config.data.batch_size = 1
  return config
