# `make run` sets up a fresh machine and starts DosePilot on the bundled demo patient;
# `make test` sets up and runs the whole test suite (under a virtual display when there is none).
VENV ?= .venv
PY := $(VENV)/bin/python
XVFB := $(if $(DISPLAY),,xvfb-run -a -s "-screen 0 1280x1024x24")
export QT_API := pyside6
export VTK_DEFAULT_OPENGL_WINDOW := vtkEGLRenderWindow

.PHONY: setup system run test lint bench physics-env bundle default-model

system:
	bash installer/install-system-packages.sh

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# the CPU build first: a bare `torch` requirement would pull a multi-GB CUDA build
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	touch $@

setup: system $(VENV)/.installed

run: setup
	$(VENV)/bin/dosepilot demo

# Two pytest-xdist workers (tests/conftest.py: one crash log each). After a crash, each worker's
# last test started and the project's frames of every thread.
CRASH_LOG := .pytest-crash.log
TEST_WORKERS ?= 2
test: setup
	$(VENV)/bin/ruff check .
	rm -f $(CRASH_LOG).*
	QT_QPA_PLATFORM=xcb DOSEPILOT_CRASH_LOG=$(CRASH_LOG) $(XVFB) $(PY) -m pytest -q \
	    -p no:cacheprovider -p no:faulthandler -n $(TEST_WORKERS) --dist worksteal || { rc=$$?; \
	    for log in $(CRASH_LOG).*; do echo "--- pytest exited $$rc; the last test started ($$log):"; \
	    awk '/^running /{b=""} {b=b $$0 "\n"} END{printf "%s", b}' $$log | \
	    grep -v -e site-packages -e '<frozen' -e '^Extension modules' | head -n 80; done; exit $$rc; }

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .

# the engine's latency budgets on this machine (needs the shipped model or --model)
bench: setup
	$(VENV)/bin/dosepilot bench

# the isolated pyRadPlan environment for `dosepilot physics` (no prerequisites; ~1 GB, < 1 min)
physics-env:
	bash installer/physics-env.sh

# the desktop bundle (PyInstaller one-folder, dist/DosePilot/; see installer/README.md)
bundle: setup
	$(PY) -m pip install -q -e '.[installer]'
	PYTHON=$(PY) bash installer/build.sh

# retrain the shipped model (resources/models/default; see its MODEL_CARD.md); resumable: run it
# again after an interruption. RUNS is the run folder, OPENKBP the dataset (train/, validation/).
RUNS ?= runs/default-model
default-model: $(VENV)/.installed
	PATH=$(abspath $(VENV))/bin:$$PATH resources/models/default/train.sh $(RUNS)
	@echo "copy $(RUNS)/stage-b/model/* to resources/models/default/ to ship it"
