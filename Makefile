# The two commands of the README. Both bootstrap what they need (apt packages, .venv, editable install).
PY := .venv/bin/python
STAMP := .venv/.installed

.PHONY: demo test bootstrap bytecode lint man bench clean

bootstrap: $(STAMP)

$(STAMP): setup.cfg setup.py pyproject.toml $(shell find vaultfs -name "*.c" -o -name "*.h")
	bash .ci/bootstrap.sh
	touch $(STAMP)

# An editable install compiles no bytecode, and where PYTHONDONTWRITEBYTECODE is set (as on this
# project's machines) Python writes none either: every `vault` process would then compile each module
# it imports (~0.1 s a command). compileall writes what an installed package has; it only redoes
# modules whose source changed.
bytecode: $(STAMP)
	$(PY) -m compileall -q -j 0 vaultfs tools server > /dev/null

demo: bytecode
	bash .ci/demo.sh

test: bytecode
	bash .ci/proxies.sh
	$(PY) -m pytest -q -p no:cacheprovider $(PYTEST_ARGS)

lint: $(STAMP)
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .

man: $(STAMP)
	$(PY) -m vaultfs.tools.manpages man

clean:
	rm -rf .venv build *.egg-info
	find vaultfs -name "*.so" -delete
