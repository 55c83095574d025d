"""Chat messages -> a prompt, by the checkpoint's own chat template (a converted model's
`tokenizer_config.json` "chat_template"), rendered with Jinja2 in its sandbox as
transformers' `apply_chat_template` does (trim_blocks, lstrip_blocks,
add_generation_prompt=True, the bos/eos token strings, `raise_exception`)."""

import json
import os

import jinja2
from jinja2 import sandbox


class TemplateError(ValueError):
  """The template refused the messages (its raise_exception) or failed to render."""


def load_template(assets_dir: str):
  """The chat template of `assets_dir`/tokenizer_config.json, compiled (render's first
  argument), or None when there is none."""
  path = os.path.join(assets_dir, "tokenizer_config.json")
  try:
    with open(path) as f:
      config = json.load(f)
  except (OSError, json.JSONDecodeError):
    return None
  template = config.get("chat_template")
  if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
    named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
    template = named.get("default")
  if not isinstance(template, str):
    return None
  special = {}
  for name in ("bos_token", "eos_token"):
    token = config.get(name)
    special[name] = token.get("content", "") if isinstance(token, dict) else (token or "")
  return compile_template(template, special)


def _raise(message):
  raise TemplateError(message)


def compile_template(template: str, special: dict):
  """(Jinja2 template, the bos/eos strings it may use): render's first argument."""
  environment = sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
  environment.globals["raise_exception"] = _raise
  return environment.from_string(template), special


def render(compiled, messages: list[dict]) -> str:
  """The prompt text of `messages` ([{"role", "content"}]) with the assistant's turn
  opened; `compiled` from load_template (or compile_template)."""
  template, special = compiled
  try:
    return template.render(messages=messages, add_generation_prompt=True, **special)
  except TemplateError:
    raise
  except jinja2.TemplateError as error:
    raise TemplateError(str(error)) from None
