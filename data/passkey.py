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


def prompt_ids(tokenizer, key: str, length: int, depth: float) -> tuple[list[int], int]:
  """(token ids of prompt + answer, `length` + 1 of them so that the model reads
  exactly `length`; index of the first answer token). Filler lines fill the length; a
  partial filler line tops it up."""
  encode = tokenizer.encode
  intro, filler = encode(INTRO), encode(FILLER)
  key_ids, question, answer = (encode(key_sentence(key)), encode(QUESTION),
                               encode(" " + key))
  fixed = len(intro) + len(key_ids) + len(question) + len(answer)
  fillers, partial = divmod(length + 1 - fixed, len(filler))
  if fillers < 1:
    raise ValueError(f"--lengths: {length} tokens cannot hold the passkey prompt; use at "
                     f"least {fixed + len(filler)}")
  before = round(depth * fillers)
  ids = (intro + filler[len(filler) - partial:] + filler * before + key_ids
         + filler * (fillers - before) + question)
  return ids + answer, len(ids)


def k_max(lengths, accuracy_by_length, threshold):
  """The PI paper's k_max: the largest length such that accuracy is at least
  `threshold` at it and at every shorter length (0 when the shortest fails)."""
  best = 0
  for length in sorted(lengths):
    if accuracy_by_length[length] < threshold:
      break
    best = length
  return best
