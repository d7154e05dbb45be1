# The two commands: `make demo` (the main job) and `make test` (lint + tests).
# Both create .venv, install fourbit and the Debian data packages when missing.
VENV      ?= .venv
PY        := $(VENV)/bin/python
STAMP     := $(VENV)/.fourbit-installed
DATA_PKGS := dataset-fashion-mnist espeak-ng diatheke sword-text-web sword-text-sparv
OUT       ?= out

.PHONY: demo test data clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

data:
	scripts/ensure-debian-packages.sh $(DATA_PKGS)

demo: $(STAMP) data
	$(VENV)/bin/fourbit formats --plot $(OUT)/formats.png
	$(VENV)/bin/fourbit pixels --out $(OUT)/pixels.png

test: $(STAMP) data
	$(VENV)/bin/ruff check src tests
	$(VENV)/bin/ruff format --check src tests
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) $(OUT) .pytest_cache .ruff_cache .hypothesis
