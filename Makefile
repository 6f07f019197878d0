# The README's commands. PYTHON must be a Python 3.11 interpreter.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
DEMO_ARCHIVE := data/demo/cell_images_demo.zip

.PHONY: install demo test bench

# Re-installs only when pyproject.toml changed since the last install.
install: $(VENV)/.installed
$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

# Offline: Prefect's local server is told not to phone home. The demo leaves params.yaml and
# dvc.lock alone (no versioning): they keep describing the real malaria pipeline.
demo: install
	$(BIN)/imgclf demo-data $(DEMO_ARCHIVE)
	PREFECT_SERVER_ANALYTICS_ENABLED=false $(BIN)/imgclf run --set data.url=$(DEMO_ARCHIVE) --set data.sha256= \
		--set orchestration.dvc_commit=false

test: install
	$(BIN)/python -m pytest

bench: install
	$(BIN)/python benchmarks/bench_cache.py --encoder opencv
	$(BIN)/python benchmarks/bench_cache.py --encoder libpng
	$(BIN)/python benchmarks/bench_train.py
	$(BIN)/python benchmarks/bench_orchestration.py
	$(BIN)/python benchmarks/bench_scale.py
