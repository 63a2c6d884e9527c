# skin-lesion-classifier: the familiar commands. `make help` lists them.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
KEDRO := KEDRO_DISABLE_TELEMETRY=true $(BIN)/kedro
# Kedro environment for `make run`: the GPU config (base) where CUDA is present, else the quick
# CPU config (conf/quick). Override: make run KEDRO_ENV=quick
KEDRO_ENV ?= $(shell $(BIN)/python -c "import torch; print('local' if torch.cuda.is_available() else 'quick')" 2>/dev/null || echo quick)
HOST ?= 127.0.0.1
PORT ?= 8000
MODEL ?= data/06_models/model.pt

.PHONY: help setup data run train quick-train evaluate test lint viz mlflow-ui show-results serve \
        serve-dev api-docs predict export-onnx bench-train bench-inference ensemble cross-validation clean

help:  ## list the commands
	@grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN{FS=":.*?## "}{printf "  make %-16s %s\n", $$1, $$2}'

$(BIN)/kedro: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -e ".[dev]"
	@touch $@

setup: $(BIN)/kedro  ## create .venv and install the project with its pinned stack

data: setup  ## fill data/01_raw (HAM10000_SOURCE=dir, else ../shared/data/ham10000, else download)
	$(BIN)/python -m skin_lesion_classifier.data.acquire

run: setup  ## the whole pipeline, ingestion -> report (GPU config on CUDA, quick CPU config otherwise)
	$(KEDRO) run --env $(KEDRO_ENV)

train: setup  ## ingestion, splitting and training with the default (GPU) config
	$(KEDRO) run --pipelines ingestion,splitting,model_input,training

quick-train: setup  ## the same with the quick CPU config (about 20 minutes on 2 cores)
	$(KEDRO) run --env quick --pipelines ingestion,splitting,model_input,training

evaluate: setup  ## evaluation + reporting on the latest model, without retraining
	$(KEDRO) run --env $(KEDRO_ENV) --pipelines evaluation,reporting

test: setup  ## run the test suite
	$(BIN)/pytest

lint: setup  ## ruff
	$(BIN)/ruff check src tests

viz: setup  ## serve the pipeline graph (kedro viz) on localhost
	$(KEDRO) viz run --host $(HOST)

mlflow-ui: setup  ## the MLflow UI over the local store (mlflow.db)
	$(KEDRO) mlflow ui

show-results: setup  ## print the headline metrics table of the latest run
	$(BIN)/python -m skin_lesion_classifier.show_results

serve: setup  ## the FastAPI service + upload page on http://$(HOST):$(PORT) (MODEL=...pt|.onnx|runs:/..|models:/..)
	$(BIN)/skin-lesion-classifier serve --model $(MODEL) --host $(HOST) --port $(PORT)

serve-dev: setup  ## the service with auto-reload and debug logs
	$(BIN)/skin-lesion-classifier serve --model $(MODEL) --host $(HOST) --port $(PORT) --reload --log-level debug

api-docs: setup  ## write the OpenAPI schema to docs/api/openapi.json (the running service also serves /docs)
	$(BIN)/skin-lesion-classifier api-docs --output docs/api/openapi.json

predict: setup  ## predict a folder: make predict INPUT=folder [OUTPUT=predictions.csv]
	$(BIN)/skin-lesion-classifier predict $(INPUT) --model $(MODEL) --output $(or $(OUTPUT),data/07_model_output/predictions.csv)

export-onnx: setup  ## export the model to ONNX (+ int8) and check it against PyTorch
	$(BIN)/skin-lesion-classifier export-onnx --model $(MODEL)

bench-train: setup  ## full-data training benchmark: img/s, wall time, val/test BA and AUC (CONFIG=yaml)
	$(BIN)/python -m skin_lesion_classifier.training.bench --config $(or $(CONFIG),conf/quick/parameters_training.yml) --data-dir $(or $(DATA_DIR),../shared/data/ham10000)

ensemble: setup  ## train the ensemble members, metadata fusion and the weighted ensemble (quick config on CPU)
	$(KEDRO) run --env $(KEDRO_ENV) --pipelines ensemble

cross-validation: setup  ## K-fold cross-validation over lesion-grouped folds
	$(KEDRO) run --env $(KEDRO_ENV) --pipelines cross_validation

bench-inference: setup  ## CPU latency/throughput of PyTorch and ONNX Runtime, service requests/s (loopback)
	$(BIN)/skin-lesion-classifier bench-inference --model $(MODEL)

clean:  ## remove pipeline outputs (keeps data/01_raw and the MLflow store)
	find data/02_intermediate data/03_primary data/04_feature data/05_model_input data/06_models \
	     data/07_model_output data/08_reporting -type f ! -name .gitkeep -delete
