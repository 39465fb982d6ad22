# Two commands do all the set-up on a fresh machine:
#   make demo   - creates .venv, installs torch + this package (building its extension), runs the demo
#   make test   - the same set-up, then the test suite
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.14.1
PY := $(VENV)/bin/python
DEPS_STAMP := $(VENV)/.fused_s2s-deps
BUILD_STAMP := build/.fused_s2s-installed

.PHONY: demo test install

demo: $(BUILD_STAMP)
	$(PY) -m fused_s2s demo $(ARGS)

test: $(BUILD_STAMP)
	$(PY) -m pytest -q --durations=15 $(ARGS)

install: $(BUILD_STAMP)

$(DEPS_STAMP):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip setuptools wheel
	$(PY) -m pip install --quiet "$(TORCH)" ninja pybind11
	touch $@

# --no-build-isolation: the extension must compile against the torch installed above.
$(BUILD_STAMP): $(DEPS_STAMP) setup.py pyproject.toml $(wildcard csrc/*.cpp csrc/*/*.cpp csrc/*/*.cu csrc/*/*.cuh csrc/*/*.h csrc/include/*/*.h)
	$(PY) -m pip install --quiet --no-build-isolation -e '.[test,demo]'
	mkdir -p build && touch $@
