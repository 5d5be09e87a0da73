# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test install clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	# torch first and pinned: it must be the CPU build on CPU machines (see pyproject.toml).
	$(BIN)/pip install -q --disable-pip-version-check "torch==2.13.0"
	$(BIN)/pip install -q --disable-pip-version-check -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	NO_ALBUMENTATIONS_UPDATE=1 $(BIN)/synergen demo --out demo_out

test: $(STAMP)
	NO_ALBUMENTATIONS_UPDATE=1 $(BIN)/python -m pytest -q tests

clean:
	rm -rf $(VENV) demo_out
