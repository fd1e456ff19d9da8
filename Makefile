# Two commands on a fresh machine: `make demo` (set up + main job) and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test install clean

demo: $(STAMP)
	$(BIN)/compress demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

install: $(STAMP)

# Where CUDA exists (nvidia-smi lists a GPU), onnxruntime-gpu (CUDA and CPU providers) replaces the
# CPU-only onnxruntime; both are removed first because they share one package folder.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip
	$(BIN)/python -m pip install -e ".[test]"
	if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
		$(BIN)/python -m pip uninstall -y onnxruntime onnxruntime-gpu && \
		$(BIN)/python -m pip install "onnxruntime-gpu>=1.18"; \
	fi
	touch $(STAMP)

clean:
	rm -rf $(VENV) runs .pytest_cache
