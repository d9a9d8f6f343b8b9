# Quickstart: `make run` then `make test`. Both create .venv and install the pinned dependencies.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
UV := $(VENV)/bin/uv
# Datasets: $$CROSSSIM_DATA_DIR, else data/raw (DVC-tracked), else ../shared/data where a checkout has it beside it.
export CROSSSIM_DATA_DIR ?= $(if $(wildcard data/raw),data/raw,$(if $(wildcard ../shared/data),../shared/data,data/raw))
# Prefect's state (ephemeral server database, cached task results) stays inside the project.
export PREFECT_HOME ?= $(CURDIR)/.prefect
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
# The ephemeral server of `crosssim run` gets 20 s to start by default: too short on a busy 2-core machine.
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS ?= 120

.PHONY: setup chromium run test test-fast bench-source bench-crosssim bench-gpu-train bench-serve bench-rollout bench-loop bench-smoke data dvc-repro mlflow-ui prefect-ui clean

# Bytecode compiled at install: with PYTHONDONTWRITEBYTECODE set, every command would otherwise recompile
# MLflow, Prefect and torch's Python (a `crosssim registry list` took 7 s instead of 3).
$(VENV)/.installed: requirements.lock pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	test -x $(UV) || $(PY) -m pip install -q uv==0.13.9
	$(UV) pip sync --python $(PY) -q --compile-bytecode requirements.lock
	$(UV) pip install --python $(PY) -q --no-deps -e .
	touch $@

setup: $(VENV)/.installed

run: setup
	$(VENV)/bin/crosssim run --config params.yaml

# Headless Chromium renders the rollout report in tests/test_report_render.py (Debian's package; needs root).
chromium:
	@command -v chromium >/dev/null || { apt-get update -qq && apt-get install -y -qq chromium >/dev/null; } \
		|| echo "chromium could not be installed: tests/test_report_render.py will be skipped"

# Two workers, one test file each: the slow tests mostly wait on subprocesses and servers, so they overlap well.
test: setup chromium
	$(PY) -m pytest -q -n 2 --dist loadfile

# Unit tests only (no model training, no servers, no whole flows): about a minute, for the edit-test loop.
test-fast: setup
	$(PY) -m pytest -q -n 2 -m "not slow"

bench-source: setup
	$(PY) benchmarks/source_pneumoniamnist.py

# CrossSim on Kermany → NIH: every variant of the table, 5 seeds for the headline rows (BENCH_ARGS="--only V --seeds S").
bench-crosssim: setup
	$(PY) benchmarks/crosssim_kermany_nih.py $(BENCH_ARGS)

# Training throughput on a CUDA GPU: ResNet-50 at 224×224, AMP + channels_last (BENCH_ARGS=--processes N: N GPUs).
bench-gpu-train: setup
	$(PY) benchmarks/gpu_train.py $(BENCH_ARGS)

# crosssim serve (ONNX Runtime FP32/INT8) vs mlflow models serve vs PyTorch eager on the registry's champion
# (else challenger): run `make run` first. ≤ 15 min on 2 CPU cores.
bench-serve: setup
	$(PY) benchmarks/serve.py $(BENCH_ARGS)

# Rollout decisions over resampled streams of real NIH predictions, and the drift alarm (≈ 5 min on 2 CPU cores).
bench-rollout: setup
	$(PY) benchmarks/rollout.py $(BENCH_ARGS)

# The learning loop at NIH, two parts: a simulated hospital per worklist strategy and seed, with the oracle and
# batch fine-tuning as references (BENCH_ARGS="--strategies S... --seeds N... --weeks W" for a development run),
# then the live loop through crosssim serve and the continuous-learning deployment (LIVE_ARGS="--weeks W").
bench-loop: setup
	$(PY) benchmarks/loop.py --part strategies $(BENCH_ARGS)
	$(PY) benchmarks/loop.py --part live $(LIVE_ARGS)

# Every benchmark in seconds on a tiny real subset (what tests/test_benchmarks.py runs in CI); JSON to a temp folder.
bench-smoke: setup
	$(PY) benchmarks/source_pneumoniamnist.py --smoke
	$(PY) benchmarks/crosssim_kermany_nih.py --smoke
	$(PY) benchmarks/rollout.py --smoke
	$(PY) benchmarks/loop.py --smoke
	$(PY) benchmarks/gpu_train.py --smoke

# Put the datasets under DVC: copy them from FROM into data/raw, `dvc add data` (→ data.dvc), push to the remote.
FROM ?= ../shared/data
DATASETS := kermany-pediatric nih-cxr8 pneumoniamnist
data: setup
	mkdir -p data/raw
	for d in $(DATASETS); do test -e data/raw/$$d || cp -a "$(FROM)/$$d" data/raw/$$d; done
	$(VENV)/bin/dvc add data
	$(VENV)/bin/dvc push

dvc-repro: setup
	$(VENV)/bin/dvc repro && $(VENV)/bin/dvc metrics show

mlflow-ui: setup
	$(VENV)/bin/mlflow ui --backend-store-uri sqlite:///$(CURDIR)/mlflow/mlflow.db --host 127.0.0.1 --port 5000

prefect-ui: setup
	$(VENV)/bin/prefect server start --host 127.0.0.1

clean:
	rm -rf outputs .cache .prefect mlflow
