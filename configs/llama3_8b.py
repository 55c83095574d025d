"""A Llama-3-8B-shaped model (8.0B parameters, GQA 32:8) at long context. Not runnable on CPU.

  python train.py --config=configs/llama3_8b.py:v5p-128 --workdir=gs://.../run
  python train.py --config=configs/llama3_8b.py:8xh100 --workdir=/data/run

Variants pick the mesh and context: v5p-128 (64 chips, 4x4x4: fsdp 4 x sequence 16,
128K-token rows), v5p-128-1m (a ring of 64, the state split over it: 1M tokens in 49%
of a chip, docs/tpu.md) and 8xh100 (a ring of 8, the state split over it, 64K; fsdp 2
x ring 4 needed 114 GiB of an H100's 79). Every mesh axis of a TPU variant is a
product of whole physical axes of its slice (docs/tpu.md). Tests build the abstract
parameters, validate every mesh and lay the TPU ones on their slice's compile-only
devices.
"""

from configs import base

MESHES = {  # variant: (mesh, seq_len, global batch)
    "v5p-128": (dict(data=1, fsdp=4, sequence=16, tensor=1), 131072, 4),
    "v5p-128-1m": (dict(data=1, fsdp=1, sequence=64, tensor=1), 1 << 20, 1),
    "8xh100": (dict(data=1, fsdp=1, sequence=8, tensor=1), 65536, 1),
}


def get_config(variant="v5p-128"):
  return base.real_size(variant, MESHES, vocab_size=128256, dim=4096, n_layers=32, n_heads=32,
                        n_kv_heads=8, mlp_dim=14336, rope_theta=500_000.0)
