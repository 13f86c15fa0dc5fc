# Appointment scheduler: common tasks. Standard library only; nothing to install.
PYTHON ?= python3
HOST ?= 127.0.0.1
PORT ?= 8000

.DEFAULT_GOAL := help
.PHONY: help run test bench

help: ## List the targets
	@awk 'BEGIN {FS = ":.*## "} /^[a-z-]+:.*## / {printf "  make %-6s %s\n", $$1, $$2}' $(MAKEFILE_LIST)

run: ## Serve the API (change the port with: make run PORT=9000)
	$(PYTHON) scheduler.py --host $(HOST) --port $(PORT)

test: ## Run the test suite in 5 processes (another interpreter: make test PYTHON=python3.9)
	$(PYTHON) -c 'import test_scheduler; test_scheduler.run_in_parallel("5")'

bench: ## Measure throughput, latency and memory (4 min; wrk if installed); BASE=<commit>: against it, taking turns
	SCHEDULER_BENCH=1 SCHEDULER_BENCH_BASE=$(BASE) $(PYTHON) -m unittest -v \
	    test_scheduler.Benchmark$(if $(BASE),.test_against_a_base_commit)
