"""Topology files: who talks to whom, with which mixing weights, over which emulated links.

Pure module: no sockets, no processes. A topology is an undirected connected graph on integer
peer ids, a symmetric doubly stochastic mixing matrix W on it, and per-link emulation settings.
Every way of building one (file, dict, generator) goes through `from_dict`, so every Topology
in the program has been validated the same way.

This module holds the classes, the weight schemes, file loading and the reports; the parser (`from_dict`) is in
topology_parse.py and the generators in topology_gen.py. It re-exports both, so callers use `topology.X` for all.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import networkx as nx
import numpy as np

WEIGHT_SCHEMES = ("metropolis", "uniform")
LINK_KEYS = ("latency_ms", "bandwidth_mbps", "jitter_ms")


class TopologyError(ValueError):
    """A topology that cannot be used. The message is one line, prefixed with its source."""


@dataclass(frozen=True)
class Link:
    latency_ms: float = 0.0
    bandwidth_mbps: float | None = None  # None = unlimited
    jitter_ms: float = 0.0


@dataclass
class Topology:
    name: str
    nodes: list[int]  # sorted
    edges: list[tuple[int, int]]  # each undirected edge once, (min, max), sorted
    weights: dict[int, dict[int, float]]  # full row per node: self and every neighbour
    links: dict[str, Link]  # "default" plus canonical "i-j" (i < j) overrides, fully resolved
    weight_scheme: str = "explicit"  # "metropolis" | "uniform" | "explicit"; kept for to_dict
    _adj: dict[int, list[int]] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        adj: dict[int, list[int]] = {i: [] for i in self.nodes}
        for i, j in self.edges:
            adj[i].append(j)
            adj[j].append(i)
        self._adj = {i: sorted(js) for i, js in adj.items()}

    def _known(self, i: int) -> None:
        if i not in self._adj:
            raise TopologyError(f"{self.name}: unknown node {i!r}")

    def check_peer(self, i: int) -> None:
        """A user-given peer id that is not a node: one TopologyError line naming the nodes."""
        if i not in self._adj:
            raise TopologyError(f"peer id {i} is not in topology {self.name} (nodes {self.nodes[0]}..{self.nodes[-1]})")

    def neighbors(self, i: int) -> list[int]:
        self._known(i)
        return list(self._adj[i])

    def weight_row(self, i: int) -> dict[int, float]:
        self._known(i)
        return dict(self.weights[i])

    def link(self, i: int, j: int) -> Link:
        self._known(i)
        self._known(j)
        if j not in self._adj[i]:
            raise TopologyError(f"{self.name}: {i}-{j} is not an edge")
        return self.links.get(_link_key(i, j), self.links["default"])

    def matrix(self) -> np.ndarray:
        idx = {v: k for k, v in enumerate(self.nodes)}
        w = np.zeros((len(self.nodes), len(self.nodes)))
        for i, row in self.weights.items():
            for j, wij in row.items():
                w[idx[i], idx[j]] = wij
        return w

    def graph(self) -> nx.Graph:
        g = nx.Graph()
        g.add_nodes_from(self.nodes)
        g.add_edges_from(self.edges)
        return g

    def slem(self) -> float:
        # W is validated symmetric, so eigvalsh applies; the top eigenvalue is 1 (doubly
        # stochastic), and the rate of consensus is set by the largest modulus among the rest.
        if len(self.nodes) < 2:
            return 0.0
        mods = np.sort(np.abs(np.linalg.eigvalsh(self.matrix())))[::-1]
        return float(mods[1])

    def spectral_gap(self) -> float:
        return 1.0 - self.slem()

    def to_dict(self) -> dict:
        if self.weight_scheme in WEIGHT_SCHEMES:
            weights: Any = self.weight_scheme
        else:
            weights = {
                str(i): {str(j): w for j, w in row.items()} for i, row in self.weights.items()
            }
        return {
            "name": self.name,
            "nodes": list(self.nodes),
            "edges": [[i, j] for i, j in self.edges],
            "weights": weights,
            "links": {k: _link_to_dict(v) for k, v in self.links.items()},
        }

    def to_json(self) -> str:
        text = json.dumps(self.to_dict(), indent=2)
        # Keep lists of plain numbers on one line ("nodes", each edge) so files stay readable.
        # Literal newlines never occur inside JSON strings, so this cannot touch a name.
        num = r"-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?"
        text = re.sub(
            rf"\[\n\s*({num}(?:,\n\s*{num})*)\n\s*\]",
            lambda m: "[" + ", ".join(x.strip() for x in m.group(1).split(",")) + "]",
            text,
        )
        return text + "\n"


# --------------------------------------------------------------------------- helpers

def _link_key(i: int, j: int) -> str:
    return f"{min(i, j)}-{max(i, j)}"


def _num_out(x: float | None) -> float | int | None:
    # Write 0 rather than 0.0 so generated files read naturally; the value is unchanged.
    if x is not None and float(x).is_integer():
        return int(x)
    return x


def _link_to_dict(link: Link) -> dict:
    return {k: _num_out(getattr(link, k)) for k in LINK_KEYS}


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_num(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _fmt_ids(ids: Iterable[int]) -> str:
    return "[" + ", ".join(str(i) for i in sorted(ids)) + "]"


def _join_and(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


# --------------------------------------------------------------------------- weights

def metropolis_weights(g: nx.Graph) -> dict[int, dict[int, float]]:
    """Metropolis-Hastings: w_ij = 1/(1+max(deg_i, deg_j)), w_ii = 1 - sum of the others."""
    deg = dict(g.degree())
    w: dict[int, dict[int, float]] = {}
    for i in sorted(g.nodes):
        row = {j: 1.0 / (1 + max(deg[i], deg[j])) for j in sorted(g.neighbors(i))}
        w[i] = _with_self(i, row)
    return w


def uniform_weights(g: nx.Graph) -> dict[int, dict[int, float]]:
    """w_ij = 1/(1+max degree) on every edge, self takes the rest: symmetric, doubly stochastic."""
    dmax = max((d for _, d in g.degree()), default=0)
    w: dict[int, dict[int, float]] = {}
    for i in sorted(g.nodes):
        w[i] = _with_self(i, {j: 1.0 / (1 + dmax) for j in sorted(g.neighbors(i))})
    return w


def _with_self(i: int, row: dict[int, float]) -> dict[int, float]:
    # Clamp rounding noise so a self weight is never a tiny negative number.
    out = {i: max(0.0, 1.0 - math.fsum(row.values()))}
    out.update(row)
    return dict(sorted(out.items()))


# --------------------------------------------------------------------------- files

def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict:
    # json silently keeps the last duplicate key; in a weights row that hides a typo.
    out: dict = {}
    for k, v in pairs:
        if k in out:
            raise TopologyError(f"duplicate key {k!r} in a JSON object")
        out[k] = v
    return out


def load(path: str | Path) -> Topology:
    """Read and validate a topology file; every failure is a one-line TopologyError."""
    src = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise TopologyError(f"{src}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise TopologyError(f"{src}: cannot read: {e}") from None
    try:
        d = json.loads(text, object_pairs_hook=_no_duplicate_keys)
    except json.JSONDecodeError as e:
        raise TopologyError(f"{src}: invalid JSON: {e}") from None
    except TopologyError as e:
        raise TopologyError(f"{src}: {e}") from None
    return from_dict(d, source=src)


# --------------------------------------------------------------------------- reports and checks

def _fmt_link(link: Link) -> str:
    bw = "unlimited" if link.bandwidth_mbps is None else f"{link.bandwidth_mbps:g} Mbit/s"
    return f"latency {link.latency_ms:g} ms, bandwidth {bw}, jitter {link.jitter_ms:g} ms"


def summary(t: Topology) -> str:
    """Human-readable description for `deca-peer topology show`."""
    lines = [
        f"topology {t.name}: {len(t.nodes)} nodes, {len(t.edges)} edges, weights {t.weight_scheme}",
        f"edges: {' '.join(f'{i}-{j}' for i, j in t.edges) or '(none)'}",
    ]
    lines += [f"link {k}: {_fmt_link(v)}" for k, v in t.links.items()]
    lines.append("node  degree  weights (j: w_ij, self included)")
    for i in t.nodes:
        row = "  ".join(f"{j}: {w:.4f}" for j, w in t.weights[i].items())
        lines.append(f"{i:>4}  {len(t.neighbors(i)):>6}  {row}")
    lines.append(f"slem: {t.slem():.6f}")
    lines.append(f"spectral gap: {t.spectral_gap():.6f}")
    return "\n".join(lines)


def check_ids(t: Topology, ids: Iterable[int | str], what: str = "bootstrap file") -> None:
    """Raise unless `ids` (ints or digit strings, e.g. bootstrap keys) are exactly t's nodes."""
    got: set[int] = set()
    for x in ids:
        try:
            got.add(_parse_id_key(x, what))
        except TopologyError:
            raise TopologyError(f"{what}: {x!r} is not a node id") from None
    missing, extra = sorted(set(t.nodes) - got), sorted(got - set(t.nodes))
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing {_fmt_ids(missing)}")
        if extra:
            parts.append(f"extra {_fmt_ids(extra)}")
        raise TopologyError(
            f"{what} ids do not match topology {t.name!r}: {'; '.join(parts)}"
        )


# --------------------------------------------------------------------------- the parser and the generators
# Imported at the end: both import the classes and helpers above from here, so those must exist first.
from .topology_parse import ID_LIMIT, TOL, TOP_KEYS, _parse_id_key, from_dict  # noqa: E402,F401
from .topology_gen import (ALIASES, GENERATORS, MAX_ERDOS_TRIES, complete, erdos_renyi, exponential,  # noqa: E402,F401
                           generate, ring, star, torus)
