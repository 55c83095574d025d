"""A Llama-2-7B-shaped model (6.7B parameters) at long context. Not runnable on CPU.

  python train.py --config=configs/llama2_7b.py:v5p-128 --workdir=gs://.../run
  python train.py --config=configs/llama2_7b.py:8xh100 --workdir=/data/run

Variants pick the mesh and context: v5p-128 (64 chips, 4x4x4: fsdp 4 x sequence 16,
32K tokens a row; 1M-token rows with v5p-128-1m: sequence 64) and 8xh100 (a ring of
8, the state split over it, 32K). Every mesh axis of a TPU variant is a product of
whole physical axes of its slice (docs/tpu.md). Tests build the abstract parameters,
validate every mesh and lay the TPU ones on their slice's compile-only devices.
"""

from configs import base

MESHES = {  # variant: (mesh, seq_len, global batch)
    "v5p-128": (dict(data=1, fsdp=4, sequence=16, tensor=1), 32768, 8),
    "v5p-128-1m": (dict(data=1, fsdp=1, sequence=64, tensor=1), 1 << 20, 1),
    "8xh100": (dict(data=1, fsdp=1, sequence=8, tensor=1), 32768, 1),
}


def get_config(variant="v5p-128"):
  return base.real_size(variant, MESHES, vocab_size=32000, dim=4096, n_layers=32, n_heads=32,
                        n_kv_heads=32, mlp_dim=11008, rope_theta=10_000.0)
