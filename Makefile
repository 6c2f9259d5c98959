# Two entry points (see README): `make demo` and `make test`. Both create .venv when missing.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
TORCH  ?= torch==2.13.0

.PHONY: demo test lint format bench clean suite-time

# The CPU wheel of torch is installed first and pinned, so that no later requirement can pull
# a multi-GB CUDA build. GPU users: install your CUDA torch into .venv first, then `make`.
# pytorch-fid (the tests check FID against its own function) comes without its dependencies:
# its torchvision would pull a CUDA torch, and the function needs none of it.
$(STAMP): pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev]"
	$(PY) -m pip install -q --no-deps pytorch-fid==0.3.0
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m rqgen demo --out demo_out

# pytest exits 5 when it collects no test: that is a broken suite, not a pass. The web demo's
# test drives Debian's chromium: installed here when missing and we may (root with apt-get).
# Tests run in one worker per core (pytest-xdist, at most 4): most run the CLI in one torch
# thread, so a second worker uses the core a serial run leaves idle.
test: $(STAMP)
	@command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null \
	  && { apt-get install -y -q chromium chromium-driver >/dev/null 2>&1 || { apt-get update -q \
	  >/dev/null && apt-get install -y -q chromium chromium-driver >/dev/null; }; }; } \
	  || echo "no chromium: the browser test of rqgen serve will be skipped"
	$(VENV)/bin/ruff check rqgen tests benchmarks
	$(PY) -m pytest -q -p no:cacheprovider -n auto --maxprocesses 4 --durations=15 tests; \
	  rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing"; exit 1; fi; exit $$rc

lint: $(STAMP)
	$(VENV)/bin/ruff check rqgen tests benchmarks
	$(VENV)/bin/ruff format --check rqgen tests benchmarks

format: $(STAMP)
	$(VENV)/bin/ruff format rqgen tests benchmarks
	$(VENV)/bin/ruff check --fix rqgen tests benchmarks

bench: $(STAMP)
	$(PY) -m pip install -q -e ".[bench]"
	$(PY) benchmarks/quantizer_speed.py
	$(PY) benchmarks/rate_distortion.py
	$(PY) benchmarks/sampling_speed.py
	$(PY) benchmarks/digits_quality.py

# Both README commands on fresh clones of HEAD, set-up included (benchmarks/results/suite_time.md)
suite-time:
	python3 benchmarks/suite_time.py

clean:
	rm -rf demo_out .pytest_cache
