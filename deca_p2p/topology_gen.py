"""Topology generators: ring, torus, complete, star, Erdős–Rényi, exponential, and `generate`, which builds one
from a kind name and arguments (`deca-peer topology gen`). Each builds a graph and hands it to `from_dict`
(topology_parse.py) with Metropolis weights, so a generated topology is validated like a file. Pure module;
topology.py re-exports all of it.
"""
from __future__ import annotations

from typing import Any, Callable

import networkx as nx

MAX_ERDOS_TRIES = 1000


def _from_graph(name: str, g: nx.Graph) -> Topology:
    g = nx.Graph(g)
    g.remove_edges_from(list(nx.selfloop_edges(g)))  # e.g. cycle_graph(1) loops on itself
    d = {"name": name, "nodes": sorted(g.nodes), "edges": [list(e) for e in g.edges],
         "weights": "metropolis"}
    return from_dict(d, source=name)


def _need(kind: str, what: str, value: Any, low: int = 1) -> None:
    if not _is_int(value) or value < low:
        raise TopologyError(f"{kind}: {what} must be an integer >= {low}, got {value!r}")


def ring(n: int) -> Topology:
    _need("ring", "n", n)
    return _from_graph(f"ring{n}", nx.cycle_graph(n))


def torus(rows: int, cols: int) -> Topology:
    _need("torus", "rows", rows)
    _need("torus", "cols", cols)
    g = nx.grid_2d_graph(rows, cols, periodic=True)
    g = nx.relabel_nodes(g, {(r, c): r * cols + c for r, c in g.nodes})
    return _from_graph(f"torus{rows}x{cols}", g)


def complete(n: int) -> Topology:
    _need("complete", "n", n)
    return _from_graph(f"complete{n}", nx.complete_graph(n))


def star(n: int) -> Topology:
    """n nodes in all: hub 0 and n-1 leaves."""
    _need("star", "n", n)
    return _from_graph(f"star{n}", nx.star_graph(n - 1))


def erdos_renyi(n: int, p: float, seed: int = 0) -> Topology:
    """G(n, p), re-drawn with seed+1, seed+2, ... until connected; the name records the seed used."""
    _need("erdos", "n", n)
    _need("erdos", "seed", seed, low=0)
    if not _is_num(p) or not 0 < p <= 1:
        raise TopologyError(f"erdos: p must be in (0, 1], got {p!r}")
    for s in range(seed, seed + MAX_ERDOS_TRIES):
        g = nx.gnp_random_graph(n, p, seed=s)
        if nx.is_connected(g):
            return _from_graph(f"erdos{n}-p{p:g}-s{s}", g)
    raise TopologyError(
        f"erdos: no connected G({n}, {p:g}) in {MAX_ERDOS_TRIES} seeds from {seed}; raise p"
    )


def exponential(n: int) -> Topology:
    """Node i linked to (i + 2^k) mod n for every 2^k < n (undirected)."""
    _need("exp", "n", n)
    g = nx.empty_graph(n)
    step = 1
    while step < n:
        g.add_edges_from((i, (i + step) % n) for i in range(n))
        step *= 2
    return _from_graph(f"exp{n}", g)


# kind -> (generator, argument names); erdos also takes p and seed.
GENERATORS: dict[str, tuple[Callable[..., Topology], tuple[str, ...]]] = {
    "ring": (ring, ("n",)),
    "torus": (torus, ("rows", "cols")),
    "complete": (complete, ("n",)),
    "star": (star, ("n",)),
    "erdos": (erdos_renyi, ("n", "p", "seed")),
    "exp": (exponential, ("n",)),
}
ALIASES = {"erdos_renyi": "erdos", "exponential": "exp", "cycle": "ring"}


def _coerce(kind: str, name: str, v: Any) -> Any:
    # CLI arguments arrive as strings; Python callers pass numbers.
    if isinstance(v, str):
        try:
            return float(v) if name == "p" else int(v)
        except ValueError:
            raise TopologyError(f"{kind}: {name} must be a number, got {v!r}") from None
    return v


def generate(kind: str, *args: Any, p: float | None = None, seed: int | None = None,
             link: Link | dict | None = None) -> Topology:
    """Build a topology by kind name: ring N | torus R C | complete N | star N | erdos N [P [SEED]] | exp N.

    `p`/`seed` may be given as keywords for erdos; `link` replaces the default link.
    """
    kind = ALIASES.get(kind, kind)
    if kind not in GENERATORS:
        raise TopologyError(f"unknown topology kind {kind!r} (known: {', '.join(GENERATORS)})")
    fn, names = GENERATORS[kind]
    vals = dict(zip(names, args))
    if len(args) > len(names):
        raise TopologyError(f"{kind}: too many arguments {list(args)} (takes {' '.join(names)})")
    for key, v in (("p", p), ("seed", seed)):
        if v is None:
            continue
        if key not in names:
            raise TopologyError(f"{kind}: takes no {key} (only erdos does)")
        if key in vals:
            raise TopologyError(f"{kind}: {key} given twice")
        vals[key] = v
    required = names[:2] if kind == "erdos" else names
    missing = [x for x in required if x not in vals]
    if missing:
        raise TopologyError(f"{kind}: missing {', '.join(missing)} (usage: {kind} {' '.join(names)})")
    t = fn(**{k: _coerce(kind, k, v) for k, v in vals.items()})
    if link is not None:
        entry = _link_to_dict(link) if isinstance(link, Link) else link
        t.links = {"default": _parse_link(entry, "default", Link())}
    return t


# At the end, not the top: topology.py imports this module at its own end (to re-export it), so whichever of them is
# imported first, what each takes from the others is defined by then.
from .topology import Link, Topology, TopologyError, _is_int, _is_num, _link_to_dict  # noqa: E402
from .topology_parse import _parse_link, from_dict  # noqa: E402
