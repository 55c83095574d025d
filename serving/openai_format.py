"""OpenAI's request and response bodies (completions and chat completions), apart from
any web framework: the HTTP server (serving/api.py) and the batch mode's OpenAI Batch
lines (serve.py --input; `{"custom_id", "method", "url", "body"}`, as `vllm run-batch`
reads them) share them.

A body is validated by its pydantic model (strict types, unknown fields refused), then
turned into the fields of serving/requests.check_fields, so a bad field gets the same
message whichever way it came.
"""

import json
import time
from typing import Literal

import pydantic

from serving import chat

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error",
               404: "not_found_error", 413: "invalid_request_error",
               429: "rate_limit_error", 500: "server_error", 503: "service_unavailable"}
ENDPOINTS = {"/v1/completions": False, "/v1/chat/completions": True}  # url -> chat?


class ApiError(Exception):
  """A request refused: HTTP `status`, a message that says what to change, the `param`
  at fault (None: the request as a whole), OpenAI's `code` and extra response headers."""

  def __init__(self, status: int, message: str, param: str | None = None,
               code: str | None = None, headers: dict | None = None):
    super().__init__(message)
    self.status, self.message, self.param, self.code = status, message, param, code
    self.headers = headers or {}

  def body(self) -> dict:
    return {"error": {"message": self.message, "type": ERROR_TYPES.get(self.status, "error"),
                      "param": self.param, "code": self.code}}


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


def parse_body(chat_mode: bool, fields) -> _Body:
  """The body of a completions (or, `chat_mode`, chat completions) request from its JSON
  bytes or its decoded object; ApiError(400) naming the field that is wrong."""
  model_type = ChatBody if chat_mode else CompletionBody
  if isinstance(fields, (bytes, str)):
    try:
      fields = json.loads(fields)
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


def request_fields(body: _Body, *, model_name: str, chat_template) -> dict:
  """serving/requests.check_fields's fields of a validated body: the prompt (a chat's
  rendered by `chat_template`, chat.load_template's, or a 400 when None) and
  the sampling fields. ApiError for what OpenAI's API has and this server does not."""
  if body.model is not None and body.model != model_name:
    raise ApiError(404, f"model `{body.model}` is not served here; this server serves "
                   f"`{model_name}`", "model", "model_not_found")
  if body.n != 1:
    raise ApiError(400, "`n` must be 1 (send one request per completion)", "n")
  for name in ("presence_penalty", "frequency_penalty"):
    if getattr(body, name) != 0:
      raise ApiError(400, f"`{name}` is not supported; leave it 0", name)
  fields = {"stop": body.stop}
  for name in ("max_tokens", "temperature", "top_p", "top_k", "seed"):
    if getattr(body, name) is not None:
      fields[name] = getattr(body, name)
  if isinstance(body, ChatBody):
    if chat_template is None:
      raise ApiError(400, "this checkpoint has no chat template (tokenizer_config.json's "
                     "chat_template): use /v1/completions", "messages")
    if not body.messages:
      raise ApiError(400, "`messages` is empty", "messages")
    if body.max_completion_tokens is not None:
      fields["max_tokens"] = body.max_completion_tokens
    try:
      fields["prompt"] = chat.render(chat_template,
                                     [m.model_dump(exclude_none=True) for m in body.messages])
    except chat.TemplateError as error:
      raise ApiError(400, f"the chat template refused the messages: {error}",
                     "messages") from None
    fields["logprobs"] = body.logprobs
    return fields
  prompt = body.prompt
  if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
    if len(prompt) != 1:
      raise ApiError(400, f"one prompt per request (`prompt` holds {len(prompt)} strings)",
                     "prompt")
    prompt = prompt[0]
  fields["prompt" if isinstance(prompt, str) else "prompt_tokens"] = prompt
  if body.logprobs is not None and not 0 <= body.logprobs <= 5:
    raise ApiError(400, f"`logprobs` must be in [0, 5], got {body.logprobs}", "logprobs")
  fields["logprobs"] = body.logprobs is not None
  if body.echo:
    raise ApiError(400, "`echo` is not supported", "echo")
  return fields


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict:
  return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
          "total_tokens": prompt_tokens + completion_tokens,
          "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def _logprobs(chat_mode: bool, tokens, logprobs, token_text) -> dict:
  if chat_mode:
    return {"content": [{"token": token_text(t), "logprob": p, "bytes": None,
                         "top_logprobs": []} for t, p in zip(tokens, logprobs)]}
  texts = [token_text(t) for t in tokens]
  offsets, at = [], 0
  for text in texts:
    offsets.append(at)
    at += len(text)
  return {"tokens": texts, "token_logprobs": list(logprobs), "top_logprobs": None,
          "text_offset": offsets}


def response_body(*, chat_mode: bool, ident: str, created: int, model_name: str, text: str,
                  tokens: list, logprobs: list | None, finish_reason: str,
                  prompt_tokens: int, cached_tokens: int, token_text) -> dict:
  """A (chat) completion response: one choice with `text`, its `token_ids` (ringlm's
  addition, as vLLM's return_token_ids), `logprobs` when asked (None: not asked;
  `token_text(id)` names a token) and `usage`."""
  choice = {"index": 0, "finish_reason": finish_reason, "token_ids": list(tokens),
            "logprobs": None if logprobs is None else
            _logprobs(chat_mode, tokens, logprobs, token_text)}
  if chat_mode:
    choice["message"] = {"role": "assistant", "content": text}
  else:
    choice["text"] = text
  return {"id": ident, "object": "chat.completion" if chat_mode else "text_completion",
          "created": created, "model": model_name, "choices": [choice],
          "usage": usage(prompt_tokens, len(tokens), cached_tokens)}


BATCH_FIELDS = {"custom_id", "method", "url", "body"}


def batch_line(fields: dict) -> tuple[str, bool, dict]:
  """(custom_id, chat?, body) of an OpenAI Batch input line; ApiError naming what is
  wrong (a streamed body is refused: a batch result is one response)."""
  unknown = sorted(set(fields) - BATCH_FIELDS)
  missing = sorted(BATCH_FIELDS - set(fields))
  if unknown or missing:
    raise ApiError(400, f"an OpenAI Batch line has the fields {sorted(BATCH_FIELDS)}"
                   + (f"; unknown: {', '.join(unknown)}" if unknown else "")
                   + (f"; missing: {', '.join(missing)}" if missing else ""),
                   (unknown or missing)[0])
  if not isinstance(fields["custom_id"], str):
    raise ApiError(400, "`custom_id` must be a string", "custom_id")
  if fields["method"] != "POST":
    raise ApiError(400, f"`method` must be POST, got {fields['method']!r}", "method")
  if fields["url"] not in ENDPOINTS:
    raise ApiError(404, f"`url` {fields['url']!r} is not served; use one of "
                   f"{', '.join(ENDPOINTS)}", "url")
  if isinstance(fields["body"], dict) and fields["body"].get("stream"):
    raise ApiError(400, "`stream` has no meaning in a batch file; leave it false", "stream")
  return fields["custom_id"], ENDPOINTS[fields["url"]], fields["body"]


def batch_output(custom_id: str, chat_mode: bool, result: dict, *, model_name: str,
                 token_text) -> dict:
  """The OpenAI Batch output line of request `custom_id` given its result (serve.py's
  record: tokens, completion, ... or an error with its status)."""
  request_id = f"batch_req_{custom_id}"
  if result["finish_reason"] == "error":
    status = result.get("status", 500)
    body = ApiError(status, result["error"], result.get("param"),
                    "context_length_exceeded" if status == 413 else None).body()
  else:
    status = 200
    body = response_body(
        chat_mode=chat_mode, ident=("chatcmpl-" if chat_mode else "cmpl-") + custom_id,
        created=int(time.time()), model_name=model_name, text=result["completion"],
        tokens=result["tokens"], logprobs=result.get("logprobs"),
        finish_reason=result["finish_reason"], prompt_tokens=result["prompt_tokens"],
        cached_tokens=0, token_text=token_text)
  return {"id": request_id, "custom_id": custom_id, "error": None,
          "response": {"status_code": status, "request_id": request_id, "body": body}}
