# Two commands do all set-up on a fresh clone: `make serve` and `make test`.
# The venv is created on first use; torch is installed first and pinned, because an unpinned
# torch (asked for by a dependency) pulls a multi-GB CUDA build.
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
TORCH := torch==2.13.0
STAMP := $(VENV)/.tierpick-installed
DATA ?= ../shared/data
HOST ?= 127.0.0.1
PORT ?= 50051

.PHONY: venv check test test-slow serve model adapt-study default-rule data proto clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH)
	$(BIN)/python -m pip install --quiet -e '.[train,dev,ray,report,gateway,litellm,label]'
	# xds-protos (gateway) ships its own copy of opentelemetry/proto/..., older than the one MLflow
	# imports (TracesData): whichever package is installed last wins, so put opentelemetry-proto back.
	$(BIN)/python -m pip install --quiet --force-reinstall --no-deps \
		"opentelemetry-proto==$$($(BIN)/python -c 'import importlib.metadata as m; print(m.version("opentelemetry-proto"))')"
	touch $@

venv: $(STAMP)

check: $(STAMP)
	$(BIN)/ruff check tierpick classifier training serving tests
	$(BIN)/ruff format --check tierpick classifier training serving tests
	$(BIN)/python tests/typecheck.py

test: check
	$(BIN)/pytest -m "not slow" --durations=10

# Tests marked `slow`: a real Envoy, an MLflow server, a local Ray, the wheel installed into fresh
# virtual environments on Python 3.11 and 3.13 (CI runs them after `make test`).
test-slow: $(STAMP)
	$(BIN)/pytest -m slow --durations=10

data: $(STAMP)
	$(BIN)/tierpick data build --config training/configs/default.yaml --out build/dataset

# Serving needs the runtime only (no torch, Ray, LiteLLM, Envoy or MLflow): its own small venv.
SERVE_VENV ?= .venv-serve
SERVE_STAMP := $(SERVE_VENV)/.tierpick-installed

$(SERVE_STAMP): pyproject.toml
	test -x $(SERVE_VENV)/bin/python || $(PYTHON) -m venv $(SERVE_VENV)
	$(SERVE_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(SERVE_VENV)/bin/python -m pip install --quiet -e .
	touch $@

serve: $(SERVE_STAMP)
	$(SERVE_VENV)/bin/tierpick serve --host $(HOST) --port $(PORT)

# Regenerate the Python gRPC stubs from proto/ (they are committed; never edit them by hand).
# The import path maps tierpick/serving/_proto to proto/, so the stubs import each other by their
# installed names; they are written under build/ and copied to serving/_proto.
proto: $(STAMP)
	rm -rf build/proto && mkdir -p build/proto
	$(BIN)/python -m grpc_tools.protoc -Itierpick/serving/_proto=proto --python_out=build/proto \
		--grpc_python_out=build/proto --pyi_out=build/proto tierpick/serving/_proto/tierpick/v1/tierpick.proto
	cp build/proto/tierpick/serving/_proto/tierpick/v1/tierpick_pb2* serving/_proto/tierpick/v1/

# Full retrain of the shipped default from ../shared/data: dataset, teacher, student, evaluation,
# export to models/default (with REPORT.md), MLflow run in sqlite:///mlflow.db (or $$MLFLOW_TRACKING_URI).
model: $(STAMP)
	TIERPICK_DATA_ROOT=$(abspath $(DATA)) $(BIN)/tierpick train --config training/configs/default.yaml \
		--out models/default --workdir build/model
	$(MAKE) adapt-study
	$(MAKE) default-rule

# every candidate rule on the leave-one-family-out folds `make model` exported, and the
# first-impression set (training/first_impression) routed by the shipped model: the table goes
# into models/default/REPORT.md beside leave-one-family-out (seconds)
default-rule: $(STAMP)
	$(BIN)/python -m tierpick.training.default_rule build/model/loso-models --out build/default-rule \
		--report models/default/REPORT.md

# adapt, played as a team, from each leave-one-family-out model `make model` exported: the
# tables go to build/adapt-study/ and into models/default/REPORT.md (about 12 minutes)
adapt-study: $(STAMP)
	$(BIN)/python -m tierpick.training.adapt_study build/model/loso-models --out build/adapt-study \
		--report models/default/REPORT.md

clean:
	rm -rf build .pytest_cache .mypy_cache .ruff_cache
