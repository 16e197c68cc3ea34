# `make up` and `make test` are the two commands in the README: each works on a fresh machine.
.PHONY: setup up test lint bench

setup:
	./scripts/setup

up: setup
	dst up

test: setup lint
	python3 -m pytest -q

lint:
	python3 -m ruff check dst tests bench
	python3 -m ruff format --check dst tests bench
	python3 -m mypy

bench: setup
	python3 -m bench
	python3 -m bench.failfast
