"""The training step as a library: used by train.py, the benchmarks and the tests alike.

  optimizer.py  AdamW with warmup + cosine decay, no decay on norms and biases
  state.py      the model and optimizer state, created sharded on the mesh
  steps.py      the jit-compiled train and eval steps (gradient accumulation, the
                non-finite guard, device-side counters)
  prefetch.py   the next batch prepared and put on the mesh while the step runs
  peak.py       peak FLOP/s per device for MFU (a table for TPU/GPU, measured on CPU)
"""
