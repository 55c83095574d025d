"""Requests: one JSON object per request, parsed and checked, or a RequestError that says
what is wrong. The batch command line (serve.py) and any other front end share these
checks, so a bad request gets the same message everywhere.

  {"id": 7, "prompt": "def fib(n):", "max_tokens": 64, "temperature": 0, "top_k": 0,
   "top_p": 1.0, "stop": ["\\n\\n"], "seed": 0, "logprobs": false}

(`prompt_tokens`: [ids] instead of `prompt`.) A line may instead be an OpenAI Batch line,
`{"custom_id", "method": "POST", "url": "/v1/completions" | "/v1/chat/completions",
"body": {...}}`, read by serving/openai_format.py (the body as the HTTP server reads it).
"""

import dataclasses
import json
import math

REQUEST_FIELDS = {"id", "prompt", "prompt_tokens", "max_tokens", "temperature", "top_k",
                  "top_p", "stop", "seed", "logprobs"}


class RequestError(ValueError):
  """A request that cannot be served; the message says what is wrong, `param` names the
  field (None: the request as a whole), `status` is the HTTP status a server answers
  with (400, or 413 for a prompt beyond the model's context) and `custom_id` is an
  OpenAI Batch line's (None: not such a line)."""

  def __init__(self, message: str, param: str | None = None, status: int = 400,
               custom_id: str | None = None):
    super().__init__(message)
    self.param, self.status, self.custom_id = param, status, custom_id


@dataclasses.dataclass
class Request:
  line: int                 # 1-based line number in the input file
  id: object                # the request's `id`, echoed back
  prompt_tokens: list       # token ids
  max_tokens: int
  temperature: float = 0.0  # 0: greedy
  top_k: int = 0            # 0: no limit
  top_p: float = 1.0
  stop: tuple = ()
  seed: int = 0
  logprobs: bool = False
  endpoint: str | None = None  # an OpenAI Batch line's url (its result is written that way)


def _is_int(value) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool)


def parse_request(line: int, raw: bytes, *, tokenizer, vocab_size: int, max_context: int,
                  default_max_tokens: int, default_seed: int, model_name: str = "",
                  chat_template=None) -> Request:
  """A Request from one input line (ringlm's fields or an OpenAI Batch line, whose body's
  `model`, when given, must be `model_name`; chats need `chat_template`), or
  RequestError naming what is wrong."""
  try:
    text = raw.decode("utf-8")
  except UnicodeDecodeError as error:
    raise RequestError(f"the line is not UTF-8 (byte {error.start})") from None
  if not text.strip():
    raise RequestError("empty line")
  try:
    fields = json.loads(text)
  except json.JSONDecodeError as error:
    raise RequestError(f"invalid JSON: {error}") from None
  if not isinstance(fields, dict):
    raise RequestError("a request is a JSON object")
  check = dict(tokenizer=tokenizer, vocab_size=vocab_size, max_context=max_context,
               default_max_tokens=default_max_tokens, default_seed=default_seed)
  if "custom_id" in fields:
    from serving import openai_format
    try:
      custom_id, chat_mode, body = openai_format.batch_line(fields)
      body = openai_format.parse_body(chat_mode, body)
      request = check_fields(line, openai_format.request_fields(
          body, model_name=model_name, chat_template=chat_template), **check)
    except openai_format.ApiError as error:
      raise RequestError(error.message, error.param, error.status,
                         str(fields["custom_id"])) from None
    except RequestError as error:
      error.custom_id = str(fields["custom_id"])
      raise
    request.id, request.endpoint = custom_id, fields["url"]
    return request
  unknown = sorted(set(fields) - REQUEST_FIELDS)
  if unknown:
    raise RequestError(f"unknown field(s) {', '.join(unknown)}; known: "
                       f"{', '.join(sorted(REQUEST_FIELDS))}", unknown[0])
  return check_fields(line, fields, **check)


def check_fields(line: int, fields: dict, *, tokenizer, vocab_size: int, max_context: int,
                 default_max_tokens: int, default_seed: int) -> Request:
  """A Request from a request's fields (REQUEST_FIELDS; the batch file's and the HTTP
  server's), or RequestError naming the field that is wrong."""
  request_id = fields.get("id")
  if ("prompt" in fields) == ("prompt_tokens" in fields):
    raise RequestError("give exactly one of `prompt` (text) and `prompt_tokens` (ids)",
                       "prompt")
  if "prompt" in fields:
    prompt = fields["prompt"]
    if not isinstance(prompt, str):
      raise RequestError("`prompt` must be a string", "prompt")
    if tokenizer is None:
      raise RequestError("this checkpoint has no tokenizer: send `prompt_tokens`", "prompt")
    tokens = list(tokenizer.encode(prompt))
  else:
    tokens = fields["prompt_tokens"]
    if not isinstance(tokens, list) or not all(_is_int(t) for t in tokens):
      raise RequestError("`prompt_tokens` must be a list of integers", "prompt")
    bad = [t for t in tokens if not 0 <= t < vocab_size]
    if bad:
      raise RequestError(f"`prompt_tokens` holds id {bad[0]} outside the vocabulary "
                         f"[0, {vocab_size})", "prompt")
  if not tokens:
    raise RequestError("the prompt is empty", "prompt")

  max_tokens = fields.get("max_tokens", default_max_tokens)
  if max_tokens is None:
    max_tokens = default_max_tokens
  if not _is_int(max_tokens) or max_tokens < 1:
    raise RequestError(f"`max_tokens` must be a positive integer, got {max_tokens!r}",
                       "max_tokens")
  if len(tokens) + max_tokens > max_context:
    raise RequestError(f"prompt ({len(tokens)} tokens) + max_tokens ({max_tokens}) exceeds the "
                       f"model's context of {max_context} tokens (model.max_seq_len)",
                       "max_tokens" if len(tokens) < max_context else "prompt", status=413)
  temperature = fields.get("temperature", 0.0)
  if not _is_number(temperature) or not math.isfinite(temperature) or temperature < 0:
    raise RequestError(f"`temperature` must be a finite number >= 0, got {temperature!r}",
                       "temperature")
  top_k = fields.get("top_k", 0)
  if not _is_int(top_k) or top_k < -1:
    raise RequestError(f"`top_k` must be an integer >= 0 (0 or -1: no limit), got {top_k!r}",
                       "top_k")
  top_p = fields.get("top_p", 1.0)
  if not _is_number(top_p) or not 0 < top_p <= 1:  # NaN fails both comparisons
    raise RequestError(f"`top_p` must be in (0, 1], got {top_p!r}", "top_p")
  stop = fields.get("stop", [])
  stop = [] if stop is None else [stop] if isinstance(stop, str) else stop
  if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
    raise RequestError("`stop` must be a list of non-empty strings", "stop")
  if stop and tokenizer is None:
    raise RequestError("`stop` needs a tokenizer, and this checkpoint has none", "stop")
  seed = fields.get("seed", default_seed)
  seed = default_seed if seed is None else seed
  if not _is_int(seed):
    raise RequestError(f"`seed` must be an integer, got {seed!r}", "seed")
  logprobs = fields.get("logprobs", False)
  if not isinstance(logprobs, bool):
    raise RequestError(f"`logprobs` must be true or false, got {logprobs!r}", "logprobs")
  return Request(line=line, id=request_id, prompt_tokens=tokens, max_tokens=max_tokens,
                 temperature=float(temperature), top_k=max(top_k, 0), top_p=float(top_p),
                 stop=tuple(stop), seed=seed % 2 ** 32, logprobs=logprobs)


def error_record(line: int, request_id, message: str, status: int = 400,
                 param: str | None = None) -> dict:
  """The result of a request that could not be served; `status` as an HTTP server would
  answer it (400 a bad field, 413 too long, 500 failed while running)."""
  return {"line": line, "id": request_id, "finish_reason": "error", "error": message,
          "status": status, "param": param}


def request_id(raw: bytes):
  """The `id` (an OpenAI Batch line's `custom_id`) of a line that failed to parse, when
  it has one."""
  try:
    fields = json.loads(raw)
  except (ValueError, UnicodeDecodeError):
    return None
  if not isinstance(fields, dict):
    return None
  return fields["custom_id"] if "custom_id" in fields else fields.get("id")
