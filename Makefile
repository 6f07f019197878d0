# The README's commands. The venv is made with the newest Python 3.13, 3.12 or 3.11 that runs
# here (pyenv's too), or with PYTHON=/path/to/python3.x; VENV names its folder.
FIND_PYTHON := for v in 3.13 3.12 3.11; do \
	for p in python$$v $$(ls -d $$HOME/.pyenv/versions/$$v.*/bin/python$$v 2>/dev/null); do \
	$$p -c '' 2>/dev/null && { echo $$p; exit 0; }; done; done
ifndef PYTHON
PYTHON := $(shell $(FIND_PYTHON))
endif
VENV ?= .venv
BIN := $(VENV)/bin
DEMO_ARCHIVE := data/demo/cell_images_demo.zip

.PHONY: install demo test bench

# Re-installs only when pyproject.toml changed since the last install.
install: $(VENV)/.installed
$(VENV)/.installed: pyproject.toml
	@test -x $(BIN)/python || test -n "$(PYTHON)" || { echo "make: no Python 3.11, 3.12 or 3.13 found; set PYTHON=" >&2; exit 1; }
	@test -x $(BIN)/python || { echo "make: creating $(VENV) with $(PYTHON) ($$($(PYTHON) --version))"; $(PYTHON) -m venv $(VENV); }
	@echo "make: installing into $(VENV) ($$($(BIN)/python --version))"
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

# Offline: Prefect's local server is told not to phone home. The demo leaves params.yaml and
# dvc.lock alone (no versioning): they keep describing the real malaria pipeline.
# The demo's champion store is its own: a real run here is then not gated against the demo's model.
demo: install
	$(BIN)/imgclf demo-data $(DEMO_ARCHIVE)
	PREFECT_SERVER_ANALYTICS_ENABLED=false $(BIN)/imgclf run --set data.url=$(DEMO_ARCHIVE) --set data.sha256= \
		--set orchestration.dvc_commit=false --set publish.local_dir=data/demo/champion
	@echo "make: the run report, to open in a browser: $(CURDIR)/reports/index.html"

# Two workers: most tests wait on subprocesses (dvc, git, imgclf, servers), so two share 2 cores well.
test: install
	$(BIN)/python -m pytest -n 2

bench: install
	$(BIN)/python benchmarks/bench_cache.py --encoder opencv
	$(BIN)/python benchmarks/bench_cache.py --encoder libpng
	$(BIN)/python benchmarks/bench_near_duplicates.py
	$(BIN)/python benchmarks/bench_train.py
	$(BIN)/python benchmarks/bench_quality.py
	$(BIN)/python benchmarks/bench_orchestration.py
	$(BIN)/python benchmarks/bench_scale.py
	$(BIN)/python benchmarks/bench_e2e.py
