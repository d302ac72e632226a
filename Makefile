# The README's two commands: `make demo` and `make test`. Each sets up a local
# virtual environment on a fresh machine first (CPU torch where there is no GPU).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DEMO_DIR ?= demo
# torch: the CPU build where there is no NVIDIA GPU; otherwise the default (CUDA) build.
TORCH_SPEC ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo "torch" || echo "torch==2.13.0")

.PHONY: demo test lint venv clean cuda

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $@

# GPU machines: build the mamba-ssm kernels against the installed torch.
cuda: venv
	MAMBA_FORCE_BUILD=TRUE CAUSAL_CONV1D_FORCE_BUILD=TRUE \
	  $(BIN)/python -m pip install --no-build-isolation -e ".[cuda]"

# (1) The main job on the embedded default: a synthetic fMRIPrep dataset,
#     processed participant -> pretrain -> finetune -> predict.
demo: venv
	$(BIN)/regionmae-demo $(DEMO_DIR)

# (2) The tests (and lint: ruff, and the layering contracts of pyproject.toml with import-linter).
test: venv
	$(BIN)/ruff check .
	$(BIN)/lint-imports
	$(BIN)/python -m pytest -q

lint: venv
	$(BIN)/ruff check .
	$(BIN)/lint-imports

clean:
	rm -rf $(DEMO_DIR) .pytest_cache .ruff_cache .grimp_cache
