# One entry point for people and CI. Every target installs what it needs first.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

# Pass-through variables: make seed COUNT=3000 TRUNCATE=1 USERS=5 SEED=7
SEED_ARGS := $(if $(COUNT),--count $(COUNT)) $(if $(USERS),--users $(USERS)) \
             $(if $(MIN_TOTAL),--min-total $(MIN_TOTAL)) $(if $(MAX_TOTAL),--max-total $(MAX_TOTAL)) \
             $(if $(filter 1 yes true,$(TRUNCATE)),--truncate) $(if $(SEED),--seed $(SEED))

.PHONY: help venv run db-up db-down psql migrate seed test bench failed stats clean

help:
	@echo "make run       venv, deps, database, migrations, seed data, API + worker"
	@echo "make test      the whole test suite (embedded Postgres unless DATABASE_URL is set)"
	@echo "make seed      fake orders: COUNT=N USERS=N MIN_TOTAL= MAX_TOTAL= TRUNCATE=1 SEED=S"
	@echo "make migrate   apply pending migrations"
	@echo "make db-up     start the embedded server (if DATABASE_URL unset) and print the URL"
	@echo "make db-down   stop the embedded server"
	@echo "make psql      psql on the database in use"
	@echo "make failed    failed and dead jobs;  make stats: jobs per queue and state"
	@echo "make bench     benchmarks (QUICK=1 for a smoke run)"

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	$(PY) -m pip install --quiet -e '.[fast]' \
	  || echo "gunicorn-h1c did not build: gunicorn keeps its pure-Python HTTP parser"
	touch $(STAMP)

run: $(STAMP)
	$(PY) -m scripts.run

db-up: $(STAMP)
	@$(PY) -m jobrunner.embedded up

db-down: $(STAMP)
	@$(PY) -m jobrunner.embedded down

psql: $(STAMP)
	$(PY) -m scripts.psql

migrate: $(STAMP)
	$(PY) -m jobrunner.migrate

seed: $(STAMP)
	$(PY) -m scripts.seed $(SEED_ARGS)

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

failed: $(STAMP)
	$(PY) -m jobrunner failed

stats: $(STAMP)
	$(PY) -m jobrunner stats

bench: $(STAMP)
	$(PY) -m bench $(if $(filter 1 yes true,$(QUICK)),--quick)

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
