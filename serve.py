"""Batch inference: JSONL requests in, JSONL results out, through the training forward.

  python serve.py --checkpoint=DIR --input=requests.jsonl --output=results.jsonl \\
      [--config.serve.batch_size=32] [--config.model.rope.scaling.type=...]

DIR is a run directory (its newest checkpoint), a checkpoint step or a converted
Hugging Face model. One request per line (serving/requests.py):

  {"id": 7, "prompt": "def fib(n):", "max_tokens": 64, "temperature": 0, "top_k": 0,
   "top_p": 1.0, "stop": ["\\n\\n"], "seed": 0, "logprobs": false}

(`prompt_tokens`: [ids] instead of `prompt`). One result per line, in input order:
`line`, `id`, `completion`, `tokens`, `finish_reason` (stop | length | error),
`prompt_tokens`, `logprobs` when asked, `error` (and its HTTP-like `status`) when the
line could not be served. A bad line never stops the others. A line may also be in the
OpenAI Batch format, as `vllm run-batch` reads it; its result is then an OpenAI Batch
output line:

  {"custom_id": "q1", "method": "POST", "url": "/v1/chat/completions",
   "body": {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 32}}
  -> {"id", "custom_id": "q1", "response": {"status_code": 200, "request_id", "body":
      <the endpoint's response>}, "error": null}

The last stderr line is a JSON report; stdout ends with a summary.

The engine is serving/engine.py's: prefill on the ring with the cache left sharded over
the sequence, decode over that cache. Its programs are compiled from the parameters'
shapes while the checkpoint loads (`Engine.compile`), so compilation and loading overlap.

The HTTP server (an OpenAI-compatible API with continuous batching; docs/serving.md):

  python serve.py --checkpoint=DIR --port=8000 [--host=127.0.0.1] [--api_key=KEY]
      [--config.serve.batch_size=8] [--config.model.max_seq_len=32768]

It prints "max context per request N tokens at batch B" before compiling, answers 503
on /health while it compiles and loads, and drains on SIGTERM (serving/service.py).
"""

import concurrent.futures
import json
import os
import resource
import sys
import time

from absl import app, flags
from ml_collections import config_flags

import cli
from configs import base

FLAGS = flags.FLAGS


def define_flags():
  """The command line's flags, defined only when serve.py runs as a program (the tools'
  flags share names)."""
  flags.DEFINE_string("checkpoint", None, "Run directory, checkpoint step or converted "
                      "Hugging Face model.")
  flags.DEFINE_string("input", None, "JSONL requests (batch mode).")
  flags.DEFINE_string("output", None, "JSONL results, one line per request line (batch mode).")
  flags.DEFINE_integer("port", None, "Serve the OpenAI-compatible HTTP API on this port "
                       "instead of a batch file.")
  flags.DEFINE_string("host", "127.0.0.1", "Address the HTTP server binds (0.0.0.0: every "
                      "interface).")
  flags.DEFINE_string("api_key", os.environ.get("RINGLM_API_KEY"), "Require "
                      "`Authorization: Bearer <key>` on /v1/* (default $RINGLM_API_KEY).")
  flags.DEFINE_string("served_model_name", None, "The model id clients send (default: the "
                      "checkpoint's directory name).")
  config_flags.DEFINE_config_dict("config", base.get_config(),
                                  "Overrides of the checkpoint's config.")
  cli.define_flags(cpu_devices=None)  # as many as the chosen mesh uses (serve_batch)


# --- command line ----------------------------------------------------------------------

def _process_start() -> float:
  """time.perf_counter() at the moment this process started (Linux; else now)."""
  try:
    with open("/proc/self/stat") as f:
      started_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
    with open("/proc/uptime") as f:
      uptime = float(f.read().split()[0])
    return time.perf_counter() - (uptime - started_ticks / os.sysconf("SC_CLK_TCK"))
  except (OSError, ValueError, IndexError):
    return time.perf_counter()


def _compilation_cache(config):
  """JAX's persistent compilation cache: serve.compilation_cache, else
  $RINGLM_COMPILATION_CACHE, else ~/.cache/ringlm/jax (under $XDG_CACHE_HOME when set);
  "none" turns it off. A restart with the same shapes loads its programs instead of
  compiling them (the HTTP server's 76 programs on the test model: 163 s cold, 27 s
  from the cache), as MaxText's jax_cache_dir does by default."""
  import jax
  directory = (config.serve.compilation_cache or os.environ.get("RINGLM_COMPILATION_CACHE")
               or os.path.join(os.environ.get("XDG_CACHE_HOME") or
                               os.path.expanduser("~/.cache"), "ringlm", "jax"))
  if directory != "none":
    jax.config.update("jax_compilation_cache_dir", directory)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)


def main(argv):
  del argv
  process_start = _process_start()
  named = cli.start()
  from model import checkpoint as ckpt_lib
  from serving import chat, loading
  main_start = time.perf_counter()  # (the interpreter's start-up and imports before it)
  config = FLAGS.config
  _compilation_cache(config)
  if FLAGS.port is None and not (FLAGS.input and FLAGS.output):
    cli.fail("give --input and --output (batch mode) or --port (the HTTP server)")
  try:
    step_dir, meta = ckpt_lib.load_meta(FLAGS.checkpoint)
  except FileNotFoundError as error:
    cli.fail(f"--checkpoint: {error}")
  saved = meta["config"]
  # The context the model serves: model.max_seq_len from the command line, else the
  # checkpoint's (an extended model's is its new length).
  max_context = config.model.max_seq_len if "model.max_seq_len" in named \
      else saved["model"]["max_seq_len"]
  tokenizer = loading.load_tokenizer(step_dir, saved, required=False)
  eos_ids = loading.end_of_sequence_ids(saved)
  if tokenizer is not None:
    eos_ids.append(tokenizer.eos_id())
  run_dir = ckpt_lib.run_dir(step_dir)
  checkpoint = dict(step_dir=step_dir, saved=saved, max_context=max_context,
                    tokenizer=tokenizer, eos_ids=eos_ids,
                    chat_template=chat.load_template(os.path.join(run_dir, "assets")),
                    # the id clients send as `model`
                    model_name=FLAGS.served_model_name or
                    os.path.basename(os.path.normpath(run_dir)))
  if FLAGS.port is not None:
    sys.exit(serve_http(config, named, **checkpoint))
  serve_batch(config, named, process_start=process_start, main_start=main_start,
              **checkpoint)


def serve_http(config, named, *, step_dir, saved, max_context, tokenizer, eos_ids,
               chat_template, model_name) -> int:
  """The OpenAI-compatible server on --host:--port until SIGTERM; returns the exit status."""
  import logging

  from core.errors import ConfigError
  from model import transformer
  from parallel import mesh as mesh_lib
  from serving import loading, service, slots
  logging.getLogger("ringlm").setLevel(logging.INFO)
  try:
    cli.set_cpu_devices(loading.cpu_devices_needed(config, named, max_context))
    mesh, mesh_reason = loading.choose_mesh(config, named, max_context, slots_split=False)
    service.http_mesh_check(mesh)
    service.decode_steps_check(config.serve)
    shapes = loading.load_model(step_dir, config, named, mesh, max_context, abstract=True)[0]
    mesh_lib.validate(shapes.config, mesh)
    chunks = slots.chunk_sizes(config.serve.min_bucket, config.serve.prefill_chunk,
                               mesh.shape["sequence"])
    capacity = service.plan_capacity(shapes, mesh, config.serve, max_context, chunks)
  except (ConfigError, ValueError) as error:
    cli.fail(str(error))
  app = service.Service(
      shapes, mesh, config.serve, max_context=max_context, capacity=capacity, chunks=chunks,
      tokenizer=tokenizer, eos_ids=eos_ids, model_name=model_name, api_key=FLAGS.api_key,
      seed=config.seed, load=lambda: transformer.load_parameters(shapes, step_dir)[0],
      chat_template=chat_template)
  where = f"http://{FLAGS.host}:{FLAGS.port}"
  cli.summary([
      f"serving `{model_name}` on {where}/v1 (OpenAI API; /health, /metrics)",
      capacity.line(),
      f"mesh: {dict((k, v) for k, v in mesh.shape.items() if v > 1) or '1 device'}: "
      f"{mesh_reason}",
      "chat: " + ("the checkpoint's template" if chat_template else
                  "no chat template (tokenizer_config.json): /v1/completions only"),
      f"compiling {len(chunks)} prefill chunk sizes and decode while the checkpoint "
      "loads; /health answers 200 when ready"])
  return service.run(app, FLAGS.host, FLAGS.port)


def serve_batch(config, named, *, step_dir, saved, max_context, tokenizer, eos_ids,
                chat_template, model_name, process_start, main_start) -> None:
  """Batch mode: --input's request lines to --output's result lines."""
  import jax
  from tqdm import tqdm

  from core.errors import ConfigError
  from model import transformer
  from parallel import mesh as mesh_lib
  from serving import loading, openai_format
  from serving.engine import Engine
  from serving.requests import RequestError, error_record, parse_request, request_id
  try:
    with open(FLAGS.input, "rb") as f:
      lines = f.read().split(b"\n")
  except OSError as error:
    cli.fail(f"--input: cannot read {FLAGS.input}: {error.strerror}")
  if lines and lines[-1] == b"":
    lines.pop()  # the file's final newline ends the last line; it is not a line
  results, requests = {}, []
  batch_lines = {}  # line -> (custom_id, chat?) of the OpenAI Batch lines
  for number, raw in enumerate(lines, start=1):
    try:
      request = parse_request(
          number, raw, tokenizer=tokenizer, vocab_size=saved["model"]["vocab_size"],
          max_context=max_context, default_max_tokens=config.serve.max_tokens,
          default_seed=config.seed, model_name=model_name, chat_template=chat_template)
    except RequestError as error:
      if error.custom_id is not None:
        batch_lines[number] = (error.custom_id, False)
      results[number] = error_record(
          number, request_id(raw) if error.custom_id is None else error.custom_id, str(error),
          error.status, error.param)
      continue
    requests.append(request)
    if request.endpoint is not None:
      batch_lines[number] = (request.id, openai_format.ENDPOINTS[request.endpoint])

  longest = max((len(r.prompt_tokens) + r.max_tokens for r in requests), default=0)
  try:
    cli.set_cpu_devices(loading.cpu_devices_needed(config, named, longest))
    mesh, mesh_reason = loading.choose_mesh(config, named, longest)
    shapes, _, _ = loading.load_model(step_dir, config, named, mesh, max_context,
                                      abstract=True)  # the parameters' shapes only
    mesh_lib.validate(shapes.config, mesh)
  except (ConfigError, ValueError) as error:
    cli.fail(str(error))
  engine = Engine(shapes, mesh, tokenizer=tokenizer, eos_ids=eos_ids,
                  batch_size=config.serve.batch_size, min_bucket=config.serve.min_bucket,
                  decode_chunk=config.serve.decode_chunk)

  def timed_load():
    start = time.perf_counter()
    return transformer.load_parameters(shapes, step_dir)[0], time.perf_counter() - start

  # The executables need only the parameters' shapes: compile while the checkpoint loads.
  with concurrent.futures.ThreadPoolExecutor(1) as pool:
    loaded = pool.submit(timed_load)
    engine.compile(requests)
    model, load_s = loaded.result()
  engine.use_parameters(model)

  with tqdm(total=len(requests), desc="serve", unit="req", disable=None, file=sys.stderr) as bar:
    results.update(engine.generate(requests, progress=bar))

  output = os.path.abspath(FLAGS.output)
  os.makedirs(os.path.dirname(output), exist_ok=True)
  temporary = output + ".tmp"
  token_text = (lambda t: tokenizer.decode([t])) if tokenizer is not None else str
  with open(temporary, "w") as f:
    for number in range(1, len(lines) + 1):
      record = results[number]
      if number in batch_lines:
        custom_id, chat_mode = batch_lines[number]
        record = openai_format.batch_output(custom_id, chat_mode, record,
                                            model_name=model_name, token_text=token_text)
      f.write(json.dumps(record) + "\n")
  os.replace(temporary, output)

  stats = engine.stats
  served = [results[r.line] for r in requests if results[r.line]["finish_reason"] != "error"]
  report = {
      "requests": len(lines),
      "errors": sum(r["finish_reason"] == "error" for r in results.values()),
      "prompt_tokens": sum(r["prompt_tokens"] for r in served),
      "generated_tokens": sum(len(r["tokens"]) for r in served),
      "prefill_tokens_per_s": stats["prefill_tokens"] / max(stats["prefill_s"], 1e-9),
      "decode_tokens_per_s": stats["decode_tokens"] / max(stats["decode_s"], 1e-9),
      "prefill_s": stats["prefill_s"], "decode_s": stats["decode_s"],
      "compile_s": stats["compile_s"], "compilations": engine.compilations, "load_s": load_s,
      "start_s": main_start - process_start,  # interpreter start-up and imports
      "wall_s": time.perf_counter() - process_start,
      "peak_memory_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
      "mesh": dict(mesh.shape), "mesh_reason": mesh_reason,
      "devices": jax.device_count(),  # of the process (virtual ones on CPU included)
  }
  cli.summary([
      f"served {len(requests)} of {len(lines)} request lines ({report['errors']} errors) on "
      f"mesh {dict((k, v) for k, v in mesh.shape.items() if v > 1) or '1 device'}: "
      f"{report['generated_tokens']} tokens generated, "
      f"{report['decode_tokens_per_s']:.0f} tokens/s decoding",
      f"mesh: {mesh_reason}",
      f"results: {output}",
      "next: a line's error field says what to fix; model.max_seq_len and serve.batch_size "
      "are --config overrides"])
  print(json.dumps(report), file=sys.stderr, flush=True)
  cli.exit_without_collecting()


if __name__ == "__main__":
  define_flags()
  flags.mark_flags_as_required(["checkpoint"])
  app.run(main, flags_parser=cli.parse_flags)
