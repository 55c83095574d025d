"""Checkpoint-extend to a longer context: the Position Interpolation paper's recipe.

  python train.py --config=configs/extend.py --workdir=NEW \\
      --config.init_from=OLD_WORKDIR_OR_CHECKPOINT --config.data.seq_len=L2 \\
      [--config.model.rope.scaling.type=linear --config.model.rope.scaling.factor=F]

Loads only the parameters of OLD (any mesh, any device count), with its model shape,
tokenizer and data files; the command line overrides what it names. Defaults (Chen et
al. 2023, "Extending Context Window of Large Language Models via Positional
Interpolation"): linear interpolation with factor = L2 / trained length, AdamW betas
(0.9, 0.95), no weight decay, lr 2e-5 after 20 linear warmup steps, then constant.
Other types: --config.model.rope.scaling.type=ntk|dynamic|yarn|llama3, or raise
--config.model.rope.theta with type=none (the LWM recipe).
"""

from configs import base


def get_config():
  config = base.get_config()
  config.model.rope.scaling.type = "linear"
  config.model.rope.scaling.factor = 0.0   # 0: new length / the checkpoint's trained length
  config.mesh.data = 1                     # long rows: every device on the ring
  config.mesh.sequence = -1
  config.train.steps = 1000
  config.train.lr = 2e-5
  config.train.warmup_steps = 20
  config.train.min_lr_ratio = 1.0          # constant after warmup
  config.train.b1, config.train.b2 = 0.9, 0.95
  config.train.weight_decay = 0.0
  config.checkpoint.every = 100
  config.log.eval_every = 100
  return config
