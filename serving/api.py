"""The OpenAI-compatible HTTP API over the continuous-batching scheduler (FastAPI; serve.py
--port runs it under uvicorn).

  POST /v1/completions        prompt (text or token ids) -> text; stream: server-sent events
  POST /v1/chat/completions   messages, rendered by the checkpoint's chat template
  GET  /v1/models             the one model served
  GET  /health                200 when serving; 503 while loading or draining
  GET  /metrics               Prometheus (serving/metrics.py)

Request bodies are read by serving/openai_format.py (pydantic models, unknown fields
refused), then checked by the batch mode's own checks (serving/requests.check_fields),
so a bad field gets the same message in both.
Every error has OpenAI's shape, {"error": {"message", "type", "param", "code"}}, with
its status: 400 a bad field, 401 a missing or wrong API key, 404 an unknown model or
path, 413 a body over serve.max_body_mb or a prompt beyond the context, 429 the queue
full (with Retry-After), 503 loading or draining.
"""

import asyncio
import json
import secrets
import time

from fastapi import FastAPI, Request as HttpRequest
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from serving import openai_format
from serving.openai_format import ApiError
from serving.requests import RequestError, check_fields
from serving.scheduler import QueueFull


def error_response(error: ApiError) -> JSONResponse:
  return JSONResponse(error.body(), status_code=error.status, headers=error.headers)

class Server:
  """The app's state: what it serves and whether it is ready.

  Args:
    scheduler: a started serving/scheduler.Scheduler (None while loading).
    model_name: the id clients send as `model` (serve.py: the checkpoint's directory).
    tokenizer, chat_template: the checkpoint's (None: token prompts only / no chat).
    vocab_size, max_context: for the request checks.
    defaults: {"max_tokens", "seed"} of a request that omits them.
    api_key: required as `Authorization: Bearer <key>` on /v1/* when set.
    max_body_bytes: larger bodies get 413.
    metrics: serving/metrics.ServerMetrics.
    capacity: {"max_context", "batch"} for /health.
  """

  def __init__(self, *, model_name, tokenizer, chat_template, vocab_size, max_context,
               defaults, api_key, max_body_bytes, metrics, capacity):
    self.scheduler = None
    self.state = "loading"
    self.model_name, self.tokenizer, self.chat_template = model_name, tokenizer, chat_template
    self.vocab_size, self.max_context, self.defaults = vocab_size, max_context, defaults
    self.api_key, self.max_body_bytes, self.metrics = api_key, max_body_bytes, metrics
    self.capacity = capacity
    self.created = int(time.time())

  def ready(self, scheduler) -> None:
    self.scheduler, self.state = scheduler, "ready"

  # --- the parts of a request --------------------------------------------------------

  def _authorize(self, http: HttpRequest) -> None:
    if not self.api_key:
      return
    given = http.headers.get("authorization", "")
    if not secrets.compare_digest(given.encode(), f"Bearer {self.api_key}".encode()):
      raise ApiError(401, "a valid API key is required: Authorization: Bearer <key>",
                     code="invalid_api_key")

  async def _body(self, http: HttpRequest) -> bytes:
    declared = http.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
      raise ApiError(413, f"the body has {declared} bytes; the limit is "
                     f"{self.max_body_bytes} (serve.max_body_mb)")
    chunks, size = [], 0
    async for chunk in http.stream():
      size += len(chunk)
      if size > self.max_body_bytes:
        raise ApiError(413, f"the body exceeds {self.max_body_bytes} bytes (serve.max_body_mb)")
      chunks.append(chunk)
    return b"".join(chunks)

  def _available(self) -> None:
    if self.state != "ready":
      raise ApiError(503, f"the server is {self.state}", headers={"Retry-After": "5"})

  def _submit(self, fields: dict, on_update):
    try:
      request = check_fields(0, fields, tokenizer=self.tokenizer, vocab_size=self.vocab_size,
                             max_context=self.max_context, **self.defaults)
    except RequestError as error:
      raise ApiError(error.status, str(error), error.param,
                     "context_length_exceeded" if error.status == 413 else None) from None
    try:
      return self.scheduler.submit(request, on_update)
    except QueueFull as error:
      self.metrics.rejected.labels("429").inc()
      raise ApiError(429, f"the server is busy: {error}; retry later",
                     headers={"Retry-After": "1"}) from None

  def _token_text(self, token: int) -> str:
    return self.tokenizer.decode([token]) if self.tokenizer is not None else str(token)

  def _visible_text(self, job, done: bool) -> str:
    """The completion's text that is safe to send so far: once the job ended (`done`, as
    the caller read it before this call), all of it; before, what no stop string could
    still cut and no incomplete character ends."""
    completion = job.completion
    if self.tokenizer is None:
      return ""
    if done:
      return completion.completion or ""
    text = completion.text(self.tokenizer).rstrip("\ufffd")
    hold = max((len(s) for s in job.request.stop), default=1) - 1
    return text[:max(len(text) - hold, 0)]

  # --- endpoints -----------------------------------------------------------------------

  async def completions(self, http: HttpRequest, chat_mode: bool):
    self._authorize(http)
    self._available()
    body = openai_format.parse_body(chat_mode, await self._body(http))
    fields = openai_format.request_fields(body, model_name=self.model_name,
                                          chat_template=self.chat_template)
    loop = asyncio.get_running_loop()
    changed = asyncio.Event()
    job = self._submit(fields, lambda job: loop.call_soon_threadsafe(changed.set))
    ident = ("chatcmpl-" if chat_mode else "cmpl-") + secrets.token_hex(12)
    include_usage = bool((body.stream_options or {}).get("include_usage"))
    if body.stream:
      return StreamingResponse(self._stream(http, job, changed, ident, chat_mode, include_usage),
                               media_type="text/event-stream")
    try:
      while not job.done:
        try:
          await asyncio.wait_for(changed.wait(), timeout=0.5)
        except asyncio.TimeoutError:
          if await http.is_disconnected():
            self.scheduler.cancel(job)
            return Response(status_code=499)
        changed.clear()
    except asyncio.CancelledError:
      self.scheduler.cancel(job)
      raise
    if job.error is not None:
      raise ApiError(500, f"the request failed: {job.error}")
    return JSONResponse(self._response(job, ident, chat_mode))

  def _usage(self, job) -> dict:
    return openai_format.usage(len(job.request.prompt_tokens), len(job.completion.tokens),
                               job.cached_tokens)

  def _response(self, job, ident: str, chat_mode: bool) -> dict:
    completion = job.completion
    return openai_format.response_body(
        chat_mode=chat_mode, ident=ident, created=int(time.time()),
        model_name=self.model_name, text=self._visible_text(job, job.done),
        tokens=completion.tokens,
        logprobs=completion.logprobs if job.request.logprobs else None,
        finish_reason=completion.finish_reason, prompt_tokens=len(job.request.prompt_tokens),
        cached_tokens=job.cached_tokens, token_text=self._token_text)

  async def _stream(self, http, job, changed, ident, chat_mode, include_usage):
    created = int(time.time())
    kind = "chat.completion.chunk" if chat_mode else "text_completion"

    def chunk(text=None, finish=None, usage=None, first=False):
      if usage is not None:
        choices = []
      elif chat_mode:
        delta = {"role": "assistant"} if first else {}
        if text:
          delta["content"] = text
        choices = [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]
      else:
        choices = [{"index": 0, "text": text or "", "finish_reason": finish,
                    "logprobs": None}]
      body = {"id": ident, "object": kind, "created": created, "model": self.model_name,
              "choices": choices}
      if usage is not None:
        body["usage"] = usage
      return f"data: {json.dumps(body)}\n\n"

    sent = 0
    try:
      if chat_mode:
        yield chunk(first=True)
      while True:
        await changed.wait()
        changed.clear()
        # `done` read once, before the text: the scheduler may end the job in between,
        # and a text read as unfinished would hold back its last incomplete character
        done = job.done
        text = self._visible_text(job, done)
        if len(text) > sent:
          yield chunk(text[sent:])
          sent = len(text)
        if done:
          break
      if job.error is not None:
        error = ApiError(500, f"the request failed: {job.error}")
        yield f"data: {json.dumps(error.body())}\n\n"
      else:
        yield chunk(finish=job.completion.finish_reason)
        if include_usage:
          yield chunk(usage=self._usage(job))
      yield "data: [DONE]\n\n"
    finally:  # the client went away (or the stream ended): free the slot
      if not job.done:
        self.scheduler.cancel(job)

  def health(self) -> JSONResponse:
    body = {"status": self.state, **self.capacity}
    if self.scheduler is not None:
      body.update(in_flight=self.scheduler.in_flight())
    return JSONResponse(body, status_code=200 if self.state == "ready" else 503)

  def models(self, http: HttpRequest) -> JSONResponse:
    self._authorize(http)
    return JSONResponse({"object": "list", "data": [
        {"id": self.model_name, "object": "model", "created": self.created,
         "owned_by": "ringlm", "max_model_len": self.max_context}]})

  def metrics_response(self) -> Response:
    if self.scheduler is not None:
      self.metrics.throughput(self.scheduler.stats)
    return Response(self.metrics.exposition(), media_type="text/plain; version=0.0.4")


def make_app(server: Server) -> FastAPI:
  app = FastAPI(title="ringlm", docs_url=None, redoc_url=None, openapi_url=None)

  @app.exception_handler(ApiError)
  async def api_error(_, error: ApiError):
    if error.status >= 400 and error.status != 429:
      server.metrics.rejected.labels(str(error.status)).inc()
    return error_response(error)

  @app.exception_handler(StarletteHTTPException)
  async def http_error(_, error: StarletteHTTPException):
    return error_response(ApiError(error.status_code, str(error.detail)))

  @app.post("/v1/completions")
  async def completions(http: HttpRequest):
    return await server.completions(http, chat_mode=False)

  @app.post("/v1/chat/completions")
  async def chat_completions(http: HttpRequest):
    return await server.completions(http, chat_mode=True)

  @app.get("/v1/models")
  async def models(http: HttpRequest):
    return server.models(http)

  @app.get("/health")
  async def health():
    return server.health()

  @app.get("/metrics")
  async def metrics():
    return server.metrics_response()

  return app
