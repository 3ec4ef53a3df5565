# The two commands of the README:
#   make serve   set up, then serve the tokenizer on the embedded default model
#   make test    set up (packages, photos), then run the test suite
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DATA ?= data/endless-sky

.PHONY: serve test test-fast setup data clean

$(BIN)/activate:
	$(PY) -m venv $(VENV)

# torch comes from pip's local CPU build for exactly torch==2.13.0 (see README).
$(VENV)/.installed: pyproject.toml | $(BIN)/activate
	$(BIN)/pip install -q -e '.[train,serve,export,generator,dev]'
	touch $@

setup: $(VENV)/.installed

data: setup
	$(BIN)/gqtok data fetch --dest $(DATA)

# The suite runs beside the images: docker/images.sh installs and starts a Docker engine where it can (root + apt),
# builds the images, runs pytest with GQTOK_IMAGE_TAG set, and stops the engine it started. IMAGES=0 skips that
# (the image tests then skip, saying why); under CI=true an engine that cannot be had fails the run.
IMAGES ?= 1
PYTEST := GQTOK_DATA=$(DATA) $(BIN)/python -m pytest -q -ra --durations=15 $(PYTEST_ARGS)

test: setup data
ifeq ($(IMAGES),1)
	bash docker/images.sh run env $(PYTEST)
else
	$(PYTEST)
endif

# The edit-test loop: everything not marked slow (no model trained, no server started, no images); minutes.
test-fast: setup data
	GQTOK_DATA=$(DATA) $(BIN)/python -m pytest -q -ra -m "not slow" --durations=10 $(PYTEST_ARGS)

serve: setup
	$(BIN)/gqtok serve $(SERVE_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache
