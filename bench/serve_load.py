"""Serving under load: ringlm's HTTP server against `transformers serve
--continuous-batching` on the same converted model, one after the other in one run.

  python -m bench.serve_load            # 4 Poisson rates x 24 requests + a shared prefix
  python -m bench.serve_load --quick    # 2 layers, 8 requests per rate (a smoke run)

The model: a random Llama (transformers' default init, seed 0; 512 wide, 8 layers, 8
heads / 4 KV heads, MLP 1536) with a byte-level BPE tokenizer of 8192 tokens
trained on the standard library's sources, saved with save_pretrained and converted by
tools/convert_hf.py. Each server runs alone on the machine's cores:
  ringlm        serve.py --port --cpu_devices=1, serve.batch_size=8 decode slots,
                --config.serve.dtype=DTYPE
  transformers  transformers serve --continuous-batching --dtype DTYPE --device cpu
Both in the same precision, --dtype (default bfloat16, what serve.py serves in; until
2026-12-06 the peer ran float32 while serve.py had moved to bfloat16). On CPU ringlm holds
its bf16 KV cache as the bits (model/kv_cache.held_dtype says why).
Load: a bounded number of requests with Poisson arrivals at each rate (the same
seeded arrival times, prompts and lengths for both servers), prompts of 32-1536
tokens of Python source (log-uniform), 16-96 new tokens, greedy, streamed
(time to first token = the first text chunk; time per output token = the rest of the
stream over the other tokens). Shared prefix: one 2048-token document asked 8
questions in turn (each ~24 tokens, 16 new tokens): ringlm with and without its
prefix cache (serve.prefix_cache_mb=0), the peer as it is. Prints a table; writes JSON
and the table to bench/results.
"""

import argparse
import asyncio
import datetime
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np

from bench.decode import MODEL, ROOT, _check, _child_env, build_model, run_child

THROUGHPUT_TARGET = 1.5   # ringlm output tokens/s / the peer's, at the highest rate
PREFIX_TARGET = 3.0       # shared prefix: ringlm TTFT without / with the prefix cache
VOCAB = 8192


# --- the model and its tokenizer ---------------------------------------------------------

def build_tokenizer(hf_dir: str, text: str) -> None:
  """A byte-level BPE of VOCAB tokens trained on `text`, saved as a fast tokenizer
  (tokenizer.json + tokenizer_config.json) that both servers read."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  tokenizer = Tokenizer(models.BPE())
  tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tokenizer.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<|eos|>"],
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tokenizer.train_from_iterator([text], trainer)
  tokenizer.save(os.path.join(hf_dir, "tokenizer.json"))
  with open(os.path.join(hf_dir, "tokenizer_config.json"), "w") as f:
    json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|eos|>",
               "model_max_length": MODEL["max_position_embeddings"]}, f)


def corpus_text(megabytes: float = 4.0) -> str:
  from data import pipeline
  text, size = [], 0
  for path in pipeline.default_corpus():
    with open(path, encoding="utf-8", errors="replace") as f:
      part = f.read()
    text.append(part)
    size += len(part)
    if size > megabytes * 1e6:
      break
  return "\n".join(text)


# --- workloads ----------------------------------------------------------------------------

def prompt_of(tokenizer, ids, start: int, length: int) -> str:
  return tokenizer.decode(ids[start:start + length])


def workloads(tokenizer, text: str, rates, count: int, seed: int = 0) -> dict:
  """{"rate R": [(arrival_s, prompt, max_tokens)], "prefix": [(0, prompt, 16)]}."""
  ids = tokenizer.encode(text).ids
  rng = np.random.default_rng(seed)
  loads = {}
  for rate in rates:
    arrivals = np.cumsum(rng.exponential(1 / rate, count))
    arrivals -= arrivals[0]
    requests = []
    for arrival in arrivals:
      length = int(np.exp(rng.uniform(np.log(32), np.log(1536))))
      start = int(rng.integers(0, len(ids) - length))
      requests.append((float(arrival), prompt_of(tokenizer, ids, start, length),
                       int(rng.integers(16, 97))))
    loads[f"{rate:g} req/s"] = requests
  start = int(rng.integers(0, len(ids) - 4096))
  document = prompt_of(tokenizer, ids, start, 2048)
  questions = [f"\n# Question {i}: what does the function above return for input {i}?\n"
               for i in range(8)]
  loads["shared prefix"] = [(0.0, document + q, 16) for q in questions]
  return loads


# --- servers ---------------------------------------------------------------------------------

def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


class Server:
  """A server process on a free port; ready when /health answers 200."""

  def __init__(self, name: str, command: list, port: int, workdir: str, env=None):
    self.name, self.port, self.url = name, port, f"http://127.0.0.1:{port}"
    self.log_path = os.path.join(workdir, f"{name}.log")
    self.log = open(self.log_path, "w")
    self.started = time.perf_counter()
    self.process = subprocess.Popen(command, cwd=ROOT, stdout=self.log,
                                    stderr=subprocess.STDOUT, env=env or _child_env())

  def wait_ready(self, timeout: float = 1200) -> float:
    import httpx2
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
      if self.process.poll() is not None:
        raise RuntimeError(f"{self.name} exited: {open(self.log_path).read()[-3000:]}")
      try:
        if httpx2.get(self.url + "/health", timeout=2).status_code == 200:
          return time.perf_counter() - self.started
      except httpx2.HTTPError:
        pass
      time.sleep(0.5)
    raise RuntimeError(f"{self.name} not ready after {timeout} s")

  def stop(self) -> int:
    if self.process.poll() is None:
      self.process.send_signal(signal.SIGTERM)
      try:
        return self.process.wait(60)
      except subprocess.TimeoutExpired:
        self.process.kill()
    return self.process.wait()


async def one_request(client, url, model, arrival, prompt, max_tokens, t0):
  await asyncio.sleep(max(0.0, t0 + arrival - time.perf_counter()))
  sent = time.perf_counter()
  body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
          "stream": True, "stream_options": {"include_usage": True}}
  first, chunks, usage, error = None, 0, None, None
  try:
    async with client.stream("POST", url + "/v1/completions", json=body) as response:
      if response.status_code != 200:
        error = f"HTTP {response.status_code}: {(await response.aread())[:200]!r}"
      else:
        async for line in response.aiter_lines():
          if not line.startswith("data: ") or line == "data: [DONE]":
            continue
          chunk = json.loads(line[6:])
          if chunk.get("usage"):
            usage = chunk["usage"]
          for choice in chunk.get("choices") or []:
            if choice.get("text"):
              chunks += 1
              first = first or time.perf_counter()
  except Exception as failure:  # noqa: BLE001 (counted as an error of the run)
    error = f"{type(failure).__name__}: {failure}"
  end = time.perf_counter()
  tokens = usage["completion_tokens"] if usage else chunks
  return {"ttft_s": (first or end) - sent, "latency_s": end - sent, "tokens": tokens,
          "prompt_tokens": usage["prompt_tokens"] if usage else None,
          "tpot_s": (end - first) / (tokens - 1) if first and tokens > 1 else None,
          "error": error}


async def run_load(url: str, model: str, requests, sequential: bool = False) -> dict:
  import httpx2
  limits = httpx2.Limits(max_connections=256, max_keepalive_connections=256)
  async with httpx2.AsyncClient(timeout=900, limits=limits) as client:
    t0 = time.perf_counter()
    if sequential:
      results = [await one_request(client, url, model, 0.0, p, m, time.perf_counter())
                 for _, p, m in requests]
    else:
      results = await asyncio.gather(*[one_request(client, url, model, a, p, m, t0)
                                       for a, p, m in requests])
    wall = time.perf_counter() - t0
  good = [r for r in results if r["error"] is None]
  pct = lambda key, q: (float(np.percentile([r[key] for r in good if r[key] is not None], q))
                        if any(r[key] is not None for r in good) else None)
  return {"requests": len(results), "errors": len(results) - len(good),
          "error_examples": [r["error"] for r in results if r["error"]][:3],
          "wall_s": wall, "output_tokens": sum(r["tokens"] for r in good),
          "output_tokens_per_s": sum(r["tokens"] for r in good) / wall,
          "ttft_p50_s": pct("ttft_s", 50), "ttft_p99_s": pct("ttft_s", 99),
          "tpot_p50_s": pct("tpot_s", 50), "tpot_p99_s": pct("tpot_s", 99),
          "ttft_s": [r["ttft_s"] for r in results]}


def ringlm_server(args, workdir, name, *extra):
  port = free_port()
  command = [sys.executable, "serve.py", f"--checkpoint={args.ringlm_dir}", f"--port={port}",
             "--cpu_devices=1", "--served_model_name=model", "--config.serve.batch_size=8",
             "--config.serve.prefix_block=128", f"--config.serve.dtype={args.dtype}",
             *shlex.split(args.ringlm_args), *extra]
  return Server(name, command, port, workdir)


def peer_server(args, workdir):
  port = free_port()
  executable = os.path.join(os.path.dirname(sys.executable), "transformers")
  command = [executable, "serve", args.hf_dir, "--continuous-batching", "--dtype", args.dtype,
             "--device", "cpu", "--port", str(port), "--host", "127.0.0.1",
             "--log-level", "warning"]
  return Server("transformers", command, port, workdir)


def serve_all(server: Server, model: str, loads: dict, only=None) -> dict:
  results = {"ready_s": server.wait_ready()}
  print(f"  {server.name}: ready after {results['ready_s']:.0f} s", flush=True)
  try:
    # one request first, so that lazy work (a first compilation, warm-up) is not timed
    asyncio.run(run_load(server.url, model, [(0.0, "def f(x):", 4)]))
    for name, requests in loads.items():
      if only is not None and name not in only:
        continue
      results[name] = asyncio.run(run_load(server.url, model, requests,
                                           sequential=name == "shared prefix"))
      r = results[name]
      print(f"  {server.name} {name}: {r['output_tokens_per_s']:.1f} tok/s, TTFT p50 "
            f"{r['ttft_p50_s']:.3f} s p99 {r['ttft_p99_s']:.3f} s, {r['errors']} errors",
            flush=True)
  finally:
    results["exit_status"] = server.stop()
  return results


def table(results: dict, rates) -> str:
  lines = ["| workload | server | output tok/s | TTFT p50 / p99 (s) | TPOT p50 / p99 (ms) | "
           "errors |", "|---|---|---|---|---|---|"]
  for load in [f"{r:g} req/s" for r in rates] + ["shared prefix"]:
    for server in ("ringlm", "ringlm_no_prefix_cache", "transformers"):
      r = results.get(server, {}).get(load)
      if r is None:
        continue
      ms = lambda x: f"{1000 * x:.1f}" if x is not None else "-"
      lines.append(f"| {load} | {server} | {r['output_tokens_per_s']:.1f} | "
                   f"{r['ttft_p50_s']:.3f} / {r['ttft_p99_s']:.3f} | {ms(r['tpot_p50_s'])} / "
                   f"{ms(r['tpot_p99_s'])} | {r['errors']} |")
  return "\n".join(lines)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--quick", action="store_true", help="2 layers, 8 requests per rate")
  parser.add_argument("--rates", default="0.5,1,2,8",
                      help="Poisson arrival rates, req/s (the last saturates both servers)")
  parser.add_argument("--requests", type=int, default=24, help="requests per rate")
  parser.add_argument("--layers", type=int, default=MODEL["num_hidden_layers"])
  parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"],
                      help="precision of both servers (weights and compute)")
  parser.add_argument("--servers", default="ringlm,transformers",
                      help="which servers to run (a comma list; the summary needs both)")
  parser.add_argument("--ringlm_args", default="",
                      help="extra serve.py flags, e.g. '--config.serve.batch_size=16'")
  parser.add_argument("--out", default=None, help="JSON path (default bench/results/...)")
  args = parser.parse_args(argv)
  if args.quick:
    args.layers, args.requests = 2, 8
  rates = [float(r) for r in args.rates.split(",")]
  model = dict(MODEL, num_hidden_layers=args.layers, vocab_size=VOCAB,
               max_position_embeddings=4096)
  with tempfile.TemporaryDirectory(prefix="bench-serve-") as workdir:
    args.hf_dir, args.ringlm_dir = os.path.join(workdir, "hf"), os.path.join(workdir, "ringlm")
    print(f"model: {model} (random, seed 0) in {workdir}", flush=True)
    params = build_model(args.hf_dir, model)
    text = corpus_text()
    build_tokenizer(args.hf_dir, text)
    convert = run_child("convert", [sys.executable, "-m", "tools.convert_hf",
                                    f"--hf_dir={args.hf_dir}", f"--out={args.ringlm_dir}"],
                        workdir)
    _check(convert)
    from tokenizers import Tokenizer
    tokenizer = Tokenizer.from_file(os.path.join(args.hf_dir, "tokenizer.json"))
    loads = workloads(tokenizer, text, rates, args.requests)
    print(f"  {params / 1e6:.1f}M parameters; {sum(map(len, loads.values()))} requests",
          flush=True)
    results = {}
    servers = args.servers.split(",")
    if "ringlm" in servers:
      print("ringlm (serve.py --port)", flush=True)
      results["ringlm"] = serve_all(ringlm_server(args, workdir, "ringlm"), "model", loads)
      print("ringlm without the prefix cache", flush=True)
      results["ringlm_no_prefix_cache"] = serve_all(
          ringlm_server(args, workdir, "ringlm-no-prefix", "--config.serve.prefix_cache_mb=0"),
          "model", loads, only={"shared prefix"})
    if "transformers" in servers:
      print("transformers serve --continuous-batching", flush=True)
      results["transformers"] = serve_all(peer_server(args, workdir), args.hf_dir, loads)
    if set(servers) != {"ringlm", "transformers"}:
      print(table(results, rates))
      return

  top = f"{max(rates):g} req/s"
  ours, theirs = results["ringlm"][top], results["transformers"][top]
  with_cache = np.median(results["ringlm"]["shared prefix"]["ttft_s"][1:])
  without = np.median(results["ringlm_no_prefix_cache"]["shared prefix"]["ttft_s"][1:])
  summary = {
      "throughput_ratio": ours["output_tokens_per_s"] / theirs["output_tokens_per_s"],
      "throughput_target": THROUGHPUT_TARGET,
      "ttft_p99_ratio": theirs["ttft_p99_s"] / ours["ttft_p99_s"],
      "prefix_ttft_speedup": float(without / with_cache), "prefix_target": PREFIX_TARGET,
      "errors": sum(r.get("errors", 0) for server in results.values()
                    for r in server.values() if isinstance(r, dict)),
  }
  summary["met"] = (summary["throughput_ratio"] >= THROUGHPUT_TARGET
                    and summary["ttft_p99_ratio"] > 1
                    and summary["prefix_ttft_speedup"] >= PREFIX_TARGET)
  text_table = table(results, rates)
  print(text_table)
  print(f"at {top}: ringlm {summary['throughput_ratio']:.2f}x the peer's output tokens/s "
        f"(target {THROUGHPUT_TARGET}x), p99 TTFT {summary['ttft_p99_ratio']:.2f}x lower; "
        f"shared prefix: TTFT {summary['prefix_ttft_speedup']:.1f}x lower with the prefix "
        f"cache (target {PREFIX_TARGET}x)")
  from bench.common import machine, write_json
  import transformers
  stamp = datetime.date.today().isoformat()
  out = args.out or os.path.join(ROOT, "bench", "results", f"serve-load-{stamp}.json")
  write_json(out, {"model": model, "parameters": params, "args": vars(args),
                   "machine": machine(), "transformers": transformers.__version__,
                   "results": results, "summary": summary, "table": text_table})
  with open(os.path.splitext(out)[0] + ".md", "w") as f:
    f.write(text_table + "\n")
  print(json.dumps(summary))


if __name__ == "__main__":
  main()
