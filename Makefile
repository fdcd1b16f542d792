# Fresh-machine entry points: `make demo` (main job on the embedded default) and `make test`.
# Everything installs into .venv; torch==2.13.0 is pinned first so pip takes the CPU build.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PYTEST_ARGS ?= -m "not slow"
# Where pip should take torch from (empty: its configured index; https://download.pytorch.org/whl/cpu
# for the CPU-only build where the default index gives the CUDA one).
TORCH_INDEX ?=
# Line coverage of ats_deploy, child processes included, printed after the tests; the floor is
# [tool.coverage.report] fail_under in pyproject.toml (it only rises).
COV_ARGS ?= --cov --cov-report=term

.PHONY: install demo test test-all lint mutation mutation-sample clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q "torch==2.13.0" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(BIN)/pip install -q -e ".[dev,rtx]"
	touch $(STAMP)

install: $(STAMP)

# The embedded default (the trained demo DeiT-Ti when its weights ship): export + parity on 64 held-out
# generated images (accuracy vs their labels, K' per ATS block), then token maps of 4 of them.
demo: install
	$(BIN)/ats-deploy export -o out/ --parity-inputs 64
	$(BIN)/ats-deploy tokens --input shapes:heldout:4 --png out/tokenmaps

# pytest exits 5 when it collected nothing: that is not a failure of the code under test.
test: install
	$(BIN)/python -m pytest $(PYTEST_ARGS) $(COV_ARGS); rc=$$?; if [ $$rc -eq 5 ]; then echo "no tests collected"; exit 0; fi; exit $$rc

test-all: install
	$(MAKE) test PYTEST_ARGS=""

# Mutation testing (mutmut) of the modules that decide correctness ([tool.mutmut] in pyproject.toml):
# hours on 2 cores, so not part of `make test`. Prints the score and lists the surviving mutants.
mutation: install
	$(BIN)/mutmut run --max-children $(or $(JOBS),2); $(BIN)/python tools/mutation_summary.py

# A seeded random sample of the same mutants (N, default 300: about 20 minutes on 2 cores), score +- interval.
mutation-sample: install
	$(BIN)/python tools/mutation_sample.py --n $(or $(N),300) --jobs $(or $(JOBS),2)

lint: install
	$(BIN)/ruff check ats_deploy tests benchmarks

clean:
	rm -rf $(VENV) out build .pytest_cache mutants .coverage .coverage.*
