# Two commands: `make reproduce` (set-up + the main job) and `make test` (set-up + the tests).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The rules call `cm`, the console script of this project's environment.
RUN := PATH="$(CURDIR)/$(BIN):$$PATH"
STAMP := $(VENV)/.installed
CORES ?= all

.PHONY: reproduce reproduce-conditional test test-cluster lint setup clean

reproduce: $(STAMP)
	$(RUN) snakemake --cores $(CORES) reproduce_table

# The class-conditional variant of the embedded default (results/conditional/).
reproduce-conditional: $(STAMP)
	$(RUN) snakemake --cores $(CORES) reproduce_table --configfile config/digits_conditional.yaml

# Two pytest workers (pytest-xdist), a test file per worker at a time: the tests of the
# session's tiny run (tests/test_tiny_run.py) share one worker, and one tiny run.
test: $(STAMP)
	$(RUN) python -m pytest -q -n 2 --dist loadfile

# The real single-node Slurm tests (root; Debian's slurm-wlm, installed by .ci/run).
test-cluster: $(STAMP)
	$(RUN) python -m pytest -q -m slurm tests/test_slurm.py

lint: $(STAMP)
	$(BIN)/ruff check cmcore tests
	$(BIN)/snakefmt --check Snakefile workflow/rules
	$(RUN) snakemake --lint

setup: $(STAMP)

# torch and torchvision are pinned to releases that install from local wheels where offered, in
# the one call that installs the project (one resolution; 3.5 s less than two calls).
# scripts/install.py installs with uv, given pip's configuration (its indexes, find-links and
# constraints), in 17 s instead of pip's 48 (measured on 2 cores); with pip where uv cannot.
# pip byte-compiles one file at a time; compileall does it on every core afterwards, cmcore
# included (jobs import the compiled files even where PYTHONDONTWRITEBYTECODE is set; cmcore's
# own: 0.15 s less per job, measured), leaving out the dependencies' test suites (a quarter of
# their code, never imported). A few files do not compile (Python 2 test data and the like):
# compileall says so, harmlessly.
$(STAMP): pyproject.toml scripts/install.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python scripts/install.py "torch==2.14.1" "torchvision==0.29.1" -e ".[dev,peers]"
	$(BIN)/python -m compileall -q -j 0 -x '/tests?/' $(VENV)/lib cmcore > /dev/null || true
	touch $(STAMP)

clean:
	rm -rf results/* .snakemake
	git checkout -- results/README.md
