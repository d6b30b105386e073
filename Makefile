# The two set-up commands (see README):
#   make serve [SET="checkpoint_file=/path/model.pth device=cuda"]   install + run the service
#   make test                                                       install + run the whole test suite
VENV ?= .venv
PY := $(VENV)/bin/python
CONFIG ?= serve_config.yaml
SET ?=
PYTEST_ARGS ?=

.PHONY: install install-dev serve test

install:
	bash scripts/install.sh

install-dev:
	INSTALL_DEV=1 bash scripts/install.sh
	bash scripts/install_labelstudio.sh

serve: install
	$(PY) scripts/serve.py $(CONFIG) $(foreach s,$(SET),--set $(s))

test: install-dev
	$(PY) -m pytest tests $(PYTEST_ARGS)
