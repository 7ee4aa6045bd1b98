"""Tests for deca_p2p.topology and the `deca-peer topology` commands."""
from __future__ import annotations

import copy
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import networkx as nx
import numpy as np
import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from deca_p2p import topology as T
from deca_p2p.cli import main
from deca_p2p.topology import Link, TopologyError

ROOT = Path(__file__).resolve().parents[1]
TOPO_DIR = ROOT / "topologies"

# A 4-node path 0-1-2-3 plus chord 1-3: small, irregular degrees, so Metropolis != uniform.
BASE = {"name": "t", "nodes": [0, 1, 2, 3], "edges": [[0, 1], [1, 2], [2, 3], [1, 3]]}


def mk(**changes) -> dict:
    d = copy.deepcopy(BASE)
    d.update(changes)
    return d


def assert_valid_mixing(t: T.Topology) -> None:
    w = t.matrix()
    assert nx.is_connected(t.graph())
    assert np.all(w >= 0)
    np.testing.assert_allclose(w, w.T, atol=1e-12)
    np.testing.assert_allclose(w.sum(axis=0), 1.0, atol=1e-12)
    np.testing.assert_allclose(w.sum(axis=1), 1.0, atol=1e-12)
    # zero pattern of W matches the graph (plus diagonal)
    a = nx.to_numpy_array(t.graph(), nodelist=t.nodes) + np.eye(len(t.nodes))
    assert np.all((w > 0) <= (a > 0))
    if len(t.nodes) > 1:
        assert t.slem() < 1 - 1e-9


# --------------------------------------------------------------------------- validation

EXPLICIT_OK = {
    "0": {"0": 0.5, "1": 0.5},
    "1": {"0": 0.5, "1": 0.0, "2": 0.25, "3": 0.25},
    "2": {"1": 0.25, "2": 0.5, "3": 0.25},
    "3": {"1": 0.25, "2": 0.25},  # self weight filled in as 0.5
}


@pytest.mark.parametrize(
    "data, phrase",
    [
        ([1, 2], "must be a JSON object"),
        ({k: v for k, v in BASE.items() if k != "nodes"}, "missing key 'nodes'"),
        ({k: v for k, v in BASE.items() if k != "edges"}, "missing key 'edges'"),
        ({k: v for k, v in BASE.items() if k != "name"}, "missing key 'name'"),
        (mk(name=3), "'name' must be a string"),
        (mk(nodes="0,1"), "'nodes' must be a list"),
        (mk(nodes=[]), "'nodes' is empty"),
        (mk(edges={"0": 1}), "'edges' must be a list"),
        (mk(extra=1), "unknown key 'extra'"),
        (mk(nodes=[0, 1, 2, 3, 2]), "duplicate node id 2"),
        (mk(nodes=[0, 1, "2", 3]), "node id '2' is not an integer"),
        (mk(nodes=[0, 1, 2.5, 3]), "node id 2.5 is not an integer"),
        (mk(nodes=[0, 1, True, 3]), "node id True is not an integer"),
        (mk(nodes=[0, 1, 2, -3]), "node id -3 is negative"),
        (mk(edges=[[0, 1], [1, 9]]), "names unknown node 9"),
        (mk(edges=[[0, 1], [1]]), "not a pair of integer ids"),
        (mk(edges=[[0, 1], [1, 2], [2, 3], [2, 2]]), "self-loop edge [2, 2]"),
        (mk(edges=[[0, 1], [1, 2], [2, 3], [2, 1]]), "duplicate edge [2, 1]"),
        (mk(edges=[[0, 1], [1, 2]]), "graph is not connected (components: [0, 1, 2] and [3])"),
        (mk(nodes=[0, 1, 2, 3, 4], edges=[[0, 1], [2, 3]]),
         "components: [0, 1], [2, 3] and [4]"),
        (mk(weights="magic"), "'weights' must be"),
        (mk(weights={**EXPLICIT_OK, "0": {"0": 0.5, "1": 0.25, "2": 0.25}}), "w[0][2] is on a non-edge"),
        (mk(weights={**EXPLICIT_OK, "2": {"1": -0.25, "2": 1.0, "3": 0.25}}), "w[2][1] = -0.25 is negative"),
        (mk(weights={**EXPLICIT_OK, "2": {"1": 0.25, "2": 0.4, "3": 0.25}}), "row 2 does not sum to 1"),
        (mk(weights={**EXPLICIT_OK, "3": {"1": 0.75, "2": 0.75}}), "row 3 does not sum to 1"),
        (mk(weights={**EXPLICIT_OK, "2": {"1": 0.3, "2": 0.45, "3": 0.25}}), "not symmetric"),
        (mk(weights={k: v for k, v in EXPLICIT_OK.items() if k != "2"}), "no row for node(s) [2]"),
        (mk(weights={**EXPLICIT_OK, "7": {"7": 1.0}}), "row for unknown node 7"),
        (mk(weights={**EXPLICIT_OK, "x": {}}), "key 'x' is not a node id"),
        (mk(weights={**EXPLICIT_OK, "0": {"0": "half", "1": 0.5}}), "is not a finite number"),
        (mk(links=[]), "'links' must be an object"),
        (mk(links={"default": {"latency": 5}}), "unknown key 'latency'"),
        (mk(links={"default": {"latency_ms": -1}}), "latency_ms = -1 is negative"),
        (mk(links={"0-1": {"bandwidth_mbps": -10}}), "bandwidth_mbps = -10 is negative"),
        (mk(links={"0-1": {"jitter_ms": -0.5}}), "jitter_ms = -0.5 is negative"),
        (mk(links={"0-1": {"bandwidth_mbps": 0}}), "bandwidth_mbps must be > 0"),
        (mk(links={"0-1": {"latency_ms": "5"}}), "is not a finite number"),
        (mk(links={"0-2": {"latency_ms": 5}}), "'0-2' is not an edge"),
        (mk(links={"0_1": {}}), "bad key '0_1'"),
        (mk(links={"0-1": {}, "1-0": {}}), "link 0-1 is given twice"),
    ],
)
def test_validation_errors(data, phrase):
    with pytest.raises(TopologyError) as ei:
        T.from_dict(data, source="x.json")
    msg = str(ei.value)
    assert phrase in msg
    assert msg.startswith("x.json: ")
    assert "\n" not in msg


def test_explicit_weights_accepted_and_self_filled():
    t = T.from_dict(mk(weights=EXPLICIT_OK))
    assert t.weight_row(3) == {1: 0.25, 2: 0.25, 3: 0.5}
    assert t.weight_row(1)[1] == 0.0
    assert t.weight_scheme == "explicit"
    assert_valid_mixing(t)


def test_weights_default_to_metropolis_and_uniform():
    t = T.from_dict(BASE)
    assert t.weight_scheme == "metropolis"
    # deg: 0->1, 1->3, 2->2, 3->2
    assert t.weight_row(0) == pytest.approx({0: 0.75, 1: 0.25})
    assert t.weight_row(2) == pytest.approx({1: 0.25, 2: 1 / 3 + 1 / 12, 3: 1 / 3})
    u = T.from_dict(mk(weights="uniform"))
    assert u.weight_row(2) == pytest.approx({1: 0.25, 2: 0.5, 3: 0.25})
    for x in (t, u):
        assert_valid_mixing(x)


def test_single_node_allowed():
    t = T.from_dict({"name": "solo", "nodes": [5], "edges": []})
    assert t.neighbors(5) == []
    assert t.weight_row(5) == {5: 1.0}
    assert t.slem() == 0.0 and t.spectral_gap() == 1.0


def test_accessors_and_links():
    d = mk(links={"default": {"latency_ms": 10, "bandwidth_mbps": 100},
                  "3-1": {"latency_ms": 50}})
    t = T.from_dict(d)
    assert t.nodes == [0, 1, 2, 3]
    assert t.edges == [(0, 1), (1, 2), (1, 3), (2, 3)]
    assert t.neighbors(1) == [0, 2, 3]
    assert t.link(0, 1) == Link(10.0, 100.0, 0.0)
    # override inherits unspecified fields from default; keys are undirected
    assert t.link(1, 3) == t.link(3, 1) == Link(50.0, 100.0, 0.0)
    with pytest.raises(TopologyError, match="not an edge"):
        t.link(0, 2)
    with pytest.raises(TopologyError, match="unknown node 9"):
        t.neighbors(9)
    assert T.from_dict(BASE).link(0, 1) == Link()  # absent links: unlimited, no delay


# --------------------------------------------------------------------------- files

def test_load_missing_file(tmp_path):
    p = tmp_path / "nope.json"
    with pytest.raises(TopologyError, match="no such file") as ei:
        T.load(p)
    assert str(p) in str(ei.value)


def test_load_invalid_json(tmp_path):
    p = tmp_path / "bad.json"
    p.write_text('{"name": "x", "nodes": [0, 1,]}')
    with pytest.raises(TopologyError, match="invalid JSON") as ei:
        T.load(p)
    assert str(ei.value).startswith(str(p)) and "\n" not in str(ei.value)


def test_load_duplicate_json_key(tmp_path):
    p = tmp_path / "dup.json"
    p.write_text('{"name": "x", "nodes": [0], "nodes": [1], "edges": []}')
    with pytest.raises(TopologyError, match="duplicate key 'nodes'"):
        T.load(p)


def test_load_validation_error_names_file(tmp_path):
    p = tmp_path / "disc.json"
    p.write_text(json.dumps(mk(edges=[[0, 1], [2, 3]])))
    with pytest.raises(TopologyError) as ei:
        T.load(p)
    assert str(ei.value) == f"{p}: graph is not connected (components: [0, 1] and [2, 3])"


SHIPPED = {
    "ring4.json": lambda: T.ring(4),
    "ring8.json": lambda: T.ring(8),
    "torus3x3.json": lambda: T.torus(3, 3),
    "complete8.json": lambda: T.complete(8),
    "exp16.json": lambda: T.exponential(16),
    "star8.json": lambda: T.star(8),
}


@pytest.mark.parametrize("fname", sorted(SHIPPED))
def test_shipped_files_match_generators(fname):
    path = TOPO_DIR / fname
    t = T.load(path)
    g = SHIPPED[fname]()
    assert t == g
    assert path.read_text() == g.to_json()  # byte-identical: regenerated, not hand-edited
    assert t.to_dict()["links"] == {"default": {"latency_ms": 0, "bandwidth_mbps": None, "jitter_ms": 0}}


@pytest.mark.parametrize(
    "t",
    [T.ring(5), T.torus(2, 3), T.from_dict(mk(weights=EXPLICIT_OK)), T.from_dict(mk(weights="uniform")),
     T.from_dict(mk(links={"default": {"jitter_ms": 1.5}, "2-3": {"bandwidth_mbps": 12.5}}))],
    ids=["ring", "torus", "explicit", "uniform", "links"],
)
def test_round_trip(t):
    assert T.from_dict(json.loads(t.to_json())) == t
    assert T.from_dict(t.to_dict()) == t


# --------------------------------------------------------------------------- generators

GENERATED = (
    [T.ring(n) for n in (1, 2, 3, 4, 7, 8, 16)]
    + [T.torus(r, c) for r, c in ((1, 1), (1, 3), (2, 2), (2, 5), (3, 3), (4, 4))]
    + [T.complete(n) for n in (1, 2, 5, 8)]
    + [T.star(n) for n in (1, 2, 5, 8)]
    + [T.exponential(n) for n in (1, 2, 3, 6, 16, 33)]
    + [T.erdos_renyi(n, p, seed=s) for n, p in ((10, 0.3), (20, 0.15)) for s in range(4)]
)


@pytest.mark.parametrize("t", GENERATED, ids=[t.name for t in GENERATED])
def test_generators_valid(t):
    assert t.nodes == list(range(len(t.nodes)))
    assert all(i < j for i, j in t.edges) and t.edges == sorted(set(t.edges))
    assert_valid_mixing(t)
    assert 0 <= t.slem() < 1 and t.spectral_gap() == pytest.approx(1 - t.slem())


def test_generator_shapes():
    assert T.ring(8).name == "ring8" and len(T.ring(8).edges) == 8
    assert T.torus(3, 3).name == "torus3x3" and all(len(T.torus(3, 3).neighbors(i)) == 4 for i in range(9))
    assert T.complete(8).name == "complete8" and len(T.complete(8).edges) == 28
    assert T.star(8).name == "star8" and T.star(8).neighbors(0) == list(range(1, 8))
    e = T.exponential(16)
    assert e.name == "exp16"
    assert e.neighbors(0) == sorted({1, 2, 4, 8, 15, 14, 12})


@pytest.mark.parametrize("n", [3, 4, 5, 8, 13, 32])
def test_ring_slem_closed_form(n):
    # Metropolis on a ring: w = 1/3 everywhere, eigenvalues 1/3 + 2/3 cos(2πk/n).
    # For n >= 3 the k=1 eigenvalue has the largest modulus among k != 0.
    assert T.ring(n).slem() == pytest.approx(1 / 3 + 2 / 3 * math.cos(2 * math.pi / n), abs=1e-12)


@pytest.mark.parametrize("n", [2, 5, 8])
def test_complete_slem_zero(n):
    # Metropolis on K_n is J/n: one exchange reaches exact consensus.
    assert T.complete(n).slem() == pytest.approx(0.0, abs=1e-12)
    np.testing.assert_allclose(T.complete(n).matrix(), np.full((n, n), 1 / n))


def test_erdos_retries_until_connected_and_is_deterministic():
    t = T.erdos_renyi(10, 0.2, seed=0)
    assert nx.is_connected(t.graph())
    used = int(t.name.rsplit("-s", 1)[1])
    assert used >= 0
    assert T.erdos_renyi(10, 0.2, seed=used) == t
    assert T.erdos_renyi(10, 0.2, seed=0) == t
    with pytest.raises(TopologyError, match="no connected G"):
        T.erdos_renyi(50, 0.001)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(2, 25), p=st.floats(0.1, 1.0), seed=st.integers(0, 10_000))
def test_erdos_property(n, p, seed):
    t = T.erdos_renyi(n, p, seed=seed)
    assert_valid_mixing(t)
    # uniform weights on the same graph are also a valid mixing matrix
    assert_valid_mixing(T.from_dict({**t.to_dict(), "weights": "uniform"}))


def test_generate_dispatch_and_errors():
    assert T.generate("ring", "8") == T.ring(8)
    assert T.generate("torus", 3, 3) == T.torus(3, 3)
    assert T.generate("exponential", 16) == T.exponential(16)
    assert T.generate("erdos", "10", p=0.3, seed=1) == T.erdos_renyi(10, 0.3, seed=1)
    assert T.generate("erdos", "10", "0.3", "1") == T.erdos_renyi(10, 0.3, seed=1)
    t = T.generate("ring", 4, link=Link(latency_ms=5, bandwidth_mbps=100))
    assert t.link(0, 1) == Link(5.0, 100.0, 0.0)
    for args, kw, phrase in [
        (("hypercube", 8), {}, "unknown topology kind 'hypercube'"),
        (("ring",), {}, "missing n"),
        (("ring", "x"), {}, "n must be a number"),
        (("ring", 0), {}, "n must be an integer >= 1"),
        (("ring", 8, 9), {}, "too many arguments"),
        (("torus", 3), {}, "missing cols"),
        (("ring", 8), {"p": 0.5}, "takes no p"),
        (("erdos", 10), {}, "missing p"),
        (("erdos", 10, 1.5), {}, "p must be in (0, 1]"),
        (("erdos", 10, 0.5), {"p": 0.5}, "p given twice"),
        (("ring", 4), {"link": {"latency_ms": -1}}, "negative"),
    ]:
        with pytest.raises(TopologyError) as ei:
            T.generate(*args, **kw)
        assert phrase in str(ei.value), (args, kw, str(ei.value))


def test_metropolis_and_uniform_weight_functions():
    g = nx.star_graph(3)  # hub degree 3, leaves degree 1
    m = T.metropolis_weights(g)
    assert m[0] == pytest.approx({0: 0.25, 1: 0.25, 2: 0.25, 3: 0.25})
    assert m[1] == pytest.approx({0: 0.25, 1: 0.75})
    assert T.uniform_weights(g) == m  # max degree is the hub's, so the two agree here
    g = nx.path_graph(3)
    assert T.metropolis_weights(g)[0] == pytest.approx({0: 2 / 3, 1: 1 / 3})
    assert T.uniform_weights(g)[1] == pytest.approx({0: 1 / 3, 1: 1 / 3, 2: 1 / 3})


def test_summary_mentions_everything():
    text = T.summary(T.from_dict(mk(links={"0-1": {"latency_ms": 7}})))
    assert "topology t: 4 nodes, 4 edges" in text
    assert "link 0-1: latency 7 ms" in text
    assert "slem:" in text and "spectral gap:" in text
    assert "0.7500" in text  # node 0's self weight


def test_check_ids():
    t = T.ring(4)
    T.check_ids(t, [3, 2, 1, 0])
    T.check_ids(t, ["0", "1", "2", "3"])  # bootstrap keys are strings
    with pytest.raises(TopologyError) as ei:
        T.check_ids(t, ["0", "1", "2", "7"])
    assert str(ei.value) == "bootstrap file ids do not match topology 'ring4': missing [3]; extra [7]"
    with pytest.raises(TopologyError, match="peers.json ids do not match.*missing \\[2, 3\\]"):
        T.check_ids(t, [0, 1], what="peers.json")
    with pytest.raises(TopologyError, match="'x' is not a node id"):
        T.check_ids(t, ["x"])


# --------------------------------------------------------------------------- CLI

def run_cli(*args: str):
    return CliRunner().invoke(main, ["topology", *args])


def test_cli_gen_round_trips(tmp_path):
    r = run_cli("gen", "ring", "8")
    assert r.exit_code == 0, r.output
    p = tmp_path / "x.json"
    p.write_text(r.stdout)
    assert T.load(p) == T.ring(8)


def test_cli_gen_options():
    r = run_cli("gen", "erdos", "10", "--p", "0.3", "--seed", "1",
                "--latency-ms", "5", "--bandwidth-mbps", "100")
    assert r.exit_code == 0, r.output
    t = T.from_dict(json.loads(r.stdout))
    assert t == T.generate("erdos", 10, p=0.3, seed=1, link=Link(5, 100))
    assert T.from_dict(json.loads(run_cli("gen", "torus", "3", "3").stdout)) == T.torus(3, 3)


def test_cli_show():
    r = run_cli("show", str(TOPO_DIR / "ring8.json"))
    assert r.exit_code == 0, r.output
    gap = 1 - (1 / 3 + 2 / 3 * math.cos(2 * math.pi / 8))
    assert f"spectral gap: {gap:.6f}" in r.stdout


@pytest.mark.parametrize("args", [("gen", "ring", "x"), ("gen", "blob", "3"), ("show", "NOFILE")])
def test_cli_errors_exit_2(args, tmp_path):
    r = run_cli(*[a.replace("NOFILE", str(tmp_path / "none.json")) for a in args])
    assert r.exit_code == 2
    assert r.stderr.startswith("error: ") and r.stderr.count("\n") == 1
    assert r.stdout == ""


def test_cli_bad_file_real_process(tmp_path):
    """The installed console script: exit 2, one 'error:' line, no traceback."""
    exe = shutil.which("deca-peer", path=str(Path(sys.executable).parent))
    cmd = [exe] if exe else [sys.executable, "-c", "from deca_p2p.cli import main; main()"]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(mk(edges=[[0, 1], [1, 2], [2, 2]])))
    r = subprocess.run([*cmd, "topology", "show", str(bad)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert r.stderr == f"error: {bad}: self-loop edge [2, 2]\n"
    assert "Traceback" not in r.stderr + r.stdout
