# Two commands do all set-up on a fresh machine: `make demo` and `make test`. Both run the install step
# first (the only step that needs the network: the package index, and Debian's Chromium for the
# inspection-page test); after it, neither the demo nor the tests reach anything but loopback.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Root with unshare and ip: the tests run in a network namespace that has only loopback, so no packet can
# leave the machine whatever a library tries (tests/test_hermetic.py proves none is even attempted).
HERMETIC := $(shell [ "$$(id -u)" = 0 ] && command -v unshare >/dev/null && command -v ip >/dev/null && \
	unshare -n true 2>/dev/null && echo yes)

.PHONY: demo test install chromium lock clean

$(STAMP): pyproject.toml requirements.lock Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	# torch first and pinned: it must be the CPU build on CPU machines (see pyproject.toml).
	$(BIN)/pip install -q --disable-pip-version-check "torch==2.13.0"
	# requirements.lock: the exact set the tests passed with (`make lock` rewrites it from a tested venv).
	$(BIN)/pip install -q --disable-pip-version-check -c requirements.lock -e ".[test]"
	$(MAKE) --no-print-directory chromium
	touch $(STAMP)

install: $(STAMP)

# Headless Chromium renders the inspection page in its test. Debian's package, installed when missing.
chromium:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    apt-get update -qq && apt-get install -y -qq --no-install-recommends chromium >/dev/null; \
	  else \
	    echo "warning: Chromium is missing and this is not root with apt-get; the demo does not need it, the inspection-page" \
	      "test does: sudo apt-get install -y --no-install-recommends chromium" >&2; \
	  fi; }

demo: $(STAMP)
	NO_ALBUMENTATIONS_UPDATE=1 $(BIN)/synergen demo --out demo_out

test: $(STAMP)
ifeq ($(HERMETIC),yes)
	unshare -n sh -c 'ip link set lo up && NO_ALBUMENTATIONS_UPDATE=1 $(BIN)/python -m pytest -q tests'
else
	@echo "note: not root or no unshare/ip: tests run with this machine's network (they still talk only to loopback)" >&2
	NO_ALBUMENTATIONS_UPDATE=1 $(BIN)/python -m pytest -q tests
endif

# Records the venv's exact package set (run after a green `make test`); torch without its +cpu tag so that
# a GPU image resolves the CUDA build of the same version.
lock: $(STAMP)
	{ echo "# The exact package set the tests passed with (make lock writes it; make and the container image install with -c)."; \
	  $(BIN)/pip freeze --exclude-editable --disable-pip-version-check | sed 's/^torch==\([0-9.]*\)+cpu$$/torch==\1/'; } > requirements.lock

clean:
	rm -rf $(VENV) demo_out
