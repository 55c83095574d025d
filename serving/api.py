"""The OpenAI-compatible HTTP API over the continuous-batching scheduler (FastAPI; serve.py
--port runs it under uvicorn).

  POST /v1/completions        prompt (text or token ids) -> text; stream: server-sent events
  POST /v1/chat/completions   messages, rendered by the checkpoint's chat template
  GET  /v1/models             the one model served
  GET  /health                200 when serving; 503 while loading or draining
  GET  /metrics               Prometheus (serving/metrics.py)

Request bodies are pydantic models (unknown fields refused), then the batch mode's own
checks (serving/requests.check_fields), so a bad field gets the same message in both.
Every error has OpenAI's shape, {"error": {"message", "type", "param", "code"}}, with
its status: 400 a bad field, 401 a missing or wrong API key, 404 an unknown model or
path, 413 a body over serve.max_body_mb or a prompt beyond the context, 429 the queue
full (with Retry-After), 503 loading or draining.
"""

import asyncio
import json
import secrets
import time
from typing import Literal

import pydantic
from fastapi import FastAPI, Request as HttpRequest
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from serving import chat
from serving.requests import RequestError, check_fields
from serving.scheduler import QueueFull

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error",
               404: "not_found_error", 413: "invalid_request_error",
               429: "rate_limit_error", 500: "server_error", 503: "service_unavailable"}


class ApiError(Exception):
  def __init__(self, status: int, message: str, param: str | None = None,
               code: str | None = None, headers: dict | None = None):
    super().__init__(message)
    self.status, self.message, self.param, self.code = status, message, param, code
    self.headers = headers or {}


def error_response(error: ApiError) -> JSONResponse:
  body = {"error": {"message": error.message, "type": ERROR_TYPES.get(error.status, "error"),
                    "param": error.param, "code": error.code}}
  return JSONResponse(body, status_code=error.status, headers=error.headers)


class _Body(pydantic.BaseModel):
  """Fields both endpoints take (OpenAI's names). Strict: "5" is not an integer."""
  model_config = pydantic.ConfigDict(extra="forbid", strict=True)
  model: str | None = None
  max_tokens: int | None = None
  temperature: float | None = None
  top_p: float | None = None
  top_k: int | None = None
  stop: str | list[str] | None = None
  seed: int | None = None
  stream: bool = False
  stream_options: dict | None = None
  user: str | None = None
  n: int = 1
  presence_penalty: float = 0.0
  frequency_penalty: float = 0.0


class CompletionBody(_Body):
  prompt: str | list[int] | list[str]
  logprobs: int | None = None  # OpenAI: how many alternatives; here the chosen token's only
  echo: bool = False


class Message(pydantic.BaseModel):
  model_config = pydantic.ConfigDict(extra="forbid", strict=True)
  role: Literal["system", "user", "assistant", "developer"]
  content: str
  name: str | None = None


class ChatBody(_Body):
  messages: list[Message]
  logprobs: bool = False
  top_logprobs: int | None = None
  max_completion_tokens: int | None = None


def _validate(model_type, raw: bytes):
  try:
    fields = json.loads(raw)
  except (json.JSONDecodeError, UnicodeDecodeError) as error:
    raise ApiError(400, f"the body is not valid JSON: {error}") from None
  if not isinstance(fields, dict):
    raise ApiError(400, "the body must be a JSON object")
  try:
    return model_type.model_validate(fields)
  except pydantic.ValidationError as error:
    first = error.errors()[0]
    param = ".".join(str(part) for part in first["loc"]) or None
    what = "unknown field" if first["type"] == "extra_forbidden" else first["msg"]
    known = ", ".join(sorted(model_type.model_fields))
    hint = f"; known fields: {known}" if first["type"] == "extra_forbidden" else ""
    raise ApiError(400, f"`{param}`: {what}{hint}", param) from None


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

  def _fields(self, body: _Body) -> dict:
    """The shared checks' fields from an OpenAI body's."""
    if body.model is not None and body.model != self.model_name:
      raise ApiError(404, f"model `{body.model}` is not served here; this server serves "
                     f"`{self.model_name}`", "model", "model_not_found")
    if body.n != 1:
      raise ApiError(400, "`n` must be 1 (send one request per completion)", "n")
    for name in ("presence_penalty", "frequency_penalty"):
      if getattr(body, name) != 0:
        raise ApiError(400, f"`{name}` is not supported; leave it 0", name)
    fields = {"stop": body.stop}
    for name in ("max_tokens", "temperature", "top_p", "top_k", "seed"):
      if getattr(body, name) is not None:
        fields[name] = getattr(body, name)
    return fields

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

  def _visible_text(self, job) -> str:
    """The completion's text that is safe to send so far: once the job ended, all of it;
    before, what no stop string could still cut and no incomplete character ends."""
    completion = job.completion
    if self.tokenizer is None:
      return ""
    if job.done:
      return completion.completion or ""
    text = completion.text(self.tokenizer).rstrip("\ufffd")
    hold = max((len(s) for s in job.request.stop), default=1) - 1
    return text[:max(len(text) - hold, 0)]

  # --- endpoints -----------------------------------------------------------------------

  async def completions(self, http: HttpRequest, chat_mode: bool):
    self._authorize(http)
    self._available()
    body = _validate(ChatBody if chat_mode else CompletionBody, await self._body(http))
    fields = self._fields(body)
    if chat_mode:
      if self.chat_template is None:
        raise ApiError(400, "this checkpoint has no chat template (tokenizer_config.json's "
                       "chat_template): use /v1/completions", "messages")
      if not body.messages:
        raise ApiError(400, "`messages` is empty", "messages")
      if body.max_completion_tokens is not None:
        fields["max_tokens"] = body.max_completion_tokens
      try:
        fields["prompt"] = chat.render(self.chat_template,
                                       [m.model_dump(exclude_none=True) for m in body.messages])
      except chat.TemplateError as error:
        raise ApiError(400, f"the chat template refused the messages: {error}",
                       "messages") from None
      fields["logprobs"] = body.logprobs
    else:
      prompt = body.prompt
      if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
        if len(prompt) != 1:
          raise ApiError(400, "one prompt per request (`prompt` holds "
                         f"{len(prompt)} strings)", "prompt")
        prompt = prompt[0]
      fields["prompt" if isinstance(prompt, str) else "prompt_tokens"] = prompt
      if body.logprobs is not None and not 0 <= body.logprobs <= 5:
        raise ApiError(400, f"`logprobs` must be in [0, 5], got {body.logprobs}", "logprobs")
      fields["logprobs"] = body.logprobs is not None
      if body.echo:
        raise ApiError(400, "`echo` is not supported", "echo")

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
    prompt = len(job.request.prompt_tokens)
    generated = len(job.completion.tokens)
    return {"prompt_tokens": prompt, "completion_tokens": generated,
            "total_tokens": prompt + generated,
            "prompt_tokens_details": {"cached_tokens": job.cached_tokens}}

  def _logprobs(self, job, chat_mode: bool):
    if not job.request.logprobs:
      return None
    tokens, logprobs = job.completion.tokens, job.completion.logprobs
    if chat_mode:
      return {"content": [{"token": self._token_text(t), "logprob": p, "bytes": None,
                           "top_logprobs": []} for t, p in zip(tokens, logprobs)]}
    texts = [self._token_text(t) for t in tokens]
    offsets, at = [], 0
    for text in texts:
      offsets.append(at)
      at += len(text)
    return {"tokens": texts, "token_logprobs": logprobs, "top_logprobs": None,
            "text_offset": offsets}

  def _response(self, job, ident: str, chat_mode: bool) -> dict:
    text = self._visible_text(job)
    choice = {"index": 0, "finish_reason": job.completion.finish_reason,
              "logprobs": self._logprobs(job, chat_mode),
              "token_ids": job.completion.tokens}
    if chat_mode:
      choice["message"] = {"role": "assistant", "content": text}
    else:
      choice["text"] = text
    return {"id": ident, "object": "chat.completion" if chat_mode else "text_completion",
            "created": int(time.time()), "model": self.model_name, "choices": [choice],
            "usage": self._usage(job)}

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
        text = self._visible_text(job)
        if len(text) > sent:
          yield chunk(text[sent:])
          sent = len(text)
        if job.done:
          break
      if job.error is not None:
        error = {"error": {"message": f"the request failed: {job.error}",
                           "type": "server_error", "param": None, "code": None}}
        yield f"data: {json.dumps(error)}\n\n"
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
