"""Continuous batching on the host: a queue of requests, the decode slots, and the loop that
feeds serving/slots.py's programs (the HTTP server's engine; serve.py --port).

One thread runs `loop`. Each turn it
  1. drops cancelled requests (queued ones, and decoding ones: their slot is freed),
  2. gives free slots to queued requests, first come first served,
  3. prefills one chunk of the oldest request still prefilling, in the engine's staging
     row (a long prompt takes many turns; everyone else's stream waits at most one
     chunk). At its first chunk a prompt prefix found in the prefix cache is copied in
     instead of prefilled; after its last, the row is committed to the request's slot,
  4. runs one decode call over every slot (slots.decode_steps steps; fewer,
     prefill_decode_steps, while a prompt is being prefilled) and hands each
     request its new tokens; a request that ends (stop string, end of sequence,
     max_tokens) leaves its slot at once.
`submit` raises QueueFull when `max_queue` requests are waiting.
"""

import collections
import dataclasses
import threading
import time

import numpy as np

from parallel import ring
from serving.completion import Completion
from serving.requests import Request
from serving.slots import SAMPLING_FIELDS


class QueueFull(Exception):
  """The queue holds max_queue requests; retry later."""


@dataclasses.dataclass(eq=False)
class Job:
  """A request in the server: its completion so far and where it is.

  `on_update(job)` is called from the loop's thread whenever tokens were added and once
  when the job ends (`done` set; `completion.finish_reason` stop | length | cancelled |
  error, `error` the message)."""
  request: Request
  on_update: object = None
  completion: Completion = None
  submitted: float = 0.0
  first_token_at: float | None = None
  finished_at: float | None = None
  cancelled: bool = False
  done: bool = False
  error: str | None = None
  cached_tokens: int = 0      # prompt tokens taken from the prefix cache
  # in a slot:
  slot: int | None = None
  staged: bool = False        # its prefill has started in the staging row
  prefilled: int = 0          # prompt tokens in the cache
  fill: int = 0               # next cache slot of the row
  last_token: int = 0

  def __post_init__(self):
    self.completion = Completion(self.request)
    self.submitted = time.perf_counter()


class Scheduler:
  """Requests -> slots -> tokens; see the module docstring.

  Args:
    engine: a serving/slots.SlotEngine with its parameters and cache (`reset`).
    tokenizer, eos_ids: as the batch engine's (stop strings need the tokenizer).
    max_queue: most requests waiting for a slot.
    prefix_cache: a serving/prefix_cache.PrefixCache, or None.
    metrics: a serving/metrics.ServerMetrics, or None.
    prefill_decode_steps: decode steps per call while a prompt is being prefilled
      (serve.prefill_decode_steps; None: the engine's decode_steps always).
  """

  def __init__(self, engine, *, tokenizer=None, eos_ids=(), max_queue=256,
               prefix_cache=None, metrics=None, prefill_decode_steps=None):
    self.engine, self.tokenizer = engine, tokenizer
    self.prefill_decode_steps = prefill_decode_steps
    self.eos_ids = set(int(e) for e in eos_ids if e is not None and e >= 0)
    self.max_queue, self.prefix_cache, self.metrics = max_queue, prefix_cache, metrics
    self.queue = collections.deque()
    self.slots = [None] * engine.slots
    self.lock = threading.Condition()
    self.running = False
    self.thread = None
    self.stats = dict(prefill_s=0.0, decode_s=0.0, prefill_tokens=0, decode_tokens=0)

  # --- front-end side (any thread) -------------------------------------------------------

  def submit(self, request: Request, on_update=None) -> Job:
    job = Job(request, on_update)
    with self.lock:
      if len(self.queue) >= self.max_queue:
        raise QueueFull(f"{len(self.queue)} requests are waiting (serve.max_queue)")
      self.queue.append(job)
      self.lock.notify_all()
    self._gauges()
    return job

  def cancel(self, job: Job) -> None:
    with self.lock:
      job.cancelled = True
      self.lock.notify_all()

  def in_flight(self) -> int:
    with self.lock:
      return len(self.queue) + sum(job is not None for job in self.slots)

  def start(self) -> None:
    self.running = True
    self.thread = threading.Thread(target=self.loop, name="scheduler", daemon=True)
    self.thread.start()

  def stop(self) -> None:
    with self.lock:
      self.running = False
      self.lock.notify_all()
    if self.thread is not None:
      self.thread.join()

  # --- the loop (its own thread) ---------------------------------------------------------

  def loop(self) -> None:
    while True:
      with self.lock:
        while self.running and not self.queue and all(j is None for j in self.slots):
          self.lock.wait()
        if not self.running:
          break
        self._drop_cancelled()
        self._admit()
      try:
        self._prefill_one_chunk()
        self._decode()
      except Exception as error:  # noqa: BLE001 (fail the jobs in slots, keep serving)
        message = f"{type(error).__name__}: {' '.join(str(error).split())[:500]}"
        for slot, job in enumerate(self.slots):
          if job is not None:
            self._finish(job, "error", message)
        self.engine.reset()
      self._gauges()
    for job in list(self.queue) + [j for j in self.slots if j is not None]:
      self._finish(job, "error", "the server stopped")

  def _drop_cancelled(self) -> None:
    for job in [j for j in self.queue if j.cancelled]:
      self.queue.remove(job)
      self._finish(job, "cancelled")
    for job in self.slots:
      if job is not None and job.cancelled:
        self._finish(job, "cancelled")

  def _admit(self) -> None:
    for slot in range(len(self.slots)):
      if self.slots[slot] is None and self.queue:
        job = self.queue.popleft()
        job.slot = slot
        self.slots[slot] = job

  def _prefill_one_chunk(self) -> None:
    prefilling = [j for j in self.slots if j is not None and j.prefilled <
                  len(j.request.prompt_tokens)]
    if not prefilling:
      return
    # the staging row's request until its prompt is in; then the oldest waiting
    job = next((j for j in prefilling if j.staged), None) or \
        min(prefilling, key=lambda j: j.submitted)
    prompt = job.request.prompt_tokens
    if not job.staged:  # the staging row is this job's from now on
      job.staged = True
      if self.prefix_cache is not None:
        job.cached_tokens = self.prefix_cache.restore(self.engine, prompt)
        job.prefilled = job.fill = job.cached_tokens
    remaining = len(prompt) - job.prefilled
    chunks = self.engine.chunks
    length = next((c for c in chunks if c >= remaining), chunks[-1])
    count = min(remaining, length)
    tokens = np.zeros(length, np.int32)
    positions = np.full(length, ring.EMPTY, np.int32)
    tokens[:count] = prompt[job.prefilled:job.prefilled + count]
    positions[:count] = np.arange(job.prefilled, job.prefilled + count)
    start = time.perf_counter()
    token, logprob = self.engine.prefill_chunk(job.fill, tokens, positions, count - 1,
                                               job.request)
    self.stats["prefill_s"] += time.perf_counter() - start
    self.stats["prefill_tokens"] += count
    if self.metrics is not None:
      self.metrics.prefill_tokens.inc(count)
    job.prefilled += count
    job.fill += count
    if job.prefilled == len(prompt):
      self.engine.commit(job.slot, job.fill)
      if self.prefix_cache is not None:
        self.prefix_cache.store(self.engine, prompt)
      job.first_token_at = time.perf_counter()
      job.last_token = token
      self._deliver(job, [token], [logprob])

  def _decode(self) -> None:
    decoding = [j for j in self.slots if j is not None and j.prefilled ==
                len(j.request.prompt_tokens) and not j.done]
    if not decoding:
      return
    rows = len(self.slots)
    token, position, fill = (np.zeros(rows, np.int32) for _ in range(3))
    generated, max_tokens = np.zeros(rows, np.int32), np.ones(rows, np.int32)
    done = np.ones(rows, bool)
    params = [np.zeros(rows, dtype) for _, dtype in SAMPLING_FIELDS]
    params[2][:] = 1.0  # top_p of idle rows
    for job in decoding:
      i = job.slot
      token[i], fill[i], done[i] = job.last_token, job.fill, False
      # the token fed is the last one generated, after the prompt and the others
      position[i] = len(job.request.prompt_tokens) + len(job.completion.tokens) - 1
      generated[i], max_tokens[i] = len(job.completion.tokens), job.request.max_tokens
      for array, (field, _) in zip(params, SAMPLING_FIELDS):
        array[i] = getattr(job.request, field)
    start = time.perf_counter()
    # While a prompt waits for its chunks, fewer steps: the queue's first tokens come
    # sooner and the slots fill, and every stream still advances between two chunks.
    prefilling = any(j is not None and j.prefilled < len(j.request.prompt_tokens)
                     for j in self.slots)
    steps, out_tokens, out_logprobs = self.engine.decode(
        token, position, fill, done, generated, max_tokens, params,
        steps=self.prefill_decode_steps if prefilling else None)
    self.stats["decode_s"] += time.perf_counter() - start
    for job in decoding:
      i = job.slot
      before = len(job.completion.tokens)
      job.fill += steps
      job.last_token = int(out_tokens[i, steps - 1]) if steps else job.last_token
      self._deliver(job, out_tokens[i].tolist(), out_logprobs[i].tolist())
      self.stats["decode_tokens"] += len(job.completion.tokens) - before

  def _deliver(self, job: Job, tokens, logprobs) -> None:
    before = len(job.completion.tokens)
    ended = job.completion.append(tokens, logprobs, self.tokenizer, self.eos_ids)
    if self.metrics is not None:
      self.metrics.generation_tokens.inc(len(job.completion.tokens) - before)
    if ended:
      self._finish(job, job.completion.finish_reason)
    elif job.on_update is not None:
      job.on_update(job)

  def _finish(self, job: Job, reason: str, error: str | None = None) -> None:
    if job.done:
      return
    if reason in ("cancelled", "error"):
      job.completion.finish_reason = reason
    job.error, job.done, job.finished_at = error, True, time.perf_counter()
    with self.lock:
      if job.slot is not None and self.slots[job.slot] is job:
        self.slots[job.slot] = None
    if self.metrics is not None:
      self.metrics.finished(job)
    if job.on_update is not None:
      job.on_update(job)

  def _gauges(self) -> None:
    if self.metrics is None:
      return
    with self.lock:
      busy = [j for j in self.slots if j is not None]
      self.metrics.queue_depth.set(len(self.queue))
      self.metrics.slots_in_use.set(len(busy))
      # (a rolling row's fill counts tokens past its end: it holds at most its capacity)
      self.metrics.cache_slots_in_use.set(sum(min(j.fill, self.engine.capacity) for j in busy))
