"""serve.py --port: the OpenAI-compatible server, driven by the official `openai` client
and raw HTTP against a real server process on a free 127.0.0.1 port. Greedy results are
checked against the batch mode's (serve.py --input) for the same requests."""

import concurrent.futures
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx2 as httpx  # openai's own HTTP client
import numpy as np
import openai
import pytest

from tests.test_serve import ROOT, checkpoint_dir, run_serve  # noqa: F401 (a fixture)

CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}assistant:{% endif %}")
# float32: the server and the batch mode must agree to 1e-4 (bf16, the default, differs
# between their computation orders by more)
SERVER_FLAGS = ("--config.serve.dtype=float32", "--config.serve.batch_size=8", "--config.serve.prefill_chunk=64",
                "--config.serve.slot_decode_steps=4", "--config.serve.prefix_block=16",
                "--config.serve.max_body_mb=1")
VOCAB = 512


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


class ServerProcess:
  """serve.py --port=... as a subprocess; `url` once /health says ready."""

  def __init__(self, checkpoint, *flags, env=None):
    self.port = free_port()
    self.url = f"http://127.0.0.1:{self.port}"
    self.log = open(os.path.join(checkpoint, f"server-{self.port}.log"), "w+")
    self.process = subprocess.Popen(
        [sys.executable, "serve.py", f"--checkpoint={checkpoint}", f"--port={self.port}",
         "--cpu_devices=2", *flags], cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT,
        env=dict(os.environ, XLA_FLAGS="", PYTHONPATH=ROOT, **(env or {})))

  def wait_ready(self, timeout=300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
      assert self.process.poll() is None, self.output()
      try:
        if httpx.get(self.url + "/health", timeout=2).status_code == 200:
          return
      except httpx.HTTPError:
        pass
      time.sleep(0.5)
    raise AssertionError(f"not ready after {timeout} s:\n{self.output()}")

  def output(self) -> str:
    self.log.flush()
    self.log.seek(0)
    return self.log.read()[-4000:]

  def terminate(self, timeout=120) -> int:
    if self.process.poll() is None:
      self.process.send_signal(signal.SIGTERM)
    return self.process.wait(timeout)

  def metric(self, name: str, **labels) -> float:
    text = httpx.get(self.url + "/metrics").text
    selector = ",".join(f'{k}="{v}"' for k, v in labels.items())
    pattern = rf"^ringlm_{name}(\{{{re.escape(selector)}\}})? (\S+)$" if selector else \
        rf"^ringlm_{name} (\S+)$"
    match = re.search(pattern, text, re.M)
    return float(match.groups()[-1]) if match else 0.0


@pytest.fixture(scope="module")
def checkpoint(checkpoint_dir):  # noqa: F811
  """The test checkpoint with a chat template (a converted model's tokenizer_config.json)."""
  with open(os.path.join(checkpoint_dir, "assets", "tokenizer_config.json"), "w") as f:
    json.dump({"bos_token": "<s>", "eos_token": "</s>", "chat_template": CHAT_TEMPLATE}, f)
  return checkpoint_dir


@pytest.fixture(scope="module")
def server(checkpoint):
  process = ServerProcess(checkpoint, *SERVER_FLAGS)
  try:
    process.wait_ready()
    yield process
  finally:
    status = process.terminate()
  assert status == 0, process.output()


@pytest.fixture(scope="module")
def client(server):
  return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0,
                       timeout=120)


def mixed_requests(count, seed):
  """`count` requests of mixed prompt (1-120 tokens) and output (1-24 tokens) lengths."""
  rng = np.random.default_rng(seed)
  return [{"prompt_tokens": rng.integers(0, VOCAB, int(rng.integers(1, 121))).tolist(),
           "max_tokens": int(rng.integers(1, 25))} for _ in range(count)]


TEXT_PROMPTS = ["def main(", "import os\nimport sys\n", "class Parser:\n    def __init__(self",
                "# A comment about the tokenizer"]


@pytest.fixture(scope="module")
def batch_reference(checkpoint, tmp_path_factory):
  """The batch mode's greedy results (tokens, logprobs) for the text prompts and for the
  64 mixed requests, in one run."""
  lines = [json.dumps({"prompt": p, "max_tokens": 12, "logprobs": True}).encode() + b"\n"
           for p in TEXT_PROMPTS]
  lines += [json.dumps(r).encode() + b"\n" for r in mixed_requests(64, seed=5)]
  result, output = run_serve(checkpoint, lines, tmp_path_factory.mktemp("batch"),
                             "--config.serve.batch_size=16", "--config.serve.dtype=float32")
  assert result.returncode == 0, result.stderr[-3000:]
  records = [json.loads(line) for line in output.read_text().splitlines()]
  return records[:len(TEXT_PROMPTS)], records[len(TEXT_PROMPTS):]


def token_ids(choice) -> list[int]:
  return choice.model_extra["token_ids"]


def test_completions_and_chat_equal_the_batch_mode(client, batch_reference):
  text_records, _ = batch_reference
  for prompt, record in zip(TEXT_PROMPTS, text_records):
    response = client.completions.create(model="run", prompt=prompt, max_tokens=12,
                                         logprobs=1)
    choice = response.choices[0]
    assert token_ids(choice) == record["tokens"]
    assert choice.text == record["completion"] and choice.finish_reason == record["finish_reason"]
    np.testing.assert_allclose(choice.logprobs.token_logprobs, record["logprobs"], atol=1e-4)
    assert response.usage.prompt_tokens == record["prompt_tokens"]
    assert response.usage.completion_tokens == 12
  # chat: the template's prompt, served as the same completion would be
  messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
  chat = client.chat.completions.create(model="run", messages=messages, max_tokens=6,
                                        logprobs=True)
  rendered = "system: Be brief.\nuser: hi\nassistant:"
  plain = client.completions.create(model="run", prompt=rendered, max_tokens=6)
  assert chat.choices[0].message.role == "assistant"
  assert chat.choices[0].message.content == plain.choices[0].text
  assert token_ids(chat.choices[0]) == token_ids(plain.choices[0])
  assert len(chat.choices[0].logprobs.content) == 6
  assert [m.id for m in client.models.list().data] == ["run"]


def test_openai_batch_lines_are_served_as_the_server_serves_them(checkpoint, client,
                                                                tmp_path):
  bodies = {"/v1/completions": {"prompt": "import os\n", "max_tokens": 7, "logprobs": 1},
            "/v1/chat/completions": {"messages": [{"role": "user", "content": "hello"}],
                                     "max_tokens": 5, "temperature": 0.8, "seed": 3}}
  lines = [json.dumps({"custom_id": f"q{i}", "method": "POST", "url": url, "body": body})
           for i, (url, body) in enumerate(bodies.items())]
  lines += [json.dumps({"custom_id": "bad-url", "method": "POST", "url": "/v1/embeddings",
                        "body": {}}),
            json.dumps({"custom_id": "too-long", "method": "POST", "url": "/v1/completions",
                        "body": {"prompt": "x", "max_tokens": 900}}),
            json.dumps({"custom_id": "bad-field", "method": "POST", "url": "/v1/completions",
                        "body": {"prompt": "x", "max_tokens": "9"}}),
            json.dumps({"prompt": "import os\n", "max_tokens": 7})]
  result, output = run_serve(checkpoint, [line.encode() + b"\n" for line in lines], tmp_path,
                             "--config.serve.dtype=float32")  # as SERVER_FLAGS
  assert result.returncode == 0, result.stderr[-3000:]
  records = [json.loads(line) for line in output.read_text().splitlines()]
  served = [client.completions.create(model="run", **bodies["/v1/completions"]),
            client.chat.completions.create(model="run", **bodies["/v1/chat/completions"])]
  for record, response, custom_id in zip(records, served, ("q0", "q1")):
    assert record["custom_id"] == custom_id and record["error"] is None
    assert record["response"]["status_code"] == 200
    body = record["response"]["body"]
    assert body["object"] == response.object and body["usage"] == response.usage.model_dump(
        exclude_none=True) | {"prompt_tokens_details": {"cached_tokens": 0}}
    assert body["choices"][0]["token_ids"] == token_ids(response.choices[0])
  assert records[0]["response"]["body"]["choices"][0]["logprobs"]["token_logprobs"] == \
      pytest.approx(served[0].choices[0].logprobs.token_logprobs, abs=1e-4)
  statuses = [(r["custom_id"], r["response"]["status_code"], r["response"]["body"]["error"]
               ["param"]) for r in records[2:5]]
  assert statuses == [("bad-url", 404, "url"), ("too-long", 413, "max_tokens"),
                      ("bad-field", 400, "max_tokens")]
  assert records[5]["tokens"] == token_ids(served[0].choices[0])  # ringlm's own format


def test_seeded_sampling_is_reproducible(client):
  ask = lambda seed: token_ids(client.completions.create(
      model="run", prompt="def main(", max_tokens=16, temperature=1.0, seed=seed).choices[0])
  first, again, other = ask(5), ask(5), ask(6)
  assert first == again and first != other


def test_stop_strings_end_the_text_before_them(client, batch_reference):
  record = batch_reference[0][1]
  text = record["completion"]
  stop = text[len(text) // 2:len(text) // 2 + 2]
  response = client.completions.create(model="run", prompt=TEXT_PROMPTS[1], max_tokens=12,
                                       stop=[stop])
  choice = response.choices[0]
  assert choice.finish_reason == "stop" and choice.text == text[:text.index(stop)]


def test_streamed_chunks_concatenate_to_the_text(client):
  for prompt in TEXT_PROMPTS[:2]:
    whole = client.completions.create(model="run", prompt=prompt, max_tokens=20)
    stream = client.completions.create(model="run", prompt=prompt, max_tokens=20,
                                       stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == whole.choices[0].text
    assert chunks[-1].usage.completion_tokens == 20
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
  messages = [{"role": "user", "content": "hello"}]
  whole = client.chat.completions.create(model="run", messages=messages, max_tokens=10)
  stream = client.chat.completions.create(model="run", messages=messages, max_tokens=10,
                                          stream=True)
  assert "".join(c.choices[0].delta.content or "" for c in stream) == \
      whole.choices[0].message.content


def test_64_concurrent_requests_over_8_slots(server, client, batch_reference):
  _, records = batch_reference
  requests = mixed_requests(64, seed=5)
  before = server.metric("requests_total", finish_reason="length")

  def ask(request):
    response = client.completions.create(model="run", prompt=request["prompt_tokens"],
                                         max_tokens=request["max_tokens"])
    return token_ids(response.choices[0])

  with concurrent.futures.ThreadPoolExecutor(64) as pool:
    answers = list(pool.map(ask, requests))
  for answer, record in zip(answers, records):
    assert answer == record["tokens"]
  assert server.metric("requests_total", finish_reason="length") - before == 64
  health = httpx.get(server.url + "/health").json()
  assert health["status"] == "ready" and health["in_flight"] == 0
  assert health["batch"] == 8 and health["max_context"] == 512
  assert server.metric("slots_in_use") == 0 and server.metric("queue_depth") == 0
  assert server.metric("compiled_programs") > 0


def test_a_client_gone_mid_stream_frees_its_slot(server, client):
  before = server.metric("requests_total", finish_reason="cancelled")
  body = {"model": "run", "prompt": "def main(", "max_tokens": 480, "stream": True}
  other = concurrent.futures.ThreadPoolExecutor(1).submit(
      lambda: client.completions.create(model="run", prompt="import os", max_tokens=40))
  with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60) as stream:
    for line in stream.iter_lines():
      if line.startswith("data: "):
        break  # the first chunk: go away
  deadline = time.monotonic() + 30
  while server.metric("requests_total", finish_reason="cancelled") == before:
    assert time.monotonic() < deadline, "the cancelled stream was not counted"
    time.sleep(0.1)
  assert len(token_ids(other.result(timeout=60).choices[0])) == 40
  while server.metric("slots_in_use") != 0:
    assert time.monotonic() < deadline
    time.sleep(0.1)


BAD_BODIES = [  # (body bytes, status, param, words of the message)
    (b"{not json", 400, None, "not valid JSON"),
    (b"[1, 2]", 400, None, "JSON object"),
    (b'{"prompt": "x", "max_tokens": "5"}', 400, "max_tokens", "valid integer"),
    (b'{"prompt": "x", "promt": "y"}', 400, "promt", "unknown field"),
    (b'{"prompt": ""}', 400, "prompt", "the prompt is empty"),
    (b'{"prompt": [1, 2, 512]}', 400, "prompt", "outside the vocabulary"),
    (b'{"prompt": "x", "temperature": -1}', 400, "temperature", "temperature"),
    (b'{"prompt": "x", "top_p": 1.5}', 400, "top_p", "(0, 1]"),
    (b'{"prompt": "x", "logprobs": 9}', 400, "logprobs", "[0, 5]"),
    (b'{"prompt": "x", "n": 2}', 400, "n", "must be 1"),
    (b'{"prompt": "x", "model": "gpt-5"}', 404, "model", "not served here"),
    (b'{"prompt": "x", "max_tokens": 600}', 413, "max_tokens", "context of 512"),
    (json.dumps({"prompt": list(range(1, 500)), "max_tokens": 20}).encode(), 413, "max_tokens",
     "context of 512"),
    (b'{"prompt": "x", "padding": "' + b"a" * (1 << 20) + b'"}', 413, None, "limit"),
]


@pytest.mark.parametrize("body,status,param,words", BAD_BODIES,
                         ids=[f"{s}-{p or 'body'}-{i}" for i, (_, s, p, _) in
                              enumerate(BAD_BODIES)])
def test_a_bad_request_gets_its_status_and_an_openai_error(server, body, status, param, words):
  response = httpx.post(server.url + "/v1/completions", content=body,
                        headers={"content-type": "application/json"}, timeout=60)
  assert response.status_code == status, response.text
  error = response.json()["error"]
  assert set(error) == {"message", "type", "param", "code"}
  assert error["param"] == param and words in error["message"], error
  good = httpx.post(server.url + "/v1/completions", json={"prompt": "x", "max_tokens": 2},
                    timeout=60)
  assert good.status_code == 200 and len(good.json()["choices"][0]["token_ids"]) == 2


def test_an_unknown_role_or_path_is_refused(server):
  response = httpx.post(server.url + "/v1/chat/completions", timeout=60,
                        json={"messages": [{"role": "robot", "content": "x"}]})
  assert response.status_code == 400 and response.json()["error"]["param"] == "messages.0.role"
  assert httpx.get(server.url + "/nowhere").status_code == 404


def test_a_shared_prefix_is_prefilled_once(server, client):
  """Three long documents asked two questions each: the second question's prompt shares
  the document's blocks, is served from the prefix cache with a lower time to first
  token, and gives the tokens it gives without the cache."""
  rng = np.random.default_rng(21)
  first_ttft, second_ttft = [], []
  for _ in range(3):
    document = rng.integers(0, VOCAB, 440).tolist()
    for question, times in ((rng.integers(0, VOCAB, 8).tolist(), first_ttft),
                            (rng.integers(0, VOCAB, 8).tolist(), second_ttft)):
      start = time.perf_counter()
      stream = client.completions.create(model="run", prompt=document + question,
                                         max_tokens=4, stream=True)
      next(iter(stream))
      times.append(time.perf_counter() - start)
      list(stream)
    # the second question again, now that the cache holds its whole prompt
    cached = client.completions.create(model="run", prompt=document + question, max_tokens=8)
    assert cached.usage.prompt_tokens_details.cached_tokens >= 432
  assert server.metric("prefix_cache_hits_total") >= 6
  assert np.median(second_ttft) < np.median(first_ttft), (first_ttft, second_ttft)


@pytest.mark.slow  # a second server (tests/test_slots.py checks a cached prefix in-process)
def test_the_same_tokens_with_and_without_the_prefix_cache(checkpoint, server, client):
  rng = np.random.default_rng(8)
  prompt = rng.integers(0, VOCAB, 300).tolist()
  warm = [token_ids(client.completions.create(model="run", prompt=prompt, max_tokens=16)
                    .choices[0]) for _ in range(2)]
  cold = ServerProcess(checkpoint, *SERVER_FLAGS, "--config.serve.prefix_cache_mb=0")
  try:
    cold.wait_ready()
    response = httpx.post(cold.url + "/v1/completions", timeout=60,
                          json={"prompt": prompt, "max_tokens": 16}).json()
  finally:
    assert cold.terminate() == 0
  assert response["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
  assert warm[0] == warm[1] == response["choices"][0]["token_ids"]


def test_api_key_queue_limit_and_draining_shutdown(checkpoint):
  server = ServerProcess(checkpoint, "--config.serve.batch_size=1",
                         "--config.serve.max_queue=8", "--config.serve.drain_s=120",
                         "--config.serve.slot_decode_steps=1",
                         env={"RINGLM_API_KEY": "sesame"})
  try:
    server.wait_ready()
    url = server.url + "/v1/completions"
    assert httpx.post(url, json={"prompt": "x"}).status_code == 401
    assert httpx.post(url, json={"prompt": "x"}, headers={
        "Authorization": "Bearer wrong"}).json()["error"]["code"] == "invalid_api_key"
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="sesame", max_retries=0,
                           timeout=300)
    long = dict(model="run", prompt="def main(", max_tokens=200)

    def outcome(future):
      try:
        return len(token_ids(future.result().choices[0]))
      except openai.RateLimitError as error:
        assert error.response.headers["retry-after"] == "1"
        return 429

    # one slot and 8 places in the queue: of 16 at once, the rest are refused
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
      outcomes = [outcome(f) for f in [pool.submit(client.completions.create, **long)
                                       for _ in range(16)]]
    assert outcomes.count(429) >= 7 and outcomes.count(200) >= 2, outcomes
    assert set(outcomes) == {429, 200}

    # SIGTERM with 8 requests accepted: every one is finished, new ones get 503, exit 0.
    # (8 x 200 tokens drained in 1.4 s here, which can be over before a request sent
    # 0.5 s after the signal arrives: one decode step per call makes the drain seconds
    # long, and the request follows the first 503 on /health.)
    longer = dict(long, max_tokens=200)
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
      accepted = [pool.submit(client.completions.create, **longer) for _ in range(8)]
      deadline = time.monotonic() + 60
      while server.metric("queue_depth") < 6:
        assert time.monotonic() < deadline, "the requests did not queue"
        time.sleep(0.02)
      server.process.send_signal(signal.SIGTERM)
      while httpx.get(server.url + "/health").status_code != 503:
        assert time.monotonic() < deadline + 10, server.output()
        time.sleep(0.01)
      refused = httpx.post(url, json={"prompt": "x"},
                           headers={"Authorization": "Bearer sesame"})
      assert refused.status_code == 503, refused.text
      assert "draining" in refused.json()["error"]["message"]
      assert [outcome(f) for f in accepted] == [200] * 8
    assert server.process.wait(120) == 0, server.output()
    assert re.search(r"draining: [78] requests in flight", server.output()), server.output()
  finally:
    server.terminate()


# (1 MiB holds one request of the test model with a bf16 cache: the float32 one does not)
@pytest.mark.parametrize("budget_mb,cache,words", [
    (4, "", "--config.serve.batch_size="),
    (1, "float32", "not even one request of that length fits")])
def test_a_kv_cache_that_does_not_fit_is_refused_before_compiling(checkpoint, budget_mb, cache,
                                                                  words):
  result = subprocess.run(
      [sys.executable, "serve.py", f"--checkpoint={checkpoint}", f"--port={free_port()}",
       "--cpu_devices=2", f"--config.serve.memory_budget_mb={budget_mb}",
       f"--config.model.kv_cache_dtype={cache}",
       "--config.serve.prefix_cache_mb=0"], cwd=ROOT, capture_output=True, text=True,
      env=dict(os.environ, XLA_FLAGS="", PYTHONPATH=ROOT), timeout=300)
  assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
  assert words in result.stderr and "serve.memory_budget_mb" in result.stderr, result.stderr
  if budget_mb == 4:  # the batch it names fits
    fits = int(re.search(r"batch_size=(\d+)", result.stderr.split("set ")[1]).group(1))
    assert 1 <= fits < 32
