# The two commands of the README. Both set everything up on a fresh machine first.
#   make demo   the main job: PEFT adapters loaded, served in one mixed batch and saved back; a tiny
#               Llama trains 8 adapters in one mixed batch, then again over a 4-bit NF4 base
#               (multi-adapter QLoRA); BoRA's test perplexity against tau (runs/bora_multitask/);
#               Context-PEFT's comparison at small
#               scale; IVON-LoRA against AdamW at small scale; the serving demo's model and adapters
#               (runs/serve_demo/, what `bora-serve --demo` serves) and a load test of bora-serve
#               against one-adapter-per-batch serving; then the model benchmark
#   make test   the whole test suite (Triton kernels run under the interpreter without a GPU), in
#               TEST_WORKERS pytest-xdist workers
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# only installed when torch is missing; on these machines the file is a CPU build
TORCH_SPEC ?= torch==2.13.0
# the GPU machine's Triton (../shared/GPU.md), beside the venv's own: the kernels are also compiled
# for sm_90 with it in the tests (compile-only, no GPU needed)
GPU_TRITON ?= triton-3.6.0
# pytest-xdist workers for `make test`: one a core, at most 8 (each holds torch and the models)
TEST_WORKERS ?= $(shell n=$$(nproc 2>/dev/null || echo 2); [ $$n -gt 8 ] && n=8; echo $$n)

.PHONY: setup demo test bench clean

# --system-site-packages lets the venv see a user's own (e.g. CUDA) torch, which is then kept
$(VENV)/.ready: pyproject.toml setup.py
	test -x $(PY) || $(PYTHON) -m venv --system-site-packages $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q "setuptools>=64" wheel
	$(PY) -m pip install -q --no-build-isolation -e ".[test]"
	$(PY) -m pip install -q --no-deps --target $(VENV)/$(GPU_TRITON) "$(subst -,==,$(GPU_TRITON))" \
		|| echo "$(GPU_TRITON) not installed: tests/test_compile_for_gpu.py checks only the installed triton"
	touch $@

setup: $(VENV)/.ready

demo: setup
	$(PY) python/peft_adapters.py
	$(PY) python/multi_task_lora.py
	$(PY) python/multi_task_lora.py --quantize nf4 --steps 30
	$(PY) python/bora_multitask.py --quick
	$(PY) python/context_peft.py --quick
	$(PY) python/ivon_lora.py --quick
	$(PY) -m bora_kernels.serve.demo
	$(VENV)/bin/bora-bench serve --quick
	$(VENV)/bin/bora-bench model --quick

test: setup
	$(PY) -m pytest -q -n $(TEST_WORKERS) --durations=20 tests
	$(PY) -m pytest -q benchmarks --benchmark-disable

bench: setup
	$(VENV)/bin/bora-bench all

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
