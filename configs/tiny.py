"""The tiny model, trained on CPU: 4 layers of width 256, 8 query / 2 KV heads (7.2M params).

  python train.py --config=configs/tiny.py --workdir=runs/tiny      # = make demo

trains on the Python standard library's sources with ring attention on 8 virtual CPU
devices (data=2 x sequence=4), 512-token rows, 8 rows a step: ~1 s a step and about
5 minutes on 2 CPU cores; the loss falls from ~9.0 to ~4.5 and validation perplexity
is logged every 50 steps. The run leaves checkpoints that serve.py can load.
"""

from configs import base


def get_config():
  config = base.get_config()
  config.model.max_seq_len = 16384
  config.mesh.data = 2
  config.mesh.sequence = -1          # the rest of the devices form the ring
  config.data.seq_len = 512
  config.data.batch_size = 8
  config.train.steps = 150
  config.train.lr = 3e-3             # a small model trains well with a large rate
  config.attention.block_q = 128     # small heads (32 wide): small blocks skip more of the
  config.attention.block_kv = 128    # causal triangle and measured fastest on CPU (bench/train.py)
  config.checkpoint.every = 50
  config.log.every = 10
  config.log.eval_every = 50
  return config
