# Two commands do everything on a fresh clone:
#   make demo   set up .venv and replay sops/local_pallas_vs_jax.yaml on the local target (tiny model, CPU)
#   make test   set up .venv and run the whole test suite
# Beside them: make demo-seeds  the demo with five seeds per arm (sops/local_seeds_pallas_vs_jax.yaml, ten
#   tiny runs): start -> end over runs and the method verdict over runs (docs/verdicts.md).
# Beside them: make laptop-test  the laptop-only install (no jax, torch, transformers) in $(LAPTOP_VENV):
#   the orchestrator tests run, the trainer tests are skipped with their reason (TESTING.md).
# Beside them (not one of them): make rehearsal  replays the seed TPU SOP on the fake Cloud TPU API with
#   two loopback-sshd workers, a real bootstrap from the registry, the real trainer as two JAX processes
#   and a preemption (grpoctl_testing/rehearsal.py; report in runs/rehearsal/report.md).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

LAPTOP_VENV ?= /tmp/grpoctl-laptop-venv

.PHONY: demo demo-seeds test lint venv clean mutate rehearsal laptop-test

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[trainer,dev]'
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/grpoctl --target local sop replay sops/local_pallas_vs_jax.yaml

demo-seeds: $(STAMP)
	$(BIN)/grpoctl --target local sop replay sops/local_seeds_pallas_vs_jax.yaml

test: $(STAMP)
	$(BIN)/ruff check orchestrator trainer grpoctl_contract grpoctl_testing tests benchmarks
	$(BIN)/python -m pytest -q --durations=25 tests

laptop-test:
	test -x $(LAPTOP_VENV)/bin/python || $(PYTHON) -m venv $(LAPTOP_VENV)
	$(LAPTOP_VENV)/bin/python -m pip install -q -e '.[test]'
	$(LAPTOP_VENV)/bin/grpoctl --help > /dev/null
	$(LAPTOP_VENV)/bin/python -m pytest -q tests

rehearsal: $(STAMP)
	$(BIN)/python -m grpoctl_testing.rehearsal

lint: $(STAMP)
	$(BIN)/ruff check orchestrator trainer grpoctl_contract grpoctl_testing tests benchmarks

# Mutation run over the core modules (TESTING.md): slow, a benchmark-style command, not part of `make test`.
# mutmut stays out of the dev extra (it pulls in a terminal UI); it is installed here on first use.
# MUTATE=grpo compare picks modules (default: all of them).
mutate: $(STAMP)
	$(BIN)/python -c "import mutmut" 2>/dev/null || $(BIN)/python -m pip install -q "mutmut==3.8.1"
	nice -n 10 $(BIN)/python benchmarks/mutate.py $(MUTATE)

clean:
	rm -rf $(VENV) .grpoctl .pytest_cache .ruff_cache .mutate
