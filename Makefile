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
# train-resnet/-vit/-swin: only the EfficientNet-Lite models have offline weights; the others
# need hub weights (online) or ALLOW_RANDOM_INIT=1 (train from scratch).
ALLOW_RANDOM_INIT ?= 0
COMMA := ,
RANDOM_INIT_PARAMS = $(if $(filter 1 true yes,$(ALLOW_RANDOM_INIT)),$(COMMA)training.train.pretrained=false$(COMMA)training.train.allow_random_init=true)
TRAIN_PIPELINES := ingestion,splitting,model_input,training

.PHONY: help setup data run train quick-train evaluate test test-fast lint viz mlflow-ui show-results serve \
        serve-dev api-docs predict export-onnx bench-train bench-ddp bench-inference ensemble cross-validation clean \
        info check-gpu dataset-info train-efficientnet train-resnet train-vit train-swin train-ensemble \
        analyze visualize notebook format type-check pre-commit dev viz-build clean-logs clean-all

help:  ## list the commands
	@grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN{FS=":.*?## "}{printf "  make %-20s %s\n", $$1, $$2}'

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

quick-train: setup  ## the same with the quick CPU config (8-12 minutes on 2 cores)
	$(KEDRO) run --env quick --pipelines ingestion,splitting,model_input,training

evaluate: setup  ## evaluation + reporting on the latest model (or VERSION=<model version>), without retraining
	$(KEDRO) run --env $(KEDRO_ENV) --pipelines evaluation,reporting $(if $(VERSION),--load-versions model_checkpoint:$(VERSION))

test: setup  ## run the whole test suite (slow tests included)
	$(BIN)/pytest

test-fast: setup  ## the tests that train no model, start no service and run no kedro run
	$(BIN)/pytest -m "not slow" -p no:hypothesispytest  # only the slow API fuzzing uses hypothesis: 2 s of imports saved

lint: setup  ## ruff
	$(BIN)/ruff check src tests

viz: setup  ## serve the pipeline graph (kedro viz) on localhost, with dataset previews
	$(KEDRO) viz run --host $(HOST) --include-previews

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

export-onnx: setup  ## export the model to ONNX and check it against PyTorch (ARGS=--int8 adds static int8)
	$(BIN)/skin-lesion-classifier export-onnx --model $(MODEL) $(ARGS)

bench-train: setup  ## full-data training benchmark: img/s, wall time, val/test BA and AUC (CONFIG=yaml)
	$(BIN)/python -m skin_lesion_classifier.training.bench --config $(or $(CONFIG),conf/quick/parameters_training.yml) --data-dir $(or $(DATA_DIR),../shared/data/ham10000)

ensemble: setup  ## train the ensemble members, metadata fusion and the weighted ensemble (quick config on CPU)
	$(KEDRO) run --env $(KEDRO_ENV) --pipelines ensemble

cross-validation: setup  ## K-fold cross-validation over lesion-grouped folds
	$(KEDRO) run --env $(KEDRO_ENV) --pipelines cross_validation

bench-ddp: setup  ## training img/s and wall time with 1 and NPROC (default 2) DDP processes (CONFIG, LIMIT, EPOCHS)
	for n in 1 $(or $(NPROC),2); do \
	  $(BIN)/python -m skin_lesion_classifier.training.bench --config $(or $(CONFIG),conf/quick/parameters_training.yml) \
	    --data-dir $(or $(DATA_DIR),../shared/data/ham10000) --limit $(or $(LIMIT),300) --epochs $(or $(EPOCHS),1) \
	    --set progress=false $$( [ $$n -gt 1 ] && echo "--set distributed={\"nproc_per_node\":$$n}" ); \
	done

bench-inference: setup  ## CPU latency/throughput of PyTorch and ONNX Runtime, service requests/s (loopback)
	$(BIN)/skin-lesion-classifier bench-inference --model $(MODEL)

clean:  ## remove pipeline outputs (keeps data/01_raw and the MLflow store)
	find data/02_intermediate data/03_primary data/04_feature data/05_model_input data/06_models \
	     data/07_model_output data/08_reporting -type f ! -name .gitkeep -delete

info: setup  ## versions, device, data present, latest model and MLflow run
	$(BIN)/python -m skin_lesion_classifier.workbench info --env $(KEDRO_ENV)

check-gpu: setup  ## CUDA / MPS / CPU, and what `make run` would choose (AMP, data path)
	$(BIN)/python -m skin_lesion_classifier.workbench check-gpu

dataset-info: setup  ## class and lesion counts (and split sizes) from the ingestion outputs
	$(BIN)/python -m skin_lesion_classifier.workbench dataset-info --env $(KEDRO_ENV)

train-efficientnet: setup  ## train EfficientNet-Lite0 (offline ImageNet weights)
	$(KEDRO) run --env $(KEDRO_ENV) --pipelines $(TRAIN_PIPELINES) --params "training.train.arch=tf_efficientnet_lite0$(RANDOM_INIT_PARAMS)"

train-resnet: setup  ## train ResNet-50 with SE attention (hub weights, or ALLOW_RANDOM_INIT=1)
	$(KEDRO) run --env $(KEDRO_ENV) --pipelines $(TRAIN_PIPELINES) --params "training.train.arch=resnet50_attention$(RANDOM_INIT_PARAMS)"

train-vit: setup  ## train ViT-S/16 at the config's input size (hub weights, or ALLOW_RANDOM_INIT=1)
	$(KEDRO) run --env $(KEDRO_ENV) --pipelines $(TRAIN_PIPELINES) --params "training.train.arch=vit_small$(RANDOM_INIT_PARAMS)"

train-swin: setup  ## train Swin-T with timm's own head (hub weights, or ALLOW_RANDOM_INIT=1)
	$(KEDRO) run --env $(KEDRO_ENV) --pipelines $(TRAIN_PIPELINES) --params "training.train.arch=swin_tiny,training.train.model_kwargs.head=null$(RANDOM_INIT_PARAMS)"

train-ensemble: ensemble  ## the same as `make ensemble`

analyze: setup  ## the evaluation pipeline on the latest model (metrics, predictions)
	$(KEDRO) run --env $(KEDRO_ENV) --pipelines evaluation

visualize: setup  ## the reporting pipeline (figures + report) from the latest evaluation
	$(KEDRO) run --env $(KEDRO_ENV) --pipelines reporting

notebook: setup  ## Jupyter with the Kedro kernel (catalog, context, session) in notebooks/
	$(KEDRO) jupyter notebook --notebook-dir notebooks

viz-build: setup  ## write the kedro-viz static site (graph + dataset previews) to build/
	$(KEDRO) viz build --include-previews

format: setup  ## ruff format + import sorting over src/ and tests/
	$(BIN)/ruff format src tests
	$(BIN)/ruff check --select I --fix src tests

type-check: setup  ## mypy over src/ (config in pyproject.toml)
	$(BIN)/mypy

pre-commit: setup  ## install the git hooks and run them on every file (.pre-commit-config.yaml)
	$(BIN)/pre-commit install
	$(BIN)/pre-commit run --all-files

dev: setup  ## the dev tools (pytest, ruff, mypy, pre-commit, Jupyter) and the git hooks
	$(BIN)/pip install -e ".[dev]"
	$(BIN)/pre-commit install

clean-logs:  ## remove log files (info.log, errors.log, logs/)
	rm -rf logs
	find . -maxdepth 1 -name '*.log' -type f -delete

clean-all: clean clean-logs  ## also the MLflow store, the viz site and tool caches (keeps data/01_raw, .venv)
	rm -rf mlflow.db mlruns mlartifacts build .viz .pytest_cache .mypy_cache .ruff_cache .ipynb_checkpoints
	find src tests -name __pycache__ -type d -prune -exec rm -rf {} +
