"""Batch decoding, end to end: serve.py against transformers' generate on the same model.

  python -m bench.decode                # 32 prompts x 128 tokens -> 128 new, + a 16K prompt
  python -m bench.decode --quick        # 4 x 16 -> 8 new, 2 layers, no 16K case (a smoke run)

A random Llama-shaped model (transformers' default init, seed 0; 512 wide, 8 layers,
8 heads / 4 KV heads, MLP 1536, vocabulary 32000, ~58M parameters, float32, no EOS
token so that every row generates exactly max_tokens) is saved with save_pretrained
and converted with tools/convert_hf.py. Each side then runs as its own fresh process,
timed around the subprocess (start-up, imports, loading and compilation included):
  transformers  LlamaForCausalLM.generate, greedy, torch's default thread count
                (`python -m bench.decode --hf_generate DIR REQUESTS OUT`)
  ringlm cold   serve.py --cpu_devices=1, empty persistent compilation cache
  ringlm warm   the same, reusing that cache (RINGLM_COMPILATION_CACHE)
Greedy tokens are compared row by row (fp32 argmax ties can flip; reported, not hidden).
Decode FLOP/s are given as % of the matmul peak measured in the same run on one device,
next to the most the memory bandwidth allows (the roofline: the bytes decode must read,
weights once a step and every row's keys and values, at the bandwidth of a large sum).
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
SPEEDUP_TARGET = 1.25          # transformers end-to-end s / ringlm end-to-end s
DECODE_TARGET_PERCENT = 60.0   # ringlm decode FLOP/s as % of the measured matmul peak
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


def decode_bytes(model: dict, prompt_lens: list, generated: list) -> float:
  """Bytes the decode phase reads at the least, in fp32: each step (the rows decode
  together) reads the non-embedding weights once, and each row its keys and values:

    4 * non_embedding_params * max(generated - 1)
      + sum over rows and steps s: 4 * 2 * layers * kv_heads * head_dim * (prompt_len + s)
  """
  head_dim = model["hidden_size"] // model["num_attention_heads"]
  per_slot = 4 * 2 * model["num_hidden_layers"] * model["num_key_value_heads"] * head_dim
  steps = max((count - 1 for count in generated), default=0)
  total = 4.0 * non_embedding_params(model) * max(steps, 0)
  for prompt_len, count in zip(prompt_lens, generated):
    rows_steps = max(count - 1, 0)
    total += per_slot * (rows_steps * prompt_len + rows_steps * (rows_steps + 1) // 2)
  return total


def prefill_flops(model: dict, prompt_len: int) -> float:
  """2 * non-embedding params per token + causal attention: 4*L*H*D * sum_t (t + 1)."""
  return (2 * non_embedding_params(model) * prompt_len
          + 4 * model["num_hidden_layers"] * model["hidden_size"] * prompt_len * (prompt_len + 1) // 2)


# --- the transformers side (child processes) --------------------------------------------

def hf_generate(model_dir: str, requests_path: str, out_path: str) -> None:
  """Greedy generate of every request in one batch; JSONL {id, tokens} to out_path and
  one JSON line of timings to stdout."""
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
  model = transformers.LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
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
  compilation cache unless given."""
  env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  flags = [f for f in env.get("XLA_FLAGS", "").split()
           if not f.startswith("--xla_force_host_platform_device_count")]
  env["XLA_FLAGS"] = " ".join(flags)
  env.pop("RINGLM_COMPILATION_CACHE", None)
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


def compare_tokens(hf_rows: list, ringlm_rows: list) -> dict:
  """Row-by-row equality of greedy tokens (by id)."""
  ringlm = {row["id"]: row for row in ringlm_rows}
  mismatches = []
  for row in hf_rows:
    theirs = ringlm.get(row["id"], {}).get("tokens") or []
    if theirs != row["tokens"]:
      position = next((i for i, (a, b) in enumerate(zip(row["tokens"], theirs)) if a != b),
                      min(len(row["tokens"]), len(theirs)))
      mismatches.append({"id": row["id"], "first_mismatch": position,
                         "hf_len": len(row["tokens"]), "ringlm_len": len(theirs)})
  first = min(mismatches, key=lambda m: m["first_mismatch"], default=None)
  return {"rows": len(hf_rows), "mismatched_rows": len(mismatches), "match": not mismatches,
          "first_mismatch": first, "mismatches": mismatches}


def run_ringlm(name, checkpoint, requests, out, workdir, serve_args, cpu_devices, env):
  command = [sys.executable, "serve.py", f"--checkpoint={checkpoint}", f"--input={requests}",
             f"--output={out}", f"--cpu_devices={cpu_devices}", *serve_args]
  run = run_child(name, command, workdir, env)
  _check(run)
  run["report"] = _last_json(run["stderr"])
  run["command"] = command
  if run["report"].get("errors"):
    raise RuntimeError(f"{name}: {run['report']['errors']} request(s) failed; see {out}")
  return run


def decode_case(args, workdir, model, peak, bandwidth) -> dict:
  """32 x 128 -> 128 (or --quick's sizes): transformers, ringlm cold, ringlm warm."""
  requests = os.path.join(workdir, "requests.jsonl")
  prompts = write_requests(requests, args.prompts, args.prompt_len, args.new_tokens,
                           model["vocab_size"])
  runs = {}
  print(f"transformers generate ({args.prompts} x {args.prompt_len} -> {args.new_tokens})",
        flush=True)
  hf_out = os.path.join(workdir, "hf-results.jsonl")
  hf = run_child("transformers", [sys.executable, "-m", "bench.decode", "--hf_generate",
                                  args.hf_dir, requests, hf_out], workdir)
  _check(hf)
  hf["report"] = _last_json(hf["stdout"])
  runs["transformers"] = hf
  hf_rows = _read_jsonl(hf_out)

  cache = os.path.join(workdir, "jax-cache")
  shutil.rmtree(cache, ignore_errors=True)
  os.makedirs(cache)
  env = _child_env(RINGLM_COMPILATION_CACHE=cache)
  ringlm_rows = {}
  for name in ("ringlm_cold", "ringlm_warm"):
    print(f"{name.replace('_', ' ')}: serve.py --cpu_devices=1", flush=True)
    out = os.path.join(workdir, f"{name}-results.jsonl")
    runs[name] = run_ringlm(name, args.ringlm_dir, requests, out, workdir,
                            shlex.split(args.serve_args), 1, env)
    ringlm_rows[name] = _read_jsonl(out)
  runs["ringlm_warm"]["cache_entries"] = len(os.listdir(cache))

  prompt_lens = [len(p) for p in prompts]
  for name, run in runs.items():
    rows = hf_rows if name == "transformers" else ringlm_rows[name]
    generated = [len(row["tokens"]) for row in rows]
    flops = decode_flops(model, prompt_lens, generated)
    decode_tokens = sum(max(g - 1, 0) for g in generated)
    report = run["report"]
    decode_s = report.get("decode_s") or decode_tokens / report["decode_tokens_per_s"]
    run.update(generated_tokens=sum(generated), decode_s=decode_s, decode_flops=flops,
               decode_flops_per_s=flops / decode_s,
               decode_percent_of_peak=100 * flops / decode_s / peak,
               decode_tokens_per_s=decode_tokens / decode_s,
               prefill_s=_prefill_s(report), compile_s=report.get("compile_s"))
    del run["stdout"], run["stderr"]
    print(f"  {name:<13} {run['end_to_end_s']:7.1f} s end to end, decode "
          f"{run['decode_flops_per_s'] / 1e9:6.1f} GFLOP/s "
          f"({run['decode_percent_of_peak']:4.1f}% of peak)", flush=True)
  tokens = {name: compare_tokens(hf_rows, ringlm_rows[name]) for name in ringlm_rows}
  # The roofline: decode cannot run faster than its bytes stream from memory.
  generated = [len(row["tokens"]) for row in hf_rows]
  flops, nbytes = decode_flops(model, prompt_lens, generated), decode_bytes(
      model, prompt_lens, generated)
  attainable = min(peak, flops / (nbytes / bandwidth))
  roofline = {"memory_bandwidth_bytes_per_s": bandwidth, "decode_bytes": nbytes,
              "decode_flops": flops, "flops_per_byte": flops / nbytes,
              "attainable_percent_of_peak": 100 * attainable / peak}
  return {"runs": runs, "tokens": tokens, "prompt_len": args.prompt_len,
          "prompts": args.prompts, "new_tokens": args.new_tokens, "roofline": roofline}


def long_case(args, workdir, model, peak) -> dict:
  """One 16K-token prompt, max_tokens 1: ringlm on 8 devices (sequence-sharded cache)
  against a transformers SDPA forward."""
  length = args.long_len
  requests = os.path.join(workdir, "long-request.jsonl")
  write_requests(requests, 1, length, 1, model["vocab_size"], seed=1)
  flops = prefill_flops(model, length)
  rows = {}
  print(f"{length}-token prompt: serve.py --cpu_devices=8 --config.serve.cache_sharding=sequence",
        flush=True)
  out = os.path.join(workdir, "long-ringlm.jsonl")
  try:
    run = run_ringlm("long_ringlm", args.ringlm_dir, requests, out, workdir,
                     shlex.split(args.serve_args) + ["--config.serve.cache_sharding=sequence"],
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
  hf = runs["transformers"]["end_to_end_s"]
  return {"speedup_cold": hf / runs["ringlm_cold"]["end_to_end_s"],
          "speedup_warm": hf / runs["ringlm_warm"]["end_to_end_s"],
          "speedup_target": SPEEDUP_TARGET,
          "ringlm_decode_percent_of_peak_warm": runs["ringlm_warm"]["decode_percent_of_peak"],
          "ringlm_decode_percent_of_peak_cold": runs["ringlm_cold"]["decode_percent_of_peak"],
          "decode_target_percent": DECODE_TARGET_PERCENT,
          "tokens_match": all(t["match"] for t in decode["tokens"].values())}


def _gib(run, key="peak_rss_bytes"):
  return f"{run[key] / 2**30:.2f}" if run.get(key) is not None else ""


def _s(value):
  return f"{value:.2f}" if value is not None else ""


def format_table(result, peak) -> str:
  decode, summary = result["decode"], result["summary"]
  lines = [f"matmul peak (measured, one device): {peak / 1e9:.1f} GFLOP/s", "",
           f"{decode['prompts']} prompts x {decode['prompt_len']} tokens -> "
           f"{decode['new_tokens']} new tokens each, greedy", "",
           "| side | end-to-end s | compile s | prefill s | decode s | decode tok/s "
           "| decode GFLOP/s | % of peak | peak RSS GiB |", "|---|---|---|---|---|---|---|---|---|"]
  for name, run in decode["runs"].items():
    lines.append(f"| {name.replace('_', ' ')} | {run['end_to_end_s']:.2f} | {_s(run['compile_s'])} "
                 f"| {_s(run['prefill_s'])} | {run['decode_s']:.2f} | "
                 f"{run['decode_tokens_per_s']:.0f} | {run['decode_flops_per_s'] / 1e9:.1f} | "
                 f"{run['decode_percent_of_peak']:.1f} | {_gib(run)} |")
  lines += ["", f"speedup (transformers / ringlm end to end): cold {summary['speedup_cold']:.2f}x,"
                f" warm {summary['speedup_warm']:.2f}x (target >= {SPEEDUP_TARGET}x)",
            f"ringlm decode: {summary['ringlm_decode_percent_of_peak_warm']:.1f}% of peak warm, "
            f"{summary['ringlm_decode_percent_of_peak_cold']:.1f}% cold "
            f"(target >= {DECODE_TARGET_PERCENT:.0f}%)"]
  roofline = decode.get("roofline")
  if roofline:
    lines.append(f"decode roofline: {roofline['decode_bytes'] / 1e9:.1f} GB read at the least "
                 f"({roofline['flops_per_byte']:.1f} FLOP/byte) at the measured "
                 f"{roofline['memory_bandwidth_bytes_per_s'] / 1e9:.1f} GB/s allows at most "
                 f"{roofline['attainable_percent_of_peak']:.0f}% of peak")
  for name, tokens in decode["tokens"].items():
    first = tokens["first_mismatch"]
    where = (f", first at row {first['id']} position {first['first_mismatch']}"
             if first else "")
    lines.append(f"greedy tokens, {name.replace('_', ' ')} vs transformers: "
                 f"{tokens['rows'] - tokens['mismatched_rows']}/{tokens['rows']} rows identical"
                 f"{where}")
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
  if argv[:1] == ["--hf_generate"] and len(argv) == 4:  # a child process (see above)
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
                      help="the long-prompt case's length (0: skip it)")
  parser.add_argument("--serve_args", default="",
                      help="extra serve.py flags, e.g. '--config.serve.decode_chunk=64'")
  parser.add_argument("--hf_memory_limit_gib", type=float, default=20.0,
                      help="skip the transformers 16K forward when its estimate exceeds this")
  parser.add_argument("--peak_size", type=int, default=4096, help="matmul size of the peak")
  parser.add_argument("--workdir", default=None,
                      help="keep the models, requests and results here (must be new or empty)")
  parser.add_argument("--out", default=None, help="JSON path (default bench/results/...)")
  args = parser.parse_args(argv)
  if args.quick:
    args.prompts, args.prompt_len, args.new_tokens = 4, 16, 8
    args.layers, args.long_len, args.peak_size = 2, 0, 2048
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
    peaks = matmul_peak(make_mesh({"data": 1}, devices=jax.devices()[:1]), size=args.peak_size)
    peak = peaks["peak_flops"]
    bandwidth = memory_bandwidth()
    print(f"matmul peak: {peak / 1e9:.1f} GFLOP/s, memory bandwidth {bandwidth / 1e9:.1f} GB/s",
          flush=True)

    result = {"decode": decode_case(args, workdir, model, peak, bandwidth)}
    result["summary"] = summarize(result["decode"])
    if args.long_len:
      result["long"] = long_case(args, workdir, model, peak)
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
