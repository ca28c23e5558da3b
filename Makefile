.PHONY: setup demo test lint fast-test
setup:
	bash scripts/setup.sh

demo: setup
	.venv/bin/surgery demo

test: setup
	.venv/bin/ruff check .
	.venv/bin/python -m pytest -q -n auto

fast-test: setup
	.venv/bin/python -m pytest -q -n auto -m "not slow"

lint: setup
	.venv/bin/ruff check .
