"""The HTTP server's assembly: KV capacity at start-up, the continuous-batching engine
built from the parameters' shapes, the API, and uvicorn with a draining shutdown
(serve.py --port is its command line; docs/serving.md).

Start-up order, so that the port answers at once (503 "loading" on /health):
  1. `plan_capacity` sizes the slot cache from the device memory and refuses a
     configuration that cannot hold it (before anything compiles);
  2. `Service` builds the SlotEngine, the metrics, the prefix cache and the API from the
     parameters' shapes;
  3. `run` starts uvicorn; a thread compiles every program while the checkpoint loads,
     then starts the scheduler and marks the server ready.
SIGTERM: the server answers 503 to new requests, finishes those in flight within
serve.drain_s (those still running then end with an error, none silently), and exits 0.
"""

import concurrent.futures
import dataclasses
import logging
import math
import threading
import time

import jax
import numpy as np

from core.errors import ConfigError
from model import kv_cache
from serving import api, slots as slots_lib
from serving.metrics import ServerMetrics
from serving.prefix_cache import PrefixCache
from serving.scheduler import Scheduler

log = logging.getLogger("ringlm.serve")


def human_bytes(count: int) -> str:
  """Bytes for a person: "7.00 GiB", "2.0 MiB"."""
  return f"{count / (1 << 30):.2f} GiB" if count >= 1 << 30 else f"{count / (1 << 20):.1f} MiB"


def http_mesh_check(mesh) -> None:
  """The server keeps each slot's cache whole on the ring: its rows are not split over
  the batch axes."""
  batch = mesh.shape["data"] * mesh.shape["fsdp"]
  if batch > 1:
    raise ConfigError(
        f"mesh.data x mesh.fsdp = {batch}: the HTTP server spreads every slot's KV cache "
        "over the ring, not its slots over devices; use --config.mesh.data=1 "
        "--config.mesh.fsdp=1 --config.mesh.sequence=-1")


def decode_steps_check(serve) -> None:
  """serve.slot_decode_steps and serve.prefill_decode_steps are step counts: >= 1."""
  for field in ("slot_decode_steps", "prefill_decode_steps"):
    if getattr(serve, field) < 1:
      raise ConfigError(f"serve.{field}={getattr(serve, field)}: decode steps per call must "
                        f"be at least 1; use --config.serve.{field}=2")


def parameter_bytes_per_device(model) -> int:
  """Bytes of `model`'s parameters (abstract or real) on its most loaded device."""
  from flax import nnx
  total = 0
  for leaf in jax.tree.leaves(nnx.to_pure_dict(nnx.state(model))):
    sharding = getattr(leaf, "sharding", None)
    shape = sharding.shard_shape(leaf.shape) if sharding is not None else leaf.shape
    total += math.prod(shape) * np.dtype(leaf.dtype).itemsize
  return total


@dataclasses.dataclass
class Capacity:
  """What the slot cache holds: `batch` slots of `max_context` tokens each (a request's
  prompt + max_tokens), `cache_bytes` of `free_bytes`, measured against `source`."""
  batch: int
  max_context: int
  cache_bytes: int
  free_bytes: int
  source: str

  def line(self) -> str:
    return (f"max context per request {self.max_context} tokens at batch {self.batch} "
            f"(KV cache {human_bytes(self.cache_bytes)} of {human_bytes(self.free_bytes)} "
            f"free; {self.source})")


def plan_capacity(model, mesh, serve, max_context: int, chunks) -> Capacity:
  """The slot cache of `serve.batch_size` rows of `max_context` tokens, checked against
  the memory left for it: on TPU/GPU each device's memory (bytes_limit) less its share of
  the parameters; on CPU serve.memory_budget_mb less every device's copy of them. The
  prefix cache's budget comes off too. Raises ConfigError naming serve.batch_size,
  model.max_seq_len or the budget, with values that fit."""
  devices = list(mesh.devices.flat)
  params = parameter_bytes_per_device(model)
  ring = mesh.shape["sequence"]
  layout = slots_lib.SlotEngine.row_layout(model.config, max_context, chunks[-1], ring)
  prefix = 0 if layout.rolling else serve.prefix_cache_mb << 20  # (none with rolling rows)
  if devices[0].platform == "cpu":
    budget = serve.memory_budget_mb << 20
    free = budget - params * len(devices) - prefix
    source = f"serve.memory_budget_mb={serve.memory_budget_mb}"
  else:
    limit = (devices[0].memory_stats() or {}).get("bytes_limit", 0)
    free = (int(limit * 0.9) - params) * len(devices) - prefix
    source = f"{human_bytes(limit)} per {devices[0].device_kind}, 10% kept back"
  free = max(free, 0)
  per_token = kv_cache.per_token_bytes(model.config)
  rolling_slots = layout.capacity if layout.rolling else 0
  if layout.rolling:
    source += (f"; sliding window {model.config.window}: a rolling cache of "
               f"{layout.capacity} slots per request")
  fit = slots_lib.kv_capacity(per_token_bytes=per_token, free_bytes=free,
                              slots=serve.batch_size, max_context=max_context,
                              largest_chunk=chunks[-1], ring_size=ring,
                              rolling_slots=rolling_slots)
  if fit["fits"]:
    return Capacity(serve.batch_size, max_context, fit["cache_bytes"], free, source)
  need = human_bytes(fit["cache_bytes"])
  lever = ("serve.memory_budget_mb" if devices[0].platform == "cpu"
           else "more devices on the ring (mesh.sequence)")
  if fit["max_batch"] == 0:
    single = slots_lib.kv_capacity(per_token_bytes=per_token, free_bytes=free, slots=1,
                                   max_context=max_context, largest_chunk=chunks[-1],
                                   ring_size=ring, rolling_slots=rolling_slots)["max_context"]
    raise ConfigError(
        f"model.max_seq_len={max_context}: not even one request of that length fits "
        f"({need} of KV cache at serve.batch_size={serve.batch_size}; "
        f"{human_bytes(free)} free after the parameters and serve.prefix_cache_mb; "
        f"{source}): set --config.model.max_seq_len={single} --config.serve.batch_size=1, "
        f"or give it more memory ({lever})")
  shorter = (f"--config.model.max_seq_len={fit['max_context']}, or "
             if fit["max_context"] >= serve.min_bucket else "")
  raise ConfigError(
      f"serve.batch_size={serve.batch_size}: {serve.batch_size} slots of "
      f"model.max_seq_len={max_context} tokens need {need} of KV cache; "
      f"{human_bytes(free)} is free after the parameters and serve.prefix_cache_mb "
      f"({source}): set --config.serve.batch_size={fit['max_batch']}, or {shorter}"
      f"give it more memory ({lever})")


class Service:
  """Everything the HTTP mode runs, built from the parameters' shapes.

  Args:
    shapes: the Transformer with abstract parameters on `mesh` (serving/loading.load_model
      with abstract=True); `load` returns the real one.
    mesh: the serving mesh (http_mesh_check).
    serve: the config's serve fields.
    max_context: the longest request (prompt + max_tokens) served.
    capacity: plan_capacity's.
    chunks: the prompt chunk lengths (slots.chunk_sizes; plan_capacity's too).
    tokenizer, eos_ids, chat_template (chat.load_template's, or None),
    model_name, api_key, seed: as api.Server takes them.
  """

  def __init__(self, shapes, mesh, serve, *, max_context, capacity, chunks, tokenizer,
               eos_ids, chat_template, model_name, api_key, seed, load):
    ring = mesh.shape["sequence"]
    self.serve, self.load, self.tokenizer, self.eos_ids = serve, load, tokenizer, eos_ids
    layout = slots_lib.SlotEngine.row_layout(shapes.config, max_context, chunks[-1], ring)
    self.engine = slots_lib.SlotEngine(
        shapes, mesh, slots=serve.batch_size, chunks=chunks,
        decode_steps=serve.slot_decode_steps, eos_ids=eos_ids, capacity=layout.capacity,
        rolling=layout.rolling, kept=layout.kept)
    self.metrics = ServerMetrics(serve.accelerator_hour_usd)
    self.metrics.slots.set(serve.batch_size)
    self.metrics.cache_tokens.set(serve.batch_size * self.engine.capacity)
    self.metrics.max_context.set(max_context)
    block = -(-serve.prefix_block // ring) * ring
    # A rolling row no longer holds a long prompt's first slots: no prefix cache.
    self.prefix_cache = (PrefixCache(block, serve.prefix_cache_mb << 20, self.metrics)
                         if serve.prefix_cache_mb > 0 and not layout.rolling else None)
    self.server = api.Server(
        model_name=model_name, tokenizer=tokenizer, chat_template=chat_template,
        vocab_size=shapes.config.vocab_size, max_context=max_context,
        defaults={"default_max_tokens": serve.max_tokens, "default_seed": seed},
        api_key=api_key, max_body_bytes=serve.max_body_mb << 20, metrics=self.metrics,
        capacity={"max_context": capacity.max_context, "batch": capacity.batch,
                  "kv_cache_bytes": capacity.cache_bytes})
    self.app = api.make_app(self.server)
    self.scheduler = None
    self.failure = None

  def start_up(self) -> None:
    """Compiles every program while the parameters load, then starts serving (the
    start-up thread's work; `failure` holds what went wrong)."""
    try:
      start = time.perf_counter()
      with concurrent.futures.ThreadPoolExecutor(1) as pool:
        loading = pool.submit(self.load)
        block = self.prefix_cache.block if self.prefix_cache is not None else 0
        programs = self.engine.compile_all(block)
        compiled_at = time.perf_counter()
        model = loading.result()
      self.metrics.programs.set(programs)
      self.engine.use_parameters(model)
      self.engine.reset()
      self.scheduler = Scheduler(self.engine, tokenizer=self.tokenizer, eos_ids=self.eos_ids,
                                 max_queue=self.serve.max_queue,
                                 prefix_cache=self.prefix_cache, metrics=self.metrics,
                                 prefill_decode_steps=self.serve.prefill_decode_steps)
      self.scheduler.start()
      self.server.ready(self.scheduler)
      log.info("ready: %d programs compiled in %.1f s (tracing and lowering %.1f s), "
               "serving after %.1f s", programs, compiled_at - start, self.engine.lower_s,
               time.perf_counter() - start)
    except Exception as error:  # noqa: BLE001 (reported by `run`, which exits non-zero)
      self.failure = f"{type(error).__name__}: {error}"
      self.server.state = "failed"

  def drain(self, timeout_s: float) -> None:
    """Refuses new requests (503) and waits up to `timeout_s` for those in flight; then
    stops the scheduler, which ends what is left with an error."""
    self.server.state = "draining"
    scheduler, start = self.scheduler, time.monotonic()
    in_flight = scheduler.in_flight() if scheduler is not None else 0
    log.info("draining: %d requests in flight, up to %.0f s (serve.drain_s)", in_flight,
             timeout_s)
    while in_flight and time.monotonic() < start + timeout_s:
      time.sleep(0.05)
      in_flight = scheduler.in_flight()
    if scheduler is not None:
      scheduler.stop()
    log.info("drained in %.1f s%s; exiting", time.monotonic() - start,
             f" ({in_flight} requests ended with an error)" if in_flight else "")


def run(service: Service, host: str, port: int, log_level: str = "warning") -> int:
  """Serves until SIGTERM/SIGINT (then drains, serve.drain_s) or a failed start-up;
  returns the exit status (0 after a drain)."""
  import uvicorn

  class DrainingServer(uvicorn.Server):
    """uvicorn, whose first SIGTERM/SIGINT drains the scheduler before the server stops
    (a second one stops at once); the signal is not re-raised after, so the exit is 0."""
    draining = None

    def handle_exit(self, sig, frame):
      if self.draining is not None:
        self.should_exit = True
        self.force_exit = True
        return

      def drain_then_exit():
        service.drain(service.serve.drain_s)
        self.should_exit = True
      self.draining = threading.Thread(target=drain_then_exit, name="drain", daemon=True)
      self.draining.start()

  config = uvicorn.Config(service.app, host=host, port=port, log_level=log_level,
                          access_log=False, timeout_graceful_shutdown=5,
                          lifespan="off")
  server = DrainingServer(config)

  def start_up():
    service.start_up()
    if service.failure is not None:
      server.should_exit = True
  threading.Thread(target=start_up, name="start-up", daemon=True).start()
  server.run()
  if service.failure is not None:
    log.error("start-up failed: %s", service.failure)
    return 1
  return 0 if server.started else 1
