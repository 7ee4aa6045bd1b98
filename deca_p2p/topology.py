"""Topology files: who talks to whom, with which mixing weights, over which emulated links.

Pure module: no sockets, no processes. A topology is an undirected connected graph on integer
peer ids, a symmetric doubly stochastic mixing matrix W on it, and per-link emulation settings.
Every way of building one (file, dict, generator) goes through `from_dict`, so every Topology
in the program has been validated the same way.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterable

import networkx as nx
import numpy as np

TOL = 1e-6  # tolerance on row sums and symmetry of explicit weights
WEIGHT_SCHEMES = ("metropolis", "uniform")
LINK_KEYS = ("latency_ms", "bandwidth_mbps", "jitter_ms")
TOP_KEYS = ("name", "nodes", "edges", "weights", "links")
MAX_ERDOS_TRIES = 1000
ID_LIMIT = 10**10  # node ids are below it: a plain-mode routing id holds at most 10 digits (PROTOCOL.md §13 item 12)


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


# --------------------------------------------------------------------------- validation

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


# --------------------------------------------------------------------------- generators

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
