# Quick start: `make demo`, `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Test processes (pytest-xdist; a test file stays in one process, so its module fixtures,
# servers among them, start once). XLA compiles on one thread, so two processes keep two
# cores busy; each needs a few GB.
TEST_WORKERS ?= 2

# The CUDA plugin without CUDA's libraries (~480 MB), apart from the environment: with it
# on the path, every `import jax` on a host without CUDA prints cudart-stub lines, so
# only the processes that compile for a GPU host get it (PYTHONPATH=$(GPU_AOT); docs/tpu.md).
GPU_AOT := $(VENV)/gpu-aot
GPU_AOT_STAMP := $(GPU_AOT)/.installed

.PHONY: demo ring-check test test-slow fault-check aot-check bench quality clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test,tpu,serve]'
	$(PY) -c 'import jax, flax, torch, transformers, fastapi, uvicorn, openai, xdist'  # fail here if the install did not
	touch $(STAMP)

$(GPU_AOT_STAMP): $(STAMP)
	$(PY) -m pip install --quiet --no-deps --target $(GPU_AOT) jax-cuda12-plugin==0.10.2 jax-cuda12-pjrt==0.10.2
	touch $(GPU_AOT_STAMP)

# Train the tiny model on the stdlib's sources, ring attention on 8 CPU devices (~5 min).
demo: $(STAMP)
	$(PY) train.py --config=configs/tiny.py --workdir=runs/tiny

# Forward+backward at 16K tokens on a ring of 8 devices, checked against one device (~3 min).
ring-check: $(STAMP)
	$(PY) -m tools.ring_check --config=configs/tiny.py

# Every benchmark against its peers in one run (~25 min): attention (ringattention,
# one-device XLA), training throughput, decoding (transformers generate), memory vs
# context; JSON in bench/results, every table in docs/benchmarks.md, a summary in README.md.
# Then the HTTP server under load against `transformers serve --continuous-batching`
# (bench/serve_load.py, ~10 min; its own JSON and table in bench/results).
bench: $(STAMP)
	$(PY) -m pip install --quiet -e '.[bench]'
	$(PY) -m bench.all
	$(PY) -m bench.serve_load

# What each serving precision costs in held-out perplexity (bf16, int8 weights, int8 KV
# cache), the tiny model trained first (~10 min); JSON in bench/results.
quality: $(STAMP)
	$(PY) -m bench.quality

# pytest exits 5 when it collected no tests: that is a failure here, said plainly.
test: $(STAMP) $(GPU_AOT_STAMP)
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --durations=25 || { status=$$?; [ $$status -ne 5 ] || echo "pytest collected no tests" >&2; exit $$status; }

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

# Every fault of tests/test_faults.py (damaged checkpoints, locks, cut metrics, changed
# corpus, signals, a full disk) plus the kill/resume tests of tests/test_train.py and the
# two-process ones of tests/test_multihost.py (~15 min).
fault-check: $(STAMP)
	$(PY) -m pytest -q -m "slow or not slow" tests/test_faults.py tests/test_train.py tests/test_multihost.py

# The real-size configs' training steps compiled for their TPU slices by the TPU compiler
# (libtpu, no TPU needed) and for 8 H100s by XLA:GPU: memory per chip against HBM
# (docs/tpu.md; ~5-10 min each here).
aot-check: $(STAMP) $(GPU_AOT_STAMP)
	$(PY) -m tools.aot --config=configs/llama3_8b.py:v5p-128
	$(PY) -m tools.aot --config=configs/llama3_8b.py:v5p-128-1m
	$(PY) -m tools.aot --config=configs/llama2_7b.py:v5p-128
	PYTHONPATH=$(GPU_AOT) $(PY) -m tools.aot --config=configs/llama3_8b.py:8xh100

clean:
	rm -rf $(VENV)
