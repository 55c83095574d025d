"""Inference as a library: serve.py and the evaluation tools are its front ends.

  requests.py  a request's fields, parsed and checked (RequestError names what is wrong)
  sampling.py  greedy / temperature / top-k / top-p with per-request seeds, inside jit
  engine.py    the Engine: buckets, batches, prefill on the ring, decode over the cache
  loading.py   a model and tokenizer from a run or a converted checkpoint, with overrides
  scoring.py   the Scorer: log p(target) of every token of rows (perplexity, probes)
"""
