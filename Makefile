# The two commands of the README: `make serve` and `make test`. Both set up .venv first.
.PHONY: setup serve test lint fleet

setup:
	./scripts/setup.sh

serve: setup
	.venv/bin/streamedit serve $(ARGS)

fleet: setup
	.venv/bin/streamedit fleet $(ARGS)

test: setup
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .
	.venv/bin/python -m pytest -q $(ARGS)

lint: setup
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .
