# The two commands of the README: `make serve` and `make test`. Both set up .venv first.
.PHONY: setup serve test lint

setup:
	./scripts/setup.sh

serve: setup
	.venv/bin/streamedit serve $(ARGS)

test: setup
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .
	.venv/bin/python -m pytest -q $(ARGS)

lint: setup
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .
