# fastvq: `make demo` runs the demo, `make test` the test suite; both install what they need first.
PYTHON ?= python3
PYTEST ?= $(PYTHON) -m pytest
SOURCES := setup.py pyproject.toml requirements-dev.txt $(wildcard csrc/*.cpp csrc/*.h csrc/*/*.cpp csrc/*/*.cu csrc/*/*.h csrc/*/*.inc)

.PHONY: install demo test test-gpu bench lint gpu

install: .make-install

# torch first, so nothing later pulls a multi-GB CUDA build. A machine with torch keeps it; one
# with a GPU driver gets PyPI's torch (the CUDA build), and one without it the CPU wheel, by its
# local version (+cpu: a local wheel or index has it, PyPI does not) or else from PyTorch's CPU
# index. --no-build-isolation builds against that torch instead of downloading another one.
.make-install: $(SOURCES)
	$(PYTHON) -c "import torch" 2>/dev/null || \
	  if command -v nvidia-smi >/dev/null; then $(PYTHON) -m pip install torch==2.13.0; \
	  else $(PYTHON) -m pip install torch==2.13.0+cpu || $(PYTHON) -m pip install torch==2.13.0 \
	    --index-url https://download.pytorch.org/whl/cpu; fi
	$(PYTHON) -m pip install -r requirements-dev.txt
	$(PYTHON) -m pip install --no-build-isolation -e .
	$(PYTHON) -c "import fastvq; print({k: v.available for k, v in fastvq.backends().items()})"
	touch $@

demo: install
	$(PYTHON) -m fastvq.demo

test: install
	$(PYTEST) -q

test-gpu: install
	$(PYTEST) -q -m gpu

bench: install
	$(PYTHON) -m bench.run
	$(PYTEST) -q -p no:cacheprovider bench/test_microbench.py --benchmark-json bench/results/micro.json

lint: install
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .

gpu:
	bash bench/gpu.sh
