# The two set-up commands (see README):
#   make serve [SET="checkpoint_file=/path/model.pth score_threshold=0.3"]   install once + run the service
#   make test                                                               install once + run the whole test suite
# While changing code: `make test-fast`, the unit tests only (tests/unit: no Ray, under a minute).
# Pre-annotate on the running service: `make annotate PROJECT=12 [TASKS=1,2,3] [URL=...]`, CANCEL=<id>, LIST=1.
# Installing runs only when the venv is missing or requirements/install scripts
# changed since (a stamp file records it), so a second `make serve` starts
# offline without touching pip.
VENV ?= .venv
PY := $(VENV)/bin/python
CONFIG ?= serve_config.yaml
SET ?=
PYTEST_ARGS ?=
# make annotate PROJECT= TASKS= URL= JOB= CANCEL= LIST=: each one given becomes its flag.
ANNOTATE_ARGS = $(if $(PROJECT),--project $(PROJECT)) $(if $(TASKS),--tasks $(TASKS)) $(if $(URL),--url $(URL)) \
	$(if $(JOB),--job $(JOB)) $(if $(CANCEL),--cancel $(CANCEL)) $(if $(LIST),--list)
INSTALLED := $(VENV)/.installed
INSTALLED_DEV := $(VENV)/.installed-dev

.PHONY: install install-dev serve test test-fast annotate

$(INSTALLED): requirements.txt scripts/install.sh
	VENV=$(VENV) bash scripts/install.sh
	touch $@

$(INSTALLED_DEV): $(INSTALLED) requirements-dev.txt scripts/install_labelstudio.sh
	VENV=$(VENV) INSTALL_DEV=1 bash scripts/install.sh
	bash scripts/install_labelstudio.sh
	touch $@

install: $(INSTALLED)

install-dev: $(INSTALLED_DEV)

serve: $(INSTALLED)
	$(PY) scripts/serve.py $(CONFIG) $(foreach s,$(SET),--set $(s))

annotate: $(INSTALLED)
	$(PY) scripts/annotate.py $(ANNOTATE_ARGS)

test: $(INSTALLED_DEV)
	$(PY) -m pytest tests $(PYTEST_ARGS)

test-fast: $(INSTALLED_DEV)
	$(PY) -m pytest -m unit tests $(PYTEST_ARGS)
