# deca-p2p: two commands on a fresh machine: `make cluster` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TOPOLOGY ?= topologies/ring8.json
CLUSTER_ARGS ?=

.PHONY: install test test-integration cluster simulate bench clean

install: $(STAMP)

# torch is pinned and installed first: an unpinned torch pulls several GB of CUDA wheels.
$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

test: install
	$(PY) -m pytest -q -m 'not integration' tests

# Slower real-process tests (architecture matrix, own-data peers; as root also peers in network namespaces and a
# single-node Slurm job: tests/test_netns.py, tests/test_slurm.py): run by .ci/run after `make test`.
test-integration: install
	$(PY) -m pytest -q -m integration tests

cluster: install
	$(VENV)/bin/deca-peer cluster --topology $(TOPOLOGY) $(CLUSTER_ARGS)

simulate: install
	$(VENV)/bin/deca-peer simulate --topology $(TOPOLOGY)

# Every benchmark, one after the other (they measure time: never run them side by side).
# Each writes a table and a plot under benchmarks/results/ and prints its headline last.
BENCHES := wire_throughput bandwidth_latency memory eval_memory convergence scale
bench: install
	@for b in $(BENCHES); do echo "== $$b"; $(PY) benchmarks/$$b.py || exit 1; done

clean:
	rm -rf $(VENV) runs *.egg-info
