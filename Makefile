# The two commands: `make demo` (the main job: fp32 vs 4-bit training) and `make test`.
# Both create .venv, install fourbit and the Debian data packages when missing.
VENV      ?= .venv
PY        := $(VENV)/bin/python
STAMP     := $(VENV)/.fourbit-installed
DATA_PKGS := dataset-fashion-mnist espeak-ng diatheke sword-text-web sword-text-sparv
OUT       ?= out
# sized to finish in under 10 minutes on 2 CPU cores; --resume continues an interrupted demo
DEMO_ARGS ?= --epochs 4 --train-limit 8000 --test-limit 2000 --resume

.PHONY: demo test data clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	$(PY) -c "from fourbit.formats import kernels; print(kernels.build())" \
		|| echo "fourbit: C kernels not built, using pure PyTorch (slower)"
	touch $(STAMP)

data:
	scripts/ensure-debian-packages.sh $(DATA_PKGS)

demo: $(STAMP) data
	$(VENV)/bin/fourbit formats --plot $(OUT)/formats.png
	$(VENV)/bin/fourbit pixels --out $(OUT)/pixels.png
	$(VENV)/bin/fourbit compare --task fashion-resnet20 --recipes fp32,ibm4 $(DEMO_ARGS) --out $(OUT)/demo

test: $(STAMP) data
	$(VENV)/bin/ruff check src tests
	$(VENV)/bin/ruff format --check src tests
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) $(OUT) .pytest_cache .ruff_cache .hypothesis
