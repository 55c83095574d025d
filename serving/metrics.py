"""The server's Prometheus metrics (`GET /metrics`), in one registry per server."""

import prometheus_client as prom

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class ServerMetrics:
  """Counters, gauges and histograms of one server, names prefixed `ringlm_`.

  `accelerator_hour_usd` (serve.accelerator_hour_usd, 0: unset) turns the measured
  throughput into a cost per million input (prefill) and output (decode) tokens."""

  def __init__(self, accelerator_hour_usd: float = 0.0):
    self.registry = registry = prom.CollectorRegistry()
    self.accelerator_hour_usd = accelerator_hour_usd
    counter = lambda name, doc, *labels: prom.Counter(f"ringlm_{name}", doc, labels,
                                                      registry=registry)
    gauge = lambda name, doc: prom.Gauge(f"ringlm_{name}", doc, registry=registry)
    histogram = lambda name, doc: prom.Histogram(f"ringlm_{name}", doc, registry=registry,
                                                 buckets=LATENCY_BUCKETS)
    self.requests = counter("requests", "Requests ended, by how.", "finish_reason")
    self.rejected = counter("rejected_requests", "Requests refused before the queue, by "
                            "HTTP status.", "status")
    self.prompt_tokens = counter("prompt_tokens", "Prompt tokens of ended requests.")
    self.prefill_tokens = counter("prefill_tokens", "Prompt tokens prefilled (not taken "
                                  "from the prefix cache).")
    self.generation_tokens = counter("generation_tokens", "Tokens generated.")
    self.prefix_lookups = counter("prefix_cache_lookups", "Requests that looked up the "
                                  "prefix cache.")
    self.prefix_hits = counter("prefix_cache_hits", "Requests that found a cached prefix.")
    self.prefix_hit_tokens = counter("prefix_cache_hit_tokens", "Prompt tokens taken from "
                                     "the prefix cache.")
    self.time_to_first_token = histogram("time_to_first_token_seconds",
                                         "From arrival to the first token.")
    self.time_per_output_token = histogram("time_per_output_token_seconds",
                                           "Mean time between a request's later tokens.")
    self.request_latency = histogram("request_latency_seconds", "From arrival to the end.")
    self.queue_depth = gauge("queue_depth", "Requests waiting for a slot.")
    self.slots = gauge("slots", "Decode slots (serve.batch_size).")
    self.slots_in_use = gauge("slots_in_use", "Slots holding a request.")
    self.cache_slots_in_use = gauge("kv_cache_tokens_in_use", "KV cache slots filled.")
    self.cache_tokens = gauge("kv_cache_tokens", "KV cache slots in all.")
    self.max_context = gauge("max_context_tokens", "Longest request (prompt + max_tokens).")
    self.programs = gauge("compiled_programs", "Programs compiled (all ahead of serving).")
    self.prefix_cache_bytes = gauge("prefix_cache_bytes", "Bytes held by the prefix cache.")
    self.prefill_rate = gauge("prefill_tokens_per_second", "Prefill throughput so far.")
    self.decode_rate = gauge("decode_tokens_per_second", "Decode throughput so far.")
    self.cost_input = gauge("usd_per_million_input_tokens", "At the measured prefill "
                            "throughput and serve.accelerator_hour_usd (0: unset).")
    self.cost_output = gauge("usd_per_million_output_tokens", "At the measured decode "
                             "throughput and serve.accelerator_hour_usd (0: unset).")

  def finished(self, job) -> None:
    """Records a request that ended (a scheduler Job)."""
    completion = job.completion
    self.requests.labels(completion.finish_reason).inc()
    self.prompt_tokens.inc(len(job.request.prompt_tokens))
    self.request_latency.observe(job.finished_at - job.submitted)
    if job.first_token_at is not None:
      self.time_to_first_token.observe(job.first_token_at - job.submitted)
      if len(completion.tokens) > 1:
        self.time_per_output_token.observe(
            (job.finished_at - job.first_token_at) / (len(completion.tokens) - 1))

  def throughput(self, stats: dict) -> None:
    """Rates (and costs) from the scheduler's stats (prefill/decode seconds and tokens)."""
    prefill = stats["prefill_tokens"] / stats["prefill_s"] if stats["prefill_s"] else 0.0
    decode = stats["decode_tokens"] / stats["decode_s"] if stats["decode_s"] else 0.0
    self.prefill_rate.set(prefill)
    self.decode_rate.set(decode)
    usd_per_second = self.accelerator_hour_usd / 3600
    self.cost_input.set(usd_per_second * 1e6 / prefill if prefill and usd_per_second else 0)
    self.cost_output.set(usd_per_second * 1e6 / decode if decode and usd_per_second else 0)

  def exposition(self) -> bytes:
    return prom.generate_latest(self.registry)
