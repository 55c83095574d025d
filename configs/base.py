"""Every ringlm config field with its default. Other config files start from this one.

Fields are overridden on the command line: --config.model.n_layers=2. The `model` and
`attention` sections come from model/config.py's dataclasses, the one source of their
defaults; every other section is defined here.
"""

import ml_collections

from model import config as model_config


def get_config():
  config = ml_collections.ConfigDict()
  config.seed = 0  # parameter init (and, with training, data order and dropout-free RNG)

  # --- model and attention: model/config.py's dataclasses hold every field's default and
  # comment (ModelConfig, RopeConfig, RopeScaling, AttentionConfig); override any of them,
  # e.g. --config.model.n_layers=2 --config.model.rope.scaling.type=yarn
  # --config.attention.impl=xla.
  config.model = ml_collections.ConfigDict(model_config.defaults(model_config.ModelConfig))
  config.attention = ml_collections.ConfigDict(
      model_config.defaults(model_config.AttentionConfig))

  # --- mesh (parallel/mesh.py); -1 takes the remaining devices ---
  config.mesh = ml_collections.ConfigDict()
  config.mesh.data = -1
  config.mesh.fsdp = 1
  config.mesh.sequence = 1           # ring size: the sequence is split over this axis
  config.mesh.tensor = 1
  # TPU: a mesh axis that needs a physical axis of the torus split is refused unless
  # True (the split axis loses its wrap-around link; parallel/mesh.device_grid).
  config.mesh.allow_split_physical_axes = False

  # --- data (data/pipeline.py, data/tokenizer.py) ---
  config.data = ml_collections.ConfigDict()
  config.data.files = ""             # comma-separated globs (.txt/.py/.jsonl); "": the stdlib's .py
  config.data.seq_len = 2048         # tokens per row; a multiple of 2*mesh.sequence
  config.data.batch_size = 8         # global rows per step (all hosts together)
  config.data.packing = "concat"     # documents -> rows: concat (cut into full rows) or
                                     # first_fit (a document that fits a row stays whole)
  config.data.bad_lines = "error"    # a .jsonl line that cannot be read: error (stop, naming
                                     # file and line) or skip (count it, warn, go on)
  config.data.allow_corpus_change = False  # resume although data.files changed since the
                                           # checkpoint (the iterator's position then means
                                           # other tokens); False stops, naming the files
  config.data.passkey_fraction = 0.0  # share of the training documents that are synthetic
                                      # passkey documents (data/passkey.py); [0, 1)

  # --- training (train.py) ---
  steps = ml_collections.FieldReference(1000)
  config.train = ml_collections.ConfigDict()
  config.train.steps = steps
  config.train.lr = 3e-4             # peak learning rate (AdamW), after linear warmup
  config.train.warmup_steps = steps // 20  # follows train.steps unless set
  config.train.min_lr_ratio = 0.1    # cosine decays to lr * min_lr_ratio
  config.train.b1 = 0.9
  config.train.b2 = 0.95
  config.train.weight_decay = 0.1    # on matrices only: not on norms or biases
  config.train.grad_clip = 1.0       # global-norm clipping
  config.train.grad_accum = 1        # micro-batches per step (each data.batch_size / grad_accum rows)
  # Parameters and AdamW state split over mesh.fsdp x mesh.sequence (ZeRO-3 over the ring
  # too, as LWM and MaxText do; each layer's weights are gathered over the ring as it
  # runs). False: every device of the ring holds the same 1/fsdp of the state. True pays
  # where the state dominates (a long ring, little fsdp); XLA's temporaries also grow,
  # by more than the state saved at fsdp 4 x ring 16 (docs/tpu.md): ask the pre-flight.
  # Needs model.dim to be a multiple of fsdp*sequence. Serving keeps weights whole.
  config.train.shard_state_over_sequence = False
  config.train.max_bad_steps = 5     # stop after this many non-finite steps in a row
  config.init_from = ""              # workdir or checkpoint to load parameters from (not optimizer);
                                     # the model's shape, data files and tokenizer come with it
  # Progressive schedule: a tuple of stages, each a dict of dotted fields to override
  # ({"data.seq_len": 4096, "model.rope.theta": 1e6, "train.steps": 100}); stage i trains
  # in <workdir>/stage-i from stage i-1's result (configs/progressive.py).
  config.stages = ()

  # --- checkpoints (orbax, <workdir>/checkpoints) ---
  config.checkpoint = ml_collections.ConfigDict()
  config.checkpoint.every = 100      # steps between saves (also at the end and on SIGTERM)
  config.checkpoint.keep = 3         # newest checkpoints kept
  config.checkpoint.fresh_start_if_damaged = False  # every checkpoint damaged: False stops
                                                    # with a message, True trains from step 0

  # --- serving (serve.py) ---
  config.serve = ml_collections.ConfigDict()
  config.serve.batch_size = 32       # most requests decoded together (rows of one batch)
  # Precision served in (serve.py and the eval tools): bfloat16 (parameters stored and
  # matmuls run in bf16, float32 sums, as vLLM serves a float32 checkpoint in half
  # precision), float32, or "" (the checkpoint's model.dtype / model.param_dtype).
  # --config.model.dtype / param_dtype on the command line win. The KV cache:
  # model.kv_cache_dtype (int8 or float8_e4m3fn halves it).
  config.serve.dtype = "bfloat16"
  # Weights: "" (as the checkpoint stores them), int8 (per-channel) or int4 (groups of
  # model.quantize_group), rounded to nearest at load (model/quantize.py); a checkpoint
  # from tools/quantize.py (round to nearest, GPTQ or AWQ) is quantized already.
  config.serve.quantize = ""
  # Mesh when no --config.mesh.* is given: sequence (all devices on the ring: long
  # prompts, the KV cache spread over devices) | batch (all devices on data: many short
  # requests; one device on a CPU host) | auto (sequence when a request needs
  # serve.long_context tokens or more).
  config.serve.cache_sharding = "auto"
  config.serve.long_context = 8192
  config.serve.min_bucket = 16       # shortest prompt bucket; buckets are powers of two
  config.serve.decode_chunk = 32     # decode steps per compiled call (stop strings are
                                     # checked between calls)
  config.serve.max_tokens = 16       # default max_tokens of a request
  config.serve.compilation_cache = ""  # JAX persistent compilation cache directory ("":
                                       # $RINGLM_COMPILATION_CACHE, else ~/.cache/ringlm/jax;
                                       # "none": off)
  # The HTTP server (serve.py --port; docs/serving.md): batch_size decode slots.
  config.serve.prefill_chunk = 512   # longest prompt chunk prefilled between decode calls
  config.serve.slot_decode_steps = 8  # decode steps per call (new requests join between)
  # ... and while a prompt is being prefilled: fewer, so queued requests reach their
  # slots sooner (bench/serve_load at 8 req/s: 2 gave 100 tok/s, 8 gave 78-81).
  config.serve.prefill_decode_steps = 2
  config.serve.max_queue = 256       # requests waiting for a slot; more get 429
  config.serve.prefix_block = 256    # prefix caching: prompts match in blocks of this many
  config.serve.prefix_cache_mb = 1024  # its budget (least recently used evicted; 0: off)
  config.serve.memory_budget_mb = 8192  # CPU: memory for parameters + KV cache (TPU/GPU:
                                        # the device's own, 0 here too means that)
  config.serve.drain_s = 30.0        # SIGTERM: seconds to finish the requests in flight
  config.serve.max_body_mb = 16      # largest request body
  config.serve.accelerator_hour_usd = 0.0  # price of the mesh's devices per hour (0: no
                                           # cost figures in /metrics)

  # --- logging ---
  config.log = ml_collections.ConfigDict()
  config.log.every = 10              # steps between metrics lines
  config.log.eval_every = 100        # steps between validation losses
  config.log.eval_batches = 4        # validation batches per evaluation
  config.log.tensorboard = False     # also write TensorBoard events to <workdir>/tensorboard
  return config


def real_size(variant: str, meshes: dict, *, vocab_size, dim, n_layers, n_heads, n_kv_heads,
              mlp_dim, rope_theta):
  """A real-size model: bf16 compute on fp32 master weights, full remat, and the
  variant's (mesh, seq_len, global batch) from `meshes`."""
  config = get_config()
  config.model.update(dict(vocab_size=vocab_size, dim=dim, n_layers=n_layers, n_heads=n_heads,
                           n_kv_heads=n_kv_heads, mlp_dim=mlp_dim, dtype="bfloat16",
                           param_dtype="float32", remat="full"))
  config.model.rope.theta = rope_theta
  mesh, config.data.seq_len, config.data.batch_size = meshes[variant]
  config.mesh.update(mesh)
  config.model.max_seq_len = config.data.seq_len
  for field, value in long_context_levers(mesh, config.data.seq_len).items():
    section, name = field.split(".")
    config[section][name] = value
  config.train.lr = 3e-5
  return config


def long_context_levers(mesh: dict, seq_len: int) -> dict:
  """{field: value} of the memory levers for a real-size model on `mesh` ({axis: size})
  at `seq_len` tokens a row, as measured with the pre-flight (docs/tpu.md): the loss's
  logits 4096 tokens per device at a time (model.head_chunk; Llama-3-8B at 1M tokens on
  v5p-128: 9.2 GiB less per chip); the state split over the ring when nothing else
  splits it (train.shard_state_over_sequence; fsdp 1: 21 GiB less per chip there; with
  fsdp 4 XLA's temporaries grew by more), and then every layer's weights gathered in
  bf16 (model.gather_in_compute_dtype)."""
  ring = mesh.get("sequence", 1)
  local = seq_len // ring
  over_sequence = ring > 1 and mesh.get("fsdp", 1) == 1
  return {"model.head_chunk": 4096 if local % 4096 == 0 and local > 4096 else 0,
          "train.shard_state_over_sequence": over_sequence,
          "model.gather_in_compute_dtype": over_sequence}
