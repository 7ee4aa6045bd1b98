"""Parsing and validation of a topology description (a topology file's JSON content, or the dict a generator
builds): `from_dict` checks every key, id, edge, weight and link setting, with one TopologyError line for the first
fault, and builds the Topology. Pure module, like topology.py, which re-exports `from_dict` and holds the classes.
"""
from __future__ import annotations

import math
import re
from dataclasses import replace
from typing import Any

import networkx as nx

TOL = 1e-6  # tolerance on row sums and symmetry of explicit weights
TOP_KEYS = ("name", "nodes", "edges", "weights", "links")
ID_LIMIT = 10**10  # node ids are below it: a plain-mode routing id holds at most 10 digits (PROTOCOL.md §13 item 12)


def from_dict(d: Any, source: str = "<topology>") -> Topology:
    """Validate a topology description (the JSON file's content) and build a Topology."""
    try:
        return _build(d)
    except TopologyError as e:
        raise TopologyError(f"{source}: {e}") from None


def _build(d: Any) -> Topology:
    if not isinstance(d, dict):
        raise TopologyError(f"topology must be a JSON object, got {type(d).__name__}")
    unknown = sorted(set(d) - set(TOP_KEYS), key=str)
    if unknown:
        raise TopologyError(f"unknown key {unknown[0]!r} (allowed: {', '.join(TOP_KEYS)})")
    for key in ("name", "nodes", "edges"):
        if key not in d:
            raise TopologyError(f"missing key {key!r}")
    if not isinstance(d["name"], str):
        raise TopologyError(f"'name' must be a string, got {type(d['name']).__name__}")
    nodes = _parse_nodes(d["nodes"])
    edges = _parse_edges(d["edges"], set(nodes))
    g = nx.Graph()
    g.add_nodes_from(nodes)
    g.add_edges_from(edges)
    _check_connected(g)
    scheme, weights = _parse_weights(d.get("weights", "metropolis"), g)
    links = _parse_links(d.get("links", {}), g)
    return Topology(d["name"], nodes, edges, weights, links, scheme)


def _parse_nodes(raw: Any) -> list[int]:
    if not isinstance(raw, list):
        raise TopologyError(f"'nodes' must be a list of integer ids, got {type(raw).__name__}")
    if not raw:
        raise TopologyError("'nodes' is empty")
    seen: set[int] = set()
    for x in raw:
        if not _is_int(x):
            raise TopologyError(f"node id {x!r} is not an integer")
        if x < 0:
            raise TopologyError(f"node id {x} is negative")
        if x >= ID_LIMIT:
            raise TopologyError(f"node id {x} is too large (ids must be below 10^10)")
        if x in seen:
            raise TopologyError(f"duplicate node id {x}")
        seen.add(x)
    return sorted(raw)


def _parse_edges(raw: Any, ids: set[int]) -> list[tuple[int, int]]:
    if not isinstance(raw, list):
        raise TopologyError(f"'edges' must be a list of [i, j] pairs, got {type(raw).__name__}")
    seen: set[tuple[int, int]] = set()
    for e in raw:
        if not (isinstance(e, (list, tuple)) and len(e) == 2 and all(map(_is_int, e))):
            raise TopologyError(f"edge {e!r} is not a pair of integer ids")
        i, j = e
        for x in (i, j):
            if x not in ids:
                raise TopologyError(f"edge [{i}, {j}] names unknown node {x}")
        if i == j:
            raise TopologyError(f"self-loop edge [{i}, {j}]")
        key = (min(i, j), max(i, j))
        if key in seen:
            raise TopologyError(f"duplicate edge [{i}, {j}]")
        seen.add(key)
    return sorted(seen)


def _check_connected(g: nx.Graph) -> None:
    comps = sorted((sorted(c) for c in nx.connected_components(g)), key=lambda c: c[0])
    if len(comps) > 1:
        listed = _join_and([_fmt_ids(c) for c in comps])
        raise TopologyError(f"graph is not connected (components: {listed})")


def _parse_id_key(k: Any, what: str) -> int:
    if _is_int(k):
        return k
    if isinstance(k, str) and re.fullmatch(r"[0-9]+", k):
        return int(k)
    raise TopologyError(f"{what}: key {k!r} is not a node id")


def _parse_weights(raw: Any, g: nx.Graph) -> tuple[str, dict[int, dict[int, float]]]:
    if raw == "metropolis":
        return "metropolis", metropolis_weights(g)
    if raw == "uniform":
        return "uniform", uniform_weights(g)
    if not isinstance(raw, dict):
        raise TopologyError(
            f"'weights' must be \"metropolis\", \"uniform\" or an object of rows, got {raw!r}"
        )
    rows: dict[int, dict[int, float]] = {}
    for k, row in raw.items():
        i = _parse_id_key(k, "weights")
        if i not in g:
            raise TopologyError(f"weights: row for unknown node {i}")
        if i in rows:
            raise TopologyError(f"weights: two rows for node {i}")
        rows[i] = _parse_weight_row(i, row, g)
    missing = sorted(set(g.nodes) - set(rows))
    if missing:
        raise TopologyError(f"weights: no row for node(s) {_fmt_ids(missing)}")
    _check_symmetric(rows)
    _check_mixing_connected(rows)
    return "explicit", dict(sorted(rows.items()))


def _check_mixing_connected(rows: dict[int, dict[int, float]]) -> None:
    # edges whose weight is 0 carry nothing: the nodes they alone join would never mix (spectral gap 0)
    g = nx.Graph()
    g.add_nodes_from(rows)
    g.add_edges_from((i, j) for i, row in rows.items() for j, w in row.items() if j != i and w > 0)
    comps = sorted((sorted(c) for c in nx.connected_components(g)), key=lambda c: (-len(c), c[0]))
    if len(comps) > 1:
        cut = _join_and([_fmt_ids(c) for c in comps[1:]])
        raise TopologyError(f"weights: the edges of positive weight leave {cut} cut off from {_fmt_ids(comps[0])} "
                            "(the models would never mix)")


def _parse_weight_row(i: int, row: Any, g: nx.Graph) -> dict[int, float]:
    if not isinstance(row, dict):
        raise TopologyError(f"weights: row {i} must be an object {{\"j\": w}}")
    # Every neighbour gets an entry (0 if absent) so rows are complete for gossip.
    out: dict[int, float] = {j: 0.0 for j in g.neighbors(i)}
    given: set[int] = set()
    for k, w in row.items():
        j = _parse_id_key(k, f"weights row {i}")
        if j in given:
            raise TopologyError(f"weights: w[{i}][{j}] given twice")
        given.add(j)
        if j != i and not g.has_edge(i, j):
            raise TopologyError(f"weights: w[{i}][{j}] is on a non-edge ({i}-{j} is not in 'edges')")
        if not _is_num(w):
            raise TopologyError(f"weights: w[{i}][{j}] = {w!r} is not a finite number")
        if w < 0:
            raise TopologyError(f"weights: w[{i}][{j}] = {w} is negative")
        out[j] = float(w)
    if i not in given:
        rest = 1.0 - math.fsum(v for j, v in out.items() if j != i)
        if rest < -TOL:
            raise TopologyError(
                f"weights: row {i} does not sum to 1 (neighbour weights alone sum to {1 - rest:.6g})"
            )
        out[i] = max(0.0, rest)
    total = math.fsum(out.values())
    if abs(total - 1.0) > TOL:
        raise TopologyError(f"weights: row {i} does not sum to 1 (sum is {total:.9g})")
    return dict(sorted(out.items()))


def _check_symmetric(rows: dict[int, dict[int, float]]) -> None:
    for i, row in sorted(rows.items()):
        for j, wij in row.items():
            wji = rows[j].get(i, 0.0)
            if abs(wij - wji) > TOL:
                raise TopologyError(
                    f"weights: matrix is not symmetric (w[{i}][{j}] = {wij:g} but w[{j}][{i}] = {wji:g})"
                )


def _parse_links(raw: Any, g: nx.Graph) -> dict[str, Link]:
    if not isinstance(raw, dict):
        raise TopologyError(f"'links' must be an object, got {type(raw).__name__}")
    default = _parse_link(raw.get("default", {}), "default", Link())
    links = {"default": default}
    for k, entry in raw.items():
        if k == "default":
            continue
        m = re.fullmatch(r"([0-9]+)-([0-9]+)", k) if isinstance(k, str) else None
        if not m:
            raise TopologyError(f"links: bad key {k!r} (expected \"default\" or \"i-j\")")
        i, j = int(m.group(1)), int(m.group(2))
        if not g.has_edge(i, j):
            raise TopologyError(f"links: {k!r} is not an edge")
        canon = _link_key(i, j)
        if canon in links:
            raise TopologyError(f"links: link {canon} is given twice")
        # Missing fields of an override inherit from "default".
        links[canon] = _parse_link(entry, k, default)
    return dict(sorted(links.items(), key=lambda kv: _link_sort_key(kv[0])))


def _link_sort_key(k: str) -> tuple[int, int]:
    if k == "default":
        return (-1, -1)
    i, j = k.split("-")
    return (int(i), int(j))


def _parse_link(entry: Any, key: str, base: Link) -> Link:
    where = f"links[{key!r}]"
    if not isinstance(entry, dict):
        raise TopologyError(f"{where} must be an object")
    unknown = sorted(set(entry) - set(LINK_KEYS), key=str)
    if unknown:
        raise TopologyError(f"{where}: unknown key {unknown[0]!r} (allowed: {', '.join(LINK_KEYS)})")
    vals: dict[str, Any] = {}
    for k, v in entry.items():
        if k == "bandwidth_mbps" and v is None:
            vals[k] = None
            continue
        if not _is_num(v):
            raise TopologyError(f"{where}: {k} = {v!r} is not a finite number")
        if v < 0:
            raise TopologyError(f"{where}: {k} = {v} is negative")
        if k == "bandwidth_mbps" and v == 0:
            raise TopologyError(f"{where}: bandwidth_mbps must be > 0 (null means unlimited)")
        vals[k] = float(v)
    return replace(base, **vals)



# At the end, not the top: topology.py imports this module at its own end (to re-export it), so whichever of the two
# is imported first, what each takes from the other is defined by then.
from .topology import (LINK_KEYS, Link, Topology, TopologyError, _fmt_ids, _is_int, _is_num, _join_and,  # noqa: E402
                       _link_key, metropolis_weights, uniform_weights)
