"""A request's completion as it grows: tokens, log-probabilities, text and why it ended.

Shared by the batch engine (serving/engine.py) and continuous batching
(serving/scheduler.py), so a stop string, an end-of-sequence id or `max_tokens` ends a
request the same way in both.
"""

import dataclasses

from serving.requests import Request


@dataclasses.dataclass
class Completion:
  request: Request
  tokens: list = dataclasses.field(default_factory=list)
  logprobs: list = dataclasses.field(default_factory=list)
  finish_reason: str | None = None  # stop | length (| error, cancelled: front ends')
  completion: str | None = None     # the text, cut at a stop string; None: no tokenizer

  def text(self, tokenizer) -> str:
    """The text of the tokens so far: decoded with the prompt so that a first token's
    leading space survives (sentencepiece drops it when decoding a sequence on its own)."""
    prompt = self.request.prompt_tokens
    context = tokenizer.decode(prompt)
    text = tokenizer.decode(list(prompt) + list(self.tokens))
    return text[len(context):] if text.startswith(context) else tokenizer.decode(self.tokens)

  def append(self, tokens, logprobs, tokenizer, eos_ids) -> bool:
    """Adds generated tokens until the completion ends; True when it has (then
    `finish_reason`, and `completion` when there is a tokenizer, are set)."""
    for token, logprob in zip(tokens, logprobs):
      token = int(token)
      if token in eos_ids:
        self.finish_reason = "stop"
        break
      self.tokens.append(token)
      self.logprobs.append(float(logprob))
      if self.request.stop:
        text = self.text(tokenizer)
        found = [text.find(s) for s in self.request.stop if s in text]
        if found:
          self.completion, self.finish_reason = text[:min(found)], "stop"
          return True
      if len(self.tokens) >= self.request.max_tokens:
        self.finish_reason = "length"
        break
    if self.finish_reason is None:
      return False
    if tokenizer is not None and self.completion is None:
      self.completion = self.text(tokenizer)
    return True
