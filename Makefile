PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
DEMO_ARGS ?=   # e.g. make demo DEMO_ARGS="--seed 7" or "--quick"

.PHONY: demo test bench clean

$(BIN)/blip: pyproject.toml
	@test -x $(BIN)/python || $(PY) -m venv $(VENV) || python3 -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	@touch $(BIN)/blip

demo: $(BIN)/blip
	$(BIN)/blip reproduce --out runs/demo --rows none,capfilt $(DEMO_ARGS)  # all four Table-1 rows: drop --rows (~33 min)

test: $(BIN)/blip
	@test -x /usr/bin/chromium -a -x /usr/bin/chromedriver || { apt-get update -q && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver; }  # tests/test_browser.py
	$(BIN)/python -m pytest -q

bench: $(BIN)/blip
	$(BIN)/python benchmarks/caption_speed.py

clean:
	rm -rf $(VENV) build src/*.egg-info
