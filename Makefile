# Two commands for a new user: `make demo` and `make test`. Both set everything up first.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
OUT    ?= outputs/demo

.PHONY: demo test lint bench setup clean browser

setup: $(STAMP)

# The CPU build of torch 2.13.0 is installed first, pinned, so that nothing pulls a CUDA build.
$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "influencekit needs Python 3.11+; set PYTHON=python3.11"'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[dev,sec52]'
	@touch $(STAMP)

demo: $(STAMP)
	$(BIN)/influencekit demo --out $(OUT)

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks

# The report tests open the HTML report in headless Chromium (Debian's package). Installed here if
# missing and possible (root and apt-get); otherwise that one test skips and says why.
browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
	  { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	    timeout 300 apt-get update -qq && DEBIAN_FRONTEND=noninteractive timeout 600 \
	    apt-get install -y -qq chromium >/dev/null; } || \
	  echo "chromium not installed: the browser test will skip"

test: lint browser
	$(BIN)/python -m pytest -q

# The benchmarks run in their own environment with the peer libraries (never our dependencies).
BENCH_VENV ?= .bench-venv
BENCH_OUT  ?= outputs/bench

$(BENCH_VENV)/.installed-stamp: benchmarks/setup-env.sh pyproject.toml
	PYTHON=$(PYTHON) bash benchmarks/setup-env.sh $(BENCH_VENV)

bench: $(BENCH_VENV)/.installed-stamp $(STAMP)
	$(BENCH_VENV)/bin/python benchmarks/bench_solvers.py --out $(BENCH_OUT)
	$(BENCH_VENV)/bin/python benchmarks/compare.py --out $(BENCH_OUT)
	$(BENCH_VENV)/bin/python benchmarks/compare_problems.py --out $(BENCH_OUT)
	$(BENCH_VENV)/bin/python benchmarks/matched_repeats.py --out $(BENCH_OUT)
	$(BENCH_VENV)/bin/python benchmarks/scaling.py --out $(BENCH_OUT)
	$(BENCH_VENV)/bin/python benchmarks/kronecker_refinement.py --out $(BENCH_OUT)
	$(BENCH_VENV)/bin/python benchmarks/distributed_throughput.py --out $(BENCH_OUT)
	$(BENCH_VENV)/bin/python benchmarks/distributed_throughput.py --out $(BENCH_OUT) --train-size 10000
	$(BENCH_VENV)/bin/python benchmarks/epoch_budget.py --out $(BENCH_OUT)
	$(BENCH_VENV)/bin/python benchmarks/large_model.py --out $(BENCH_OUT)
	$(BENCH_VENV)/bin/python benchmarks/scaling_store.py --out $(BENCH_OUT) --exact-max 30000
	$(BENCH_VENV)/bin/python benchmarks/lds_mlp.py --out $(BENCH_OUT)
	$(BENCH_VENV)/bin/python benchmarks/lds_gpt.py --out $(BENCH_OUT)
	$(BENCH_VENV)/bin/python benchmarks/trak_projection_probe.py --out $(BENCH_OUT)
	$(BIN)/python benchmarks/sec52_candidates.py --out $(BENCH_OUT)

clean:
	rm -rf $(VENV) $(BENCH_VENV) outputs .pytest_cache .ruff_cache
