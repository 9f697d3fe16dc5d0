# craft: the handful of targets a user and CI need. `make demo` and `make test` work on a fresh machine.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
PROFILE ?= demo-histo
export HF_HUB_OFFLINE := 1
export GX_ANALYTICS_ENABLED := False
export DO_NOT_TRACK := 1

.PHONY: setup demo test test-slow lint format compile bench images clean

$(BIN)/craft: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# CPU torch first (a local wheel on these machines); the pins below then keep it.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[dev]"
	touch $(BIN)/craft

setup: $(BIN)/craft  ## create .venv and install craft with its test tools

demo: setup  ## generate demo data and run the whole KFP pipeline locally (kfp.local); PROFILE=demo-cxr for the other
	$(BIN)/craft demo --profile $(PROFILE)

test: setup  ## fast CPU tests (slow and gpu tests are deselected)
	$(BIN)/pytest -q

test-slow: setup  ## the slow end-to-end tests too
	$(BIN)/pytest -q -m "not gpu"

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: setup
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

compile: setup  ## compile the pipeline to YAML
	$(BIN)/craft pipeline compile --output craft_pipeline.yaml

# Container images (docker/cpu, docker/gpu), tagged with the git commit they are built from: the tag
# components/images.py names by default and the code version recorded in lineage (CRAFT_GIT_SHA in the image).
# A dirty tree is refused: its code would not be the commit the tag names. Needs a Docker engine and network:
# not runnable on the offline dev machines (CI lints the Dockerfiles with hadolint).
REGISTRY ?= ghcr.io/craft-ml
VERSION  ?= $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
GIT_SHA  ?= $(shell git rev-parse HEAD)
images:  ## build the CPU and GPU images tagged <registry>/craft-{cpu,gpu}:<git sha> (docker; not runnable here)
	@git diff --quiet HEAD -- || { echo "images: the working tree has uncommitted changes; commit first (the tag is the commit)" >&2; exit 1; }
	docker build -f docker/cpu/Dockerfile --build-arg VERSION=$(VERSION) --build-arg VCS_REF=$(GIT_SHA) -t $(REGISTRY)/craft-cpu:$(GIT_SHA) .
	docker build -f docker/gpu/Dockerfile --build-arg VERSION=$(VERSION) --build-arg VCS_REF=$(GIT_SHA) -t $(REGISTRY)/craft-gpu:$(GIT_SHA) .
	@echo "push $(REGISTRY)/craft-cpu:$(GIT_SHA) and $(REGISTRY)/craft-gpu:$(GIT_SHA); set newTag: $(GIT_SHA) in your overlay (docs/DEPLOY.md)"

clean:
	rm -rf runs outputs .pytest_cache .ruff_cache
