"""A progressive context schedule (LWM-style): one command, stages of growing length.

  python train.py --config=configs/progressive.py --workdir=DIR --config.init_from=RUN

Each stage trains in DIR/stage-i, starting from the previous stage's result (stage 0
from init_from, or from scratch when it is empty) with a fresh optimizer; each stage
sets what changes, as dotted config fields. Re-running the command resumes: finished
stages are skipped and an interrupted one continues from its last checkpoint. This
schedule takes `tiny` (trained at 512 tokens) to 2K then 4K, raising RoPE's theta as
LWM does; edit the stages or write your own file for real models.
"""

from configs import extend


def get_config():
  config = extend.get_config()
  config.model.rope.scaling.type = "none"  # theta scaling rather than interpolation
  config.model.rope.scaling.factor = 1.0
  config.train.lr = 1e-4
  config.train.warmup_steps = 10
  config.checkpoint.every = 50
  config.stages = (
      {"data.seq_len": 2048, "data.batch_size": 4, "model.rope.theta": 100_000.0,
       "train.steps": 100},
      {"data.seq_len": 4096, "data.batch_size": 2, "model.rope.theta": 1_000_000.0,
       "train.steps": 100},
  )
  return config
