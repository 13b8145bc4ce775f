# Two commands do all the set-up on a fresh machine with only Python:
#   make demo   runs the main job on local, embedded defaults
#   make test   lints and runs the test suite
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint typecheck layers browser install notebooks clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# constraints.txt pins the versions tested together, so pip never backtracks.
$(STAMP): $(BIN)/python pyproject.toml constraints.txt
	$(BIN)/pip install --disable-pip-version-check -q -c constraints.txt -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m service.devtools.demo

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy graphs nodes service

# The layering contracts in pyproject.toml: graphs/nodes never import service/, and the
# rooms of service/ import only downwards (cli > devtools > gateway|worker|agents > client >
# runtime > kafka > bootstrap > observe > storage > config > errors), every room is in a layer, and
# no package of service/ has a cycle between its modules.
layers: $(STAMP)
	$(BIN)/lint-imports

# The web-page tests drive Debian's Chromium: installed here when missing (as root), or
# `make test` stops before pytest with the command to run.
browser:
	@sh tests/ensure_chromium.sh

test: browser lint typecheck layers $(STAMP)
	$(BIN)/pytest -q

# JupyterLab on notebooks/, at 127.0.0.1 only: open the URL it prints (token included). The
# kernel is this venv's Python: the variable makes the venv's `python3` kernelspec win over a
# user-level one. --allow-root: containers often run as root, and the server is local.
notebooks: $(STAMP)
	JUPYTER_PREFER_ENV_PATH=1 $(BIN)/jupyter lab --notebook-dir=notebooks --ip=127.0.0.1 \
		--no-browser --allow-root

clean:
	rm -rf $(VENV) .agentflow .pytest_cache .mypy_cache .ruff_cache
