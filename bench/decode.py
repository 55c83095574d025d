"""Batch decoding, end to end: serve.py in each precision against transformers' generate
in fp32 and bf16, on the same model.

  python -m bench.decode                # 32 prompts x 128 tokens -> 128 new, an 8K-token
                                        # prompt -> 128 new, and a 16K-token prefill
  python -m bench.decode --quick        # 4 x 16 -> 8 new, 2 layers, no long cases

A random Llama-shaped model (transformers' default init, seed 0; 512 wide, 8 layers,
8 heads / 4 KV heads, MLP 1536, vocabulary 32000, ~58M parameters, float32, no EOS
token so that every row generates exactly max_tokens) is saved with save_pretrained
and converted with tools/convert_hf.py. Each side then runs as its own fresh process,
timed around the subprocess (start-up, imports, loading and compilation included):
  transformers fp32 / bf16   LlamaForCausalLM.generate, greedy, torch's default threads
                             (`python -m bench.decode --hf_generate DIR REQUESTS OUT DTYPE`)
  ringlm fp32 / bf16 / int8 / int8+kv8 / int4+kv8
                             serve.py (one device) with --config.serve.dtype=float32, the
                             default (bf16), --config.serve.quantize=int8, that with
                             --config.model.kv_cache_dtype=int8, and int4 weights (groups
                             of 128, rounded to nearest) with it; each cold (an empty
                             persistent compilation cache) and warm (reusing it)
Greedy tokens: ringlm fp32 against transformers fp32 (argmax ties can flip; reported),
the other precisions against ringlm fp32 (how far each row agrees).
The decode phase is also put against the memory roofline: the bytes a step must read
(the weights once, every row's filled cache) over the bandwidth measured in the same
run; and its FLOP/s against the matmul peak.
The 8K case: one 8192-token prompt -> 128 tokens, where the cache dominates: ringlm bf16
(its cache bf16, held as the bits) and int8+kv8 against transformers bf16.
The 16K case: one 16384-token prompt, max_tokens 1, serve.py on 8 devices with the
cache sharded over the sequence, against one transformers forward (SDPA) of the prompt.
Peak RSS of each child comes from /usr/bin/time. Prints tables and writes JSON.
"""

import argparse
import datetime
import json
import os
import resource
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Targets (issue 18): ringlm bf16 end to end against transformers bf16, warm and cold;
# the bf16 decode phase against the memory roofline; int8 weights + int8 cache against
# transformers bf16's decode phase.
SPEEDUP_TARGET_WARM, SPEEDUP_TARGET_COLD = 1.5, 1.2
ROOFLINE_TARGET_PERCENT = 60.0
INT8_DECODE_TARGET = 2.0
# ringlm's precisions: serve.py flags, bytes per weight, cache dtype on CPU (a bf16 cache is
# held as its bits and read by parallel/kernels/cpu_decode.py: model/kv_cache.held_dtype)
VARIANTS = {
    "fp32": (["--config.serve.dtype=float32"], 4, "float32"),
    "bf16": ([], 2, "bfloat16"),
    "int8": (["--config.serve.quantize=int8"], 1, "bfloat16"),
    "int8_kv8": (["--config.serve.quantize=int8", "--config.model.kv_cache_dtype=int8"], 1,
                 "int8"),
    "int4_kv8": (["--config.serve.quantize=int4", "--config.model.kv_cache_dtype=int8"], 0.5,
                 "int8"),
}
MODEL = dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8,
             num_key_value_heads=4, intermediate_size=1536, vocab_size=32000,
             max_position_embeddings=32768)


# --- FLOPs -----------------------------------------------------------------------------

def non_embedding_params(model: dict) -> int:
  """Parameters other than the input embedding: attention, MLP, norms and the lm_head."""
  dim, heads, kv = model["hidden_size"], model["num_attention_heads"], model["num_key_value_heads"]
  head_dim = dim // heads
  layer = (dim * heads * head_dim + 2 * dim * kv * head_dim + heads * head_dim * dim  # q k v o
           + 3 * dim * model["intermediate_size"] + 2 * dim)                       # MLP, norms
  return model["num_hidden_layers"] * layer + dim + dim * model["vocab_size"]     # final norm, head


def decode_flops(model: dict, prompt_lens: list, generated: list) -> float:
  """Model FLOPs of the decode phase (the first generated token comes from prefill):

    sum over rows, over decode steps s = 1 .. generated-1 (feeding generated token s):
      2 * non_embedding_params(incl. lm_head)                   the matmuls, one token
      + 4 * layers * heads * head_dim * (prompt_len + s)         q.k and p.v over the context
  """
  params = non_embedding_params(model)
  width = 4 * model["num_hidden_layers"] * model["hidden_size"]  # heads * head_dim = hidden
  total = 0.0
  for prompt_len, count in zip(prompt_lens, generated):
    steps = max(count - 1, 0)
    contexts = steps * prompt_len + steps * (steps + 1) // 2  # sum of prompt_len + s
    total += 2 * params * steps + width * contexts
  return total


def cache_bytes_per_token(model: dict, cache_dtype: str) -> int:
  """Cache bytes of one token (all layers: keys, values, an 8-bit cache's scales, the
  position): model/kv_cache.per_token_bytes of `model` (a config.json dict) converted."""
  import dataclasses

  from model import hf, kv_cache
  config, _ = hf.model_config_from_hf(dict(model, architectures=["LlamaForCausalLM"]))
  return kv_cache.per_token_bytes(dataclasses.replace(config, kv_cache_dtype=cache_dtype))


def decode_bytes(model: dict, prompt_lens: list, generated: list, weight_bytes: float = 4,
                 cache_dtype: str = "float32") -> float:
  """Bytes the decode phase reads at the least: each step (the rows decode together)
  reads the non-embedding weights once (weight_bytes each: 4 fp32, 2 bf16, 1 int8, 0.5
  int4, the scales aside), and each row its filled cache:

    weight_bytes * non_embedding_params * max(generated - 1)
      + sum over rows and steps s: cache_bytes_per_token * (prompt_len + s)
  """
  per_slot = cache_bytes_per_token(model, cache_dtype)
  steps = max((count - 1 for count in generated), default=0)
  total = float(weight_bytes) * non_embedding_params(model) * max(steps, 0)
  for prompt_len, count in zip(prompt_lens, generated):
    rows_steps = max(count - 1, 0)
    total += per_slot * (rows_steps * prompt_len + rows_steps * (rows_steps + 1) // 2)
  return total


def prefill_flops(model: dict, prompt_len: int) -> float:
  """2 * non-embedding params per token + causal attention: 4*L*H*D * sum_t (t + 1)."""
  return (2 * non_embedding_params(model) * prompt_len
          + 4 * model["num_hidden_layers"] * model["hidden_size"] * prompt_len * (prompt_len + 1) // 2)


# --- the transformers side (child processes) --------------------------------------------

def hf_generate(model_dir: str, requests_path: str, out_path: str,
                dtype: str = "float32") -> None:
  """Greedy generate of every request in one batch, in `dtype` (float32 | bfloat16);
  JSONL {id, tokens} to out_path and one JSON line of timings to stdout."""
  start = time.perf_counter()
  import torch
  import transformers
  imported = time.perf_counter()
  transformers.utils.logging.disable_progress_bar()
  with open(requests_path) as f:
    requests = [json.loads(line) for line in f if line.strip()]
  lengths = {len(r["prompt_tokens"]) for r in requests}
  new = {r["max_tokens"] for r in requests}
  if len(lengths) != 1 or len(new) != 1:
    raise SystemExit("--hf_generate: prompts of one length and one max_tokens expected")
  new = new.pop()
  model = transformers.LlamaForCausalLM.from_pretrained(
      model_dir, dtype=getattr(torch, dtype)).eval()
  model.generation_config.eos_token_id = None  # exactly `new` tokens per row
  input_ids = torch.tensor([r["prompt_tokens"] for r in requests], dtype=torch.long)
  loaded = time.perf_counter()

  stamps = []  # one per forward: the processor sees each forward's logits

  class Stamp(transformers.LogitsProcessor):
    def __call__(self, input_ids, scores):
      stamps.append(time.perf_counter())
      return scores

  generate_start = time.perf_counter()
  output = model.generate(input_ids, attention_mask=torch.ones_like(input_ids),
                          max_new_tokens=new, min_new_tokens=new, do_sample=False,
                          eos_token_id=None, pad_token_id=0,
                          logits_processor=transformers.LogitsProcessorList([Stamp()]))
  done = time.perf_counter()
  generated = output[:, input_ids.shape[1]:].tolist()
  if any(len(row) != new for row in generated):
    raise SystemExit(f"--hf_generate: expected {new} tokens per row")
  with open(out_path, "w") as f:
    for request, tokens in zip(requests, generated):
      f.write(json.dumps({"id": request["id"], "tokens": tokens}) + "\n")
  print(json.dumps({"import_s": imported - start, "load_s": loaded - imported,
                    "generate_s": done - generate_start,
                    "prefill_s": stamps[0] - generate_start,      # to the first logits
                    "decode_s": stamps[-1] - stamps[0],           # the other new-1 forwards
                    "threads": torch.get_num_threads(), "torch": torch.__version__,
                    "transformers": transformers.__version__}), flush=True)


def hf_forward(model_dir: str, requests_path: str) -> None:
  """One forward (no grad, SDPA) of the first request's prompt, logits of the last
  position only (as serve.py computes); one JSON line of timings to stdout."""
  start = time.perf_counter()
  import torch
  import transformers
  imported = time.perf_counter()
  transformers.utils.logging.disable_progress_bar()
  with open(requests_path) as f:
    request = json.loads(f.readline())
  model = transformers.LlamaForCausalLM.from_pretrained(
      model_dir, dtype=torch.float32, attn_implementation="sdpa").eval()
  input_ids = torch.tensor([request["prompt_tokens"]], dtype=torch.long)
  loaded = time.perf_counter()
  with torch.no_grad():
    forward_start = time.perf_counter()
    logits = model(input_ids, logits_to_keep=1).logits
    done = time.perf_counter()
  print(json.dumps({"import_s": imported - start, "load_s": loaded - imported,
                    "forward_s": done - forward_start, "threads": torch.get_num_threads(),
                    "first_token": int(logits[0, -1].argmax())}), flush=True)


def hf_forward_bytes(model: dict, prompt_len: int) -> int:
  """A generous estimate of the transformers forward's memory: parameters, the KV cache,
  one layer's activations (residual, norm, q/k/v/attention out, three MLP-wide tensors)
  with 2x slack. SDPA on CPU runs a fused (flash) kernel: no prompt_len^2 scores."""
  dim, mlp = model["hidden_size"], model["intermediate_size"]
  kv_width = dim // model["num_attention_heads"] * model["num_key_value_heads"]
  params = non_embedding_params(model) + dim * model["vocab_size"]
  cache = 2 * model["num_hidden_layers"] * prompt_len * kv_width
  activations = 2 * prompt_len * (6 * dim + 2 * kv_width + 3 * mlp)
  return 4 * (params + cache + activations) + 2**30  # + ~1 GiB for Python and torch


# --- the benchmark (parent process) -----------------------------------------------------

def _child_env(**extra) -> dict:
  """The environment of a child: no forced device count (serve.py sets its own), no
  compilation cache unless given (serve.py's default one would make "cold" warm)."""
  env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  flags = [f for f in env.get("XLA_FLAGS", "").split()
           if not f.startswith("--xla_force_host_platform_device_count")]
  env["XLA_FLAGS"] = " ".join(flags)
  env["RINGLM_COMPILATION_CACHE"] = "none"
  env.update(extra)
  return env


def run_child(name: str, command: list, workdir: str, env: dict | None = None) -> dict:
  """Runs `command` (cwd: the repository) timed end to end; its peak RSS from
  /usr/bin/time (else the largest of all children so far, an upper bound)."""
  rss_path = os.path.join(workdir, f"{name}.maxrss")
  wrapped = (["/usr/bin/time", "-f", "%M", "-o", rss_path] + command
             if os.path.exists("/usr/bin/time") else command)
  start = time.perf_counter()
  result = subprocess.run(wrapped, cwd=ROOT, env=env or _child_env(), capture_output=True,
                          text=True)
  elapsed = time.perf_counter() - start
  try:
    with open(rss_path) as f:
      peak = int(f.read().split()[-1]) * 1024  # kB; a failed command's note comes first
  except (OSError, ValueError, IndexError):
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
  return {"name": name, "returncode": result.returncode, "end_to_end_s": elapsed,
          "peak_rss_bytes": peak, "stdout": result.stdout, "stderr": result.stderr}


def _last_json(text: str) -> dict:
  lines = [line for line in text.splitlines() if line.strip()]
  return json.loads(lines[-1])


def _check(run: dict) -> None:
  if run["returncode"] != 0:
    raise RuntimeError(f"{run['name']} exited with {run['returncode']}:\n"
                       f"{run['stderr'][-3000:]}")


def _prefill_s(report: dict):
  """serve.py's prefill seconds (transformers' child reports them too), else derived."""
  if report.get("prefill_s") is not None:
    return report["prefill_s"]
  if report.get("prefill_tokens_per_s"):
    return report["prompt_tokens"] / report["prefill_tokens_per_s"]
  return None


def _read_jsonl(path: str) -> list:
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def write_requests(path: str, count: int, length: int, max_tokens: int, vocab: int,
                   seed: int = 0) -> list:
  import numpy as np
  rng = np.random.default_rng(seed)
  prompts = rng.integers(3, vocab, (count, length)).tolist()
  with open(path, "w") as f:
    for i, prompt in enumerate(prompts):
      f.write(json.dumps({"id": i, "prompt_tokens": prompt, "max_tokens": max_tokens,
                          "temperature": 0}) + "\n")
  return prompts


def build_model(hf_dir: str, model: dict) -> int:
  """A random LlamaForCausalLM (transformers' default init, seed 0) saved as safetensors;
  no EOS token, so generation always runs to max_tokens. Returns its parameter count."""
  import torch
  import transformers
  transformers.utils.logging.disable_progress_bar()
  torch.manual_seed(0)
  config = transformers.LlamaConfig(**model, dtype="float32", tie_word_embeddings=False,
                                    eos_token_id=None)
  hf_model = transformers.LlamaForCausalLM(config).eval()
  hf_model.generation_config.eos_token_id = None
  hf_model.save_pretrained(hf_dir, safe_serialization=True)
  return sum(p.numel() for p in hf_model.parameters())


def compare_tokens(reference_rows: list, rows: list) -> dict:
  """Row-by-row equality of greedy tokens (by id), and how far each row agrees."""
  theirs_by_id = {row["id"]: row for row in rows}
  mismatches, agreed, total = [], 0, 0
  for row in reference_rows:
    theirs = theirs_by_id.get(row["id"], {}).get("tokens") or []
    position = next((i for i, (a, b) in enumerate(zip(row["tokens"], theirs)) if a != b),
                    min(len(row["tokens"]), len(theirs)))
    agreed, total = agreed + position, total + len(row["tokens"])
    if theirs != row["tokens"]:
      mismatches.append({"id": row["id"], "first_mismatch": position,
                         "reference_len": len(row["tokens"]), "len": len(theirs)})
  first = min(mismatches, key=lambda m: m["first_mismatch"], default=None)
  return {"rows": len(reference_rows), "mismatched_rows": len(mismatches),
          "match": not mismatches, "first_mismatch": first, "mismatches": mismatches,
          # tokens before each row's first difference, over all tokens
          "agreement": agreed / max(total, 1)}


def run_ringlm(name, checkpoint, requests, out, workdir, serve_args, cpu_devices, env):
  """serve.py's batch mode; cpu_devices=None: its own choice, as a user's command."""
  devices = [f"--cpu_devices={cpu_devices}"] if cpu_devices else []
  command = [sys.executable, "serve.py", f"--checkpoint={checkpoint}", f"--input={requests}",
             f"--output={out}", *devices, *serve_args]
  run = run_child(name, command, workdir, env)
  _check(run)
  run["report"] = _last_json(run["stderr"])
  run["command"] = command
  if run["report"].get("errors"):
    raise RuntimeError(f"{name}: {run['report']['errors']} request(s) failed; see {out}")
  return run


def run_transformers(name, args, requests, workdir, dtype):
  out = os.path.join(workdir, f"{name}-results.jsonl")
  run = run_child(name, [sys.executable, "-m", "bench.decode", "--hf_generate", args.hf_dir,
                         requests, out, dtype], workdir)
  _check(run)
  run["report"] = _last_json(run["stdout"])
  return run, _read_jsonl(out)


def _measure(run, rows, model, prompt_lens, peak, bandwidth, weight_bytes, cache_dtype):
  """Decode-phase figures of a run: FLOP/s against the matmul peak of its compute dtype
  (`peak`: {"float32", "bfloat16"} -> FLOP/s; int8 runs count as bf16), bytes read against
  the memory bandwidth (the roofline), tokens/s; the stdout/stderr dropped."""
  generated = [len(row["tokens"]) for row in rows]
  flops = decode_flops(model, prompt_lens, generated)
  nbytes = decode_bytes(model, prompt_lens, generated, weight_bytes, cache_dtype)
  decode_tokens = sum(max(g - 1, 0) for g in generated)
  report = run["report"]
  decode_s = report.get("decode_s") or decode_tokens / report["decode_tokens_per_s"]
  peak = peak["float32" if weight_bytes == 4 else "bfloat16"]  # the compute dtype's
  run.update(generated_tokens=sum(generated), decode_s=decode_s, decode_flops=flops,
             decode_flops_per_s=flops / decode_s,
             decode_percent_of_peak=100 * flops / decode_s / peak,
             decode_bytes=nbytes, decode_percent_of_roofline=100 * nbytes / decode_s / bandwidth,
             decode_tokens_per_s=decode_tokens / decode_s,
             prefill_s=_prefill_s(report), compile_s=report.get("compile_s"),
             load_s=report.get("load_s"), start_s=report.get("start_s", report.get("import_s")))
  run.pop("stdout", None)
  run.pop("stderr", None)
  print(f"  {run['name']:<20} {run['end_to_end_s']:7.2f} s end to end, decode "
        f"{decode_s:6.2f} s ({run['decode_percent_of_roofline']:4.1f}% of the memory roofline)",
        flush=True)


def decode_case(args, workdir, model, peak, bandwidth) -> dict:
  """32 x 128 -> 128 (or --quick's sizes): transformers fp32 and bf16, then ringlm in each
  precision of --variants, cold and warm."""
  requests = os.path.join(workdir, "requests.jsonl")
  prompts = write_requests(requests, args.prompts, args.prompt_len, args.new_tokens,
                           model["vocab_size"])
  prompt_lens = [len(p) for p in prompts]
  runs, rows = {}, {}
  print(f"{args.prompts} x {args.prompt_len} -> {args.new_tokens}", flush=True)
  for dtype, tag in (("float32", "fp32"), ("bfloat16", "bf16")):
    name = f"transformers_{tag}"
    runs[name], rows[name] = run_transformers(name, args, requests, workdir, dtype)
    _measure(runs[name], rows[name], model, prompt_lens, peak, bandwidth,
             4 if tag == "fp32" else 2, "float32" if tag == "fp32" else "bfloat16")

  for variant in args.variants:
    flags, weight_bytes, cache_dtype = VARIANTS[variant]
    cache = os.path.join(workdir, f"jax-cache-{variant}")
    os.makedirs(cache)
    env = _child_env(RINGLM_COMPILATION_CACHE=cache)
    for when in ("cold", "warm"):
      name = f"ringlm_{variant}_{when}"
      out = os.path.join(workdir, f"{name}-results.jsonl")
      runs[name] = run_ringlm(name, args.ringlm_dir, requests, out, workdir,
                              flags + shlex.split(args.serve_args), None, env)
      rows[name] = _read_jsonl(out)
      _measure(runs[name], rows[name], model, prompt_lens, peak, bandwidth, weight_bytes,
               cache_dtype)

  reference = "ringlm_fp32_warm" if "fp32" in args.variants else None
  tokens = {}
  for name in rows:
    if name.startswith("ringlm_"):
      tokens[name] = compare_tokens(rows["transformers_fp32"], rows[name])
      if reference and name != reference:
        tokens[name]["vs_ringlm_fp32"] = compare_tokens(rows[reference], rows[name])
  tokens["transformers_bf16"] = compare_tokens(rows["transformers_fp32"],
                                               rows["transformers_bf16"])
  return {"runs": runs, "tokens": tokens, "prompt_len": args.prompt_len,
          "prompts": args.prompts, "new_tokens": args.new_tokens,
          "memory_bandwidth_bytes_per_s": bandwidth}


def long_decode_case(args, workdir, model, peak, bandwidth) -> dict:
  """One --long_decode_len-token prompt -> 128 new tokens: the cache dominates what a
  step reads. ringlm bf16 and int8+kv8 on one device against transformers bf16."""
  length, new = args.long_decode_len, 128
  requests = os.path.join(workdir, "long-decode.jsonl")
  write_requests(requests, 1, length, new, model["vocab_size"], seed=2)
  runs = {}
  print(f"one {length}-token prompt -> {new}", flush=True)
  name = "transformers_bf16"
  runs[name], hf_rows = run_transformers(f"long_{name}", args, requests, workdir, "bfloat16")
  _measure(runs[name], hf_rows, model, [length], peak, bandwidth, 2, "bfloat16")
  one_device = ["--config.serve.cache_sharding=batch", f"--config.serve.long_context={2 * length}"]
  for variant in ("bf16", "int8_kv8"):
    flags, weight_bytes, cache_dtype = VARIANTS[variant]
    name = f"ringlm_{variant}"
    out = os.path.join(workdir, f"long-{name}.jsonl")
    runs[name] = run_ringlm(f"long_{name}", args.ringlm_dir, requests, out, workdir,
                            flags + one_device + shlex.split(args.serve_args), None,
                            _child_env())
    _measure(runs[name], _read_jsonl(out), model, [length], peak, bandwidth, weight_bytes,
             cache_dtype)
    runs[name]["cache_bytes"] = cache_bytes_per_token(model, cache_dtype) * (length + new)
  return {"prompt_len": length, "new_tokens": new, "runs": runs}


def long_case(args, workdir, model, peak) -> dict:
  """One 16K-token prompt, max_tokens 1: ringlm on 8 devices (sequence-sharded cache)
  against a transformers SDPA forward, both float32 (`peak`: the float32 matmul's)."""
  length = args.long_len
  requests = os.path.join(workdir, "long-request.jsonl")
  write_requests(requests, 1, length, 1, model["vocab_size"], seed=1)
  flops = prefill_flops(model, length)
  rows = {}
  print(f"{length}-token prompt: serve.py --cpu_devices=8 --config.serve.cache_sharding=sequence "
        "--config.serve.dtype=float32", flush=True)
  out = os.path.join(workdir, "long-ringlm.jsonl")
  try:
    run = run_ringlm("long_ringlm", args.ringlm_dir, requests, out, workdir,
                     shlex.split(args.serve_args) + ["--config.serve.cache_sharding=sequence",
                                                     # transformers' forward is float32
                                                     "--config.serve.dtype=float32"],
                     8, _child_env())
    report = run["report"]
    run.update(prefill_s=_prefill_s(report), compile_s=report.get("compile_s"),
               first_token=(_read_jsonl(out)[0]["tokens"] or [None])[0])
    del run["stdout"], run["stderr"]
  except (RuntimeError, ValueError, KeyError, IndexError) as error:
    run = {"name": "long_ringlm", "error": str(error)[-3000:]}
  rows["ringlm"] = run

  estimate = hf_forward_bytes(model, length)
  if estimate > args.hf_memory_limit_gib * 2**30:
    rows["transformers"] = {"name": "long_transformers", "estimated_bytes": estimate,
                            "skipped": f"needs ~{estimate / 2**30:.1f} GiB > "
                                       f"{args.hf_memory_limit_gib:.0f} GiB"}
  else:
    print(f"{length}-token prompt: transformers forward (SDPA)", flush=True)
    run = run_child("long_transformers", [sys.executable, "-m", "bench.decode", "--hf_forward",
                                          args.hf_dir, requests], workdir)
    try:
      _check(run)
      report = _last_json(run["stdout"])
      run.update(report=report, prefill_s=report["forward_s"], estimated_bytes=estimate,
                 first_token=report["first_token"])
      del run["stdout"], run["stderr"]
    except (RuntimeError, ValueError, KeyError) as error:
      run = {"name": "long_transformers", "error": str(error)[-3000:]}
    rows["transformers"] = run
  for run in rows.values():
    if run.get("prefill_s"):
      run.update(prefill_flops=flops, prefill_flops_per_s=flops / run["prefill_s"],
                 prefill_percent_of_peak=100 * flops / run["prefill_s"] / peak)
      print(f"  {run['name']:<18} prefill {run['prefill_s']:7.1f} s "
            f"({run['prefill_percent_of_peak']:4.1f}% of peak), end to end "
            f"{run['end_to_end_s']:7.1f} s, peak RSS {run['peak_rss_bytes'] / 2**30:.2f} GiB",
            flush=True)
  first = [rows[side].get("first_token") for side in ("ringlm", "transformers")]
  return {"prompt_len": length, "rows": rows,
          "first_token_match": first[0] == first[1] if None not in first else None}


def summarize(decode: dict) -> dict:
  runs = decode["runs"]
  hf_bf16 = runs["transformers_bf16"]
  summary = {"targets": {"speedup_warm": SPEEDUP_TARGET_WARM,
                         "speedup_cold": SPEEDUP_TARGET_COLD,
                         "roofline_percent": ROOFLINE_TARGET_PERCENT,
                         "int8_decode_speedup": INT8_DECODE_TARGET}}
  if "ringlm_bf16_warm" in runs:
    summary.update(
        speedup_warm=hf_bf16["end_to_end_s"] / runs["ringlm_bf16_warm"]["end_to_end_s"],
        speedup_cold=hf_bf16["end_to_end_s"] / runs["ringlm_bf16_cold"]["end_to_end_s"],
        bf16_decode_percent_of_roofline=runs["ringlm_bf16_warm"]["decode_percent_of_roofline"],
        # the roofline proper: the larger of the memory and the compute bound (the time at
        # the bandwidth, the time at the matmul peak), as a fraction of the decode's time
        bf16_decode_percent_of_bound=max(runs["ringlm_bf16_warm"]["decode_percent_of_roofline"],
                                         runs["ringlm_bf16_warm"]["decode_percent_of_peak"]))
  if "ringlm_int8_kv8_warm" in runs:
    summary["int8_kv8_decode_speedup"] = (hf_bf16["decode_s"] /
                                          runs["ringlm_int8_kv8_warm"]["decode_s"])
  if "ringlm_fp32_warm" in decode["tokens"]:
    summary["fp32_tokens_match_transformers"] = decode["tokens"]["ringlm_fp32_warm"]["match"]
  return summary


def _gib(run, key="peak_rss_bytes"):
  return f"{run[key] / 2**30:.2f}" if run.get(key) is not None else ""


def _s(value):
  return f"{value:.2f}" if value is not None else ""


def _row(label, run):
  return (f"| {label} | {run['end_to_end_s']:.2f} | {_s(run.get('start_s'))} | "
          f"{_s(run.get('load_s'))} | {_s(run.get('compile_s'))} | {_s(run.get('prefill_s'))} | "
          f"{run['decode_s']:.2f} | {run['decode_tokens_per_s']:.0f} | "
          f"{run['decode_percent_of_roofline']:.1f} | {run['decode_percent_of_peak']:.1f} | "
          f"{_gib(run)} |")


HEADER = ["| side | end-to-end s | start s | load s | compile s | prefill s | decode s "
          "| decode tok/s | % of memory roofline | % of matmul peak | peak RSS GiB |",
          "|---|---|---|---|---|---|---|---|---|---|---|"]


def format_table(result, peak) -> str:
  decode, summary = result["decode"], result["summary"]
  bandwidth = decode["memory_bandwidth_bytes_per_s"]
  lines = [f"matmul peak (measured, one device): float32 {peak['float32'] / 1e9:.1f}, bfloat16 "
           f"{peak['bfloat16'] / 1e9:.1f} GFLOP/s (a run's % is of its compute dtype's); "
           f"memory bandwidth {bandwidth / 1e9:.1f} GB/s", "",
           f"{decode['prompts']} prompts x {decode['prompt_len']} tokens -> "
           f"{decode['new_tokens']} new tokens each, greedy", "", *HEADER]
  for name, run in decode["runs"].items():
    lines.append(_row(name.replace("_", " "), run))
  targets = summary["targets"]
  lines.append("")
  if "speedup_warm" in summary:
    memory, bound = (summary["bf16_decode_percent_of_roofline"],
                     summary["bf16_decode_percent_of_bound"])
    lines += [f"ringlm bf16 against transformers bf16, end to end: warm "
              f"{summary['speedup_warm']:.2f}x (target >= {targets['speedup_warm']}x), cold "
              f"{summary['speedup_cold']:.2f}x (target >= {targets['speedup_cold']}x)",
              f"ringlm bf16 decode: {memory:.1f}% of the memory roofline (target >= "
              f"{targets['roofline_percent']:.0f}%); {bound:.1f}% of the roofline (the larger "
              f"of the memory and the matmul-peak bounds: "
              f"{'compute' if bound > memory else 'memory'} here)"]
  if "int8_kv8_decode_speedup" in summary:
    lines.append(f"ringlm int8 weights + int8 cache decode against transformers bf16's: "
                 f"{summary['int8_kv8_decode_speedup']:.2f}x (target >= "
                 f"{targets['int8_decode_speedup']}x)")
  for name, tokens in decode["tokens"].items():
    first = tokens["first_mismatch"]
    where = (f", first at row {first['id']} position {first['first_mismatch']}"
             if first else "")
    line = (f"greedy tokens, {name.replace('_', ' ')} vs transformers fp32: "
            f"{tokens['rows'] - tokens['mismatched_rows']}/{tokens['rows']} rows identical"
            f"{where}; {100 * tokens['agreement']:.0f}% of tokens before a row differs")
    if "vs_ringlm_fp32" in tokens:
      line += (f"; vs ringlm fp32: {100 * tokens['vs_ringlm_fp32']['agreement']:.0f}%")
    lines.append(line)
  long_decode = result.get("long_decode")
  if long_decode:
    lines += ["", f"one {long_decode['prompt_len']}-token prompt -> "
                  f"{long_decode['new_tokens']} new tokens (the cache dominates)", "", *HEADER]
    for name, run in long_decode["runs"].items():
      cache = (f" (cache {run['cache_bytes'] / 2**20:.0f} MiB)" if "cache_bytes" in run else "")
      lines.append(_row(name.replace("_", " ") + cache, run))
  long = result.get("long")
  if long:
    lines += ["", f"one {long['prompt_len']}-token prompt, max_tokens 1", "",
              "| side | end-to-end s | compile s | prefill s | prefill GFLOP/s | % of peak "
              "| peak RSS GiB |", "|---|---|---|---|---|---|---|"]
    labels = {"ringlm": "ringlm (8 devices, sequence)", "transformers": "transformers (SDPA)"}
    for side, run in long["rows"].items():
      if not run.get("prefill_s"):
        why = run.get("skipped") or f"failed: {run.get('error', '')[-200:]}"
        lines.append(f"| {labels[side]} | {' '.join(why.split())} | | | | | |")
        continue
      lines.append(f"| {labels[side]} | {run['end_to_end_s']:.2f} | {_s(run.get('compile_s'))} | "
                   f"{run['prefill_s']:.2f} | {run['prefill_flops_per_s'] / 1e9:.1f} | "
                   f"{run['prefill_percent_of_peak']:.1f} | {_gib(run)} |")
    if long["first_token_match"] is not None:
      lines.append(f"\nnext token after the prompt identical: {long['first_token_match']}")
  return "\n".join(lines)


def main(argv=None):
  argv = sys.argv[1:] if argv is None else argv
  if argv[:1] == ["--hf_generate"] and len(argv) in (4, 5):  # a child process (see above)
    return hf_generate(*argv[1:])
  if argv[:1] == ["--hf_forward"] and len(argv) == 3:
    return hf_forward(*argv[1:])
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--quick", action="store_true",
                      help="4 prompts x 16 tokens -> 8 new, 2 layers, no 16K case")
  parser.add_argument("--prompts", type=int, default=32)
  parser.add_argument("--prompt_len", type=int, default=128)
  parser.add_argument("--new_tokens", type=int, default=128)
  parser.add_argument("--layers", type=int, default=MODEL["num_hidden_layers"])
  parser.add_argument("--long_len", type=int, default=16384,
                      help="the long-prefill case's length (0: skip it)")
  parser.add_argument("--long_decode_len", type=int, default=8192,
                      help="the long-decode case's prompt length (0: skip it)")
  parser.add_argument("--variants", default=",".join(VARIANTS),
                      help=f"ringlm precisions to run, of {','.join(VARIANTS)}")
  parser.add_argument("--serve_args", default="",
                      help="extra serve.py flags, e.g. '--config.serve.decode_chunk=64'")
  parser.add_argument("--hf_memory_limit_gib", type=float, default=20.0,
                      help="skip the transformers 16K forward when its estimate exceeds this")
  parser.add_argument("--peak_size", type=int, default=4096, help="matmul size of the peak")
  parser.add_argument("--workdir", default=None,
                      help="keep the models, requests and results here (must be new or empty)")
  parser.add_argument("--out", default=None, help="JSON path (default bench/results/...)")
  args = parser.parse_args(argv)
  args.variants = [v for v in args.variants.split(",") if v]
  unknown = sorted(set(args.variants) - set(VARIANTS))
  if unknown:
    parser.error(f"--variants: unknown {unknown}; choose from {','.join(VARIANTS)}")
  if args.quick:
    args.prompts, args.prompt_len, args.new_tokens = 4, 16, 8
    args.layers, args.long_len, args.peak_size = 2, 0, 2048
    args.long_decode_len = 0
  model = dict(MODEL, num_hidden_layers=args.layers)

  if args.workdir:
    if os.path.isdir(args.workdir) and os.listdir(args.workdir):
      parser.error(f"--workdir={args.workdir} is not empty")
    os.makedirs(args.workdir, exist_ok=True)
    workdir, cleanup = os.path.abspath(args.workdir), None
  else:
    cleanup = tempfile.TemporaryDirectory(prefix="bench-decode-")
    workdir = cleanup.name
  args.hf_dir, args.ringlm_dir = os.path.join(workdir, "hf"), os.path.join(workdir, "ringlm")
  try:
    print(f"model: {model} (random, seed 0) in {workdir}", flush=True)
    params = build_model(args.hf_dir, model)
    convert = run_child("convert", [sys.executable, "-m", "tools.convert_hf",
                                    f"--hf_dir={args.hf_dir}", f"--out={args.ringlm_dir}"],
                        workdir)
    _check(convert)
    print(f"  {params / 1e6:.1f}M parameters, converted in {convert['end_to_end_s']:.1f} s",
          flush=True)

    import jax
    jax.config.update("jax_num_cpu_devices", 1)
    from bench.common import machine, matmul_peak, memory_bandwidth, write_json
    from parallel.mesh import make_mesh
    one = make_mesh({"data": 1}, devices=jax.devices()[:1])
    # bf16 x bf16 -> f32 runs ~4x float32's on AMX: each run against its compute dtype's
    peaks = {name: matmul_peak(one, size=args.peak_size, dtype=name) for name in
             ("float32", "bfloat16")}
    peak = {name: value["peak_flops"] for name, value in peaks.items()}
    bandwidth = memory_bandwidth()
    print(f"matmul peak: float32 {peak['float32'] / 1e9:.1f}, bfloat16 "
          f"{peak['bfloat16'] / 1e9:.1f} GFLOP/s; memory bandwidth {bandwidth / 1e9:.1f} GB/s",
          flush=True)

    result = {"decode": decode_case(args, workdir, model, peak, bandwidth)}
    result["summary"] = summarize(result["decode"])
    if args.long_decode_len:
      result["long_decode"] = long_decode_case(args, workdir, model, peak, bandwidth)
    if args.long_len:
      result["long"] = long_case(args, workdir, model, peak["float32"])
  finally:
    if cleanup is not None:
      cleanup.cleanup()
  table = format_table(result, peak)
  print("\n" + table)
  stamp = datetime.date.today().isoformat()
  out = args.out or os.path.join("bench", "results", f"decode-{stamp}-{socket.gethostname()}"
                                 f"{'-quick' if args.quick else ''}.json")
  args_dict = {k: v for k, v in vars(args).items() if k not in ("hf_dir", "ringlm_dir")}
  write_json(out, {"benchmark": "decode", "machine": machine(), "matmul": peaks,
                   "args": args_dict,
                   "model": dict(model, params=params,
                                 non_embedding_params=non_embedding_params(model)),
                   "convert_s": convert["end_to_end_s"], **result, "table": table})


if __name__ == "__main__":
  sys.exit(main())
