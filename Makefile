# Two entry points for a fresh machine: `make demo` and `make test`. Both build .venv first.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast venv clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	# constraints.txt pins torch to the CPU wheel; an unpinned torch would pull a multi-GB CUDA build.
	$(VENV)/bin/pip install --quiet -c constraints.txt -e '.[test]'
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/farflung demo

# The tests that start no hivemind run on every core (pytest-xdist), those on a local Ray of their own among them;
# those that start hivemind, or a multi-node Ray cluster, run one at a time after them, since they time shaped links
# and hivemind's matchmaking, which sharing the cores would skew.
test: $(STAMP)
	$(VENV)/bin/python -m pytest -q -n auto -m "not hivemind and not ray_cluster" --durations=10
	$(VENV)/bin/python -m pytest -q -m "hivemind or ray_cluster" --durations=30

# All but the tests that start Ray or hivemind (markers in pyproject.toml).
test-fast: $(STAMP)
	$(VENV)/bin/python -m pytest -q -n auto -m "not ray and not hivemind"

clean:
	rm -rf $(VENV) *.egg-info
