# The two commands of the README. Both bootstrap what they need (apt packages, .venv, editable install).
PY := .venv/bin/python
STAMP := .venv/.installed

.PHONY: demo test bootstrap lint man bench clean

bootstrap: $(STAMP)

$(STAMP): setup.cfg setup.py pyproject.toml $(shell find vaultfs -name "*.c")
	bash .ci/bootstrap.sh
	touch $(STAMP)

demo: $(STAMP)
	bash .ci/demo.sh

test: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider $(PYTEST_ARGS)

lint: $(STAMP)
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .

man: $(STAMP)
	$(PY) -m vaultfs.tools.manpages man

clean:
	rm -rf .venv build *.egg-info
	find vaultfs -name "*.so" -delete
