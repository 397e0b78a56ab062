PYTHON ?= python3
SHARED ?= ../shared
OUT ?= converted/mt3

.PHONY: install convert test bench fuzz lint

install:
	$(PYTHON) -m pip install -e ".[dev]"

convert:
	$(PYTHON) -m convert_mt3 $(SHARED)/checkpoints/mt3 $(OUT) --golden $(SHARED)/golden --overwrite

test:
	MT3_SHARED_DIR=$${MT3_SHARED_DIR:-$(SHARED)} $(PYTHON) -m pytest -q

bench:
	MT3_SHARED_DIR=$${MT3_SHARED_DIR:-$(SHARED)} $(PYTHON) benchmarks/bench.py

fuzz:
	MT3_FUZZ_CASES=$${MT3_FUZZ_CASES:-200} $(PYTHON) -m pytest -q -s tests/test_fuzz.py

lint:
	$(PYTHON) -m ruff check convert_mt3 tests examples benchmarks
