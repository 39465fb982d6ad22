# Two commands do all the set-up on a fresh machine:
#   make demo   - creates .venv, installs torch + this package (building its extension), runs the demo
#   make test   - the same set-up, then the test suite
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.14.1
PY := $(VENV)/bin/python
DEPS_STAMP := $(VENV)/.fused_s2s-deps
BUILD_STAMP := build/.fused_s2s-installed
# a step's wall time, printed when it ends (pip runs --quiet: a build says nothing for a minute)
TIMED = start=$$(date +%s); $(1) && echo "fused_s2s: done in $$(( $$(date +%s) - start )) s"

.PHONY: demo test install

demo: $(BUILD_STAMP)
	$(PY) -m fused_s2s demo $(ARGS)

test: $(BUILD_STAMP)
	$(PY) -m pytest -q --durations=15 $(ARGS)

install: $(BUILD_STAMP)

# Makefile as a prerequisite: an existing environment gets what a changed list here adds.
# numpy before the build: torch warns while building without it.
$(DEPS_STAMP): Makefile
	@echo "fused_s2s: setting up $(VENV) with $(TORCH) (a few minutes: torch and its CUDA libraries are large)..."
	@$(call TIMED,$(PYTHON) -m venv $(VENV) && \
	  $(PY) -m pip install --quiet --upgrade pip setuptools wheel && \
	  $(PY) -m pip install --quiet "$(TORCH)" numpy ninja pybind11)
	touch $@

# --no-build-isolation: the extension must compile against the torch installed above.
# PYTHONWARNINGS: setuptools' caution that a folder named like the package may shadow it, said
# on every editable install; here that folder is the package.
$(BUILD_STAMP): $(DEPS_STAMP) setup.py pyproject.toml $(wildcard csrc/*.cpp csrc/*/*.cpp csrc/*/*.cu csrc/*/*.cuh csrc/*/*.h csrc/include/*/*.h)
	@echo "fused_s2s: installing the package and compiling its C++ extension (1-3 minutes on 2 cores;" \
	  "the CUDA kernels, built when a GPU is visible or FUSED_S2S_CUDA=1, take several minutes more)..."
	@$(call TIMED,PYTHONWARNINGS="ignore:Editable installation" $(PY) -m pip install --quiet --no-build-isolation -e '.[test]')
	mkdir -p build && touch $@
