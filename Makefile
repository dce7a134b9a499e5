# drzero: `make demo` runs the demo, `make test` runs the tests. Both build .venv on first use.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PIP := $(VENV)/bin/pip
DRZERO := $(VENV)/bin/drzero
STAMP := $(VENV)/.installed

DEMO_DB ?= .drzero/demo-db
DEMO_MODEL ?= .drzero/tiny-model
DEMO_DATA ?= .drzero/data
DEMO_PORT ?= 8000


# No model hub, no telemetry: everything here runs offline.
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export ANONYMIZED_TELEMETRY := False
export TOKENIZERS_PARALLELISM := false

.PHONY: demo test test-image bench venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt Makefile
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet -c constraints.txt torch==2.13.0
	$(PIP) install --quiet -c constraints.txt -e ".[retrieval,train,modal,dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(DRZERO) ingest --demo --db $(DEMO_DB)
	$(DRZERO) tiny-model --db $(DEMO_DB) --out $(DEMO_MODEL)
	$(DRZERO) prepare-data --db $(DEMO_DB) --tokenizer $(DEMO_MODEL) --rows 2000 --out $(DEMO_DATA)/zero_ratio4321.parquet
	$(DRZERO) make-eval-set --demo-db $(DEMO_DB) --out $(DEMO_DATA) --per-hop 25
	@$(VENV)/bin/python -c 'import socket; socket.create_server(("127.0.0.1", $(DEMO_PORT)))' 2>/dev/null || \
	    { echo "make demo: port $(DEMO_PORT) is taken by another process; run: make demo DEMO_PORT=8010" >&2; exit 1; }
	@$(DRZERO) serve-retriever --db $(DEMO_DB) --port $(DEMO_PORT) & server=$$!; \
	trap 'kill $$server 2>/dev/null; wait $$server 2>/dev/null' EXIT; \
	$(DRZERO) search --url http://127.0.0.1:$(DEMO_PORT) --wait 120 --demo-db $(DEMO_DB)
	@# the dry run's full plan (hundreds of lines) goes to a file, shown only when the dry run fails
	@$(DRZERO) evolve --dry-run --iterations 2 --db $(DEMO_DB) --data-dir $(DEMO_DATA) \
	    --checkpoints .drzero/checkpoints --model $(DEMO_MODEL) --logger console \
	    --eval-data $(DEMO_DATA)/eval_demo.parquet > .drzero/demo-plan.txt 2>&1 || \
	    { cat .drzero/demo-plan.txt; exit 1; }
	@echo "built: a demo corpus, a tiny model, seed data, an eval set, and a 2-iteration evolve plan that passed its dry run"
	@echo "where: $(DEMO_DB)  $(DEMO_MODEL)  $(DEMO_DATA)  .drzero/demo-plan.txt"
	@echo "next:  source $(VENV)/bin/activate && drzero search \"Which venue published Rethinking Federated Learning?\" --db $(DEMO_DB)"

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q

# The GPU image's build rehearsed in a reconstructed base (Python 3.12; several GB the first time).
# `make test` runs it too when CI=true.
test-image: $(STAMP)
	DRZERO_IMAGE_REHEARSAL=1 $(VENV)/bin/python -m pytest -q tests/test_image_rehearsal.py

bench: $(STAMP)
	$(VENV)/bin/python benchmarks/retrieval.py
	$(VENV)/bin/python benchmarks/prepare_data.py

clean:
	rm -rf $(VENV) .drzero
