"""Passkey-retrieval texts (Landmark Attention / Position Interpolation template).

  <intro> <filler ...> The pass key is 71432. Remember it. 71432 is the pass key.
  <filler ...> What is the pass key? The pass key is 71432

The key sits at a chosen depth of the filler. The same generator makes evaluation
prompts (tools/eval_passkey.py) and, with `data.passkey_fraction`, training documents
that teach a small model the task.
"""

import random

INTRO = ("There is an important info hidden inside a lot of irrelevant text. Find it and "
         "memorize it. I will quiz you about the important information there.\n")
FILLER = ("The grass is green. The sky is blue. The sun is yellow. Here we go. There and back "
          "again.\n")
QUESTION = "What is the pass key? The pass key is"


def key_sentence(key: str) -> str:
  return f"The pass key is {key}. Remember it. {key} is the pass key.\n"


def prompt(key: str, fillers: int, depth: float) -> str:
  """The prompt (ending in QUESTION, the answer " <key>" not included) with `fillers`
  filler lines, the key after round(depth * fillers) of them."""
  before = round(depth * fillers)
  return INTRO + FILLER * before + key_sentence(key) + FILLER * (fillers - before) + QUESTION


def random_key(rng: random.Random) -> str:
  return str(rng.randint(10_000, 99_999))


def training_documents(count: int, max_fillers: int, seed: int) -> list[str]:
  """`count` complete passkey documents (prompt and answer) of random lengths and depths."""
  rng = random.Random(seed)
  documents = []
  for _ in range(count):
    key = random_key(rng)
    documents.append(prompt(key, rng.randint(1, max_fillers), rng.random()) + f" {key}.\n")
  return documents
