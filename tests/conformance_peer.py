"""An independent DP2P/2 peer, written from PROTOCOL.md alone: a pure-gossip peer that trains nothing.

It uses pyzmq, msgpack, numpy and the standard library only, and nothing of `deca_p2p` (tests/test_conformance.py
checks that by reading this file, and again at run time through ``sys.modules``). It reads the initial weights with a
hand-written safetensors reader and the model's ``config.json``, computes the configuration fingerprint (§6.1.1),
runs the hello barrier (§10.1), follows the schedule (§7: block order from the SHA-256 generator, exchange steps
with gossip_every and the last step of an activation), and at every exchange sends its current block (§8, §9.1),
collects its neighbours' blocks and mixes them with the topology's weights (§9.4); then it says bye (§10.4).
Section numbers are PROTOCOL.md's.

    python tests/conformance_peer.py --id 3 --topology topologies/ring4.json --base-port 5550 \\
        --model deca_p2p/base_model --rounds 2 --inner-steps 3 --gossip-every 2 --block-order random --seed 11 \\
        --codec int8 --out peer3.json

Exit 0 after a complete run (the JSON written to --out says what happened at every exchange), 2 on a handshake
failure (configuration mismatch, hello timeout).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import re
import struct
import sys
import time
from collections import Counter, deque

import msgpack
import numpy as np
import zmq

VERSION = 3
KINDS = ("hello", "block", "bye", "resync")
HEADER_KEYS = {"v", "kind", "src", "inc", "round", "block", "step", "codec", "full", "tensors", "stats"}
INT_KEYS = ("src", "inc", "round", "block", "step")
MAX_HEADER_BYTES = 65536
MAX_TENSORS = 4096
MAX_INT = 2**63 - 1
ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2, "int8": 1}
CODEC_DTYPES = {"raw": {"float32", "float16", "bfloat16"}, "bf16": {"bfloat16"}, "fp16": {"float16"},
                "int8": {"int8"}}
WINDOW = 4            # look-ahead: exchanges and messages per neighbour (§9.2)
HELLO_INTERVAL = 0.2  # §10.1
POLL = 0.25           # §9.3
AGREE = ("protocol", "algo", "comm", "lora_rank", "lora_alpha", "lora_targets", "embeddings_block", "head_block",
         "layers_per_block", "rounds", "inner_steps", "gossip_every", "block_order", "seed", "topology", "model",
         "blocks")
ROUTING_ID = re.compile(rb"peer-(0|[1-9][0-9]{0,9})")


class Drop(Exception):
    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


# ----------------------------------------------------------------------------------------- model and fingerprint

def read_safetensors(path: str) -> dict[str, np.ndarray]:
    """8-byte little-endian header length, a JSON header {name: {dtype, shape, data_offsets}}, raw LE tensors."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        data = f.read()
    out = {}
    for name, spec in header.items():
        if name == "__metadata__":
            continue
        start, end = spec["data_offsets"]
        raw = data[start:end]
        if spec["dtype"] == "F32":
            arr = np.frombuffer(raw, dtype="<f4")
        elif spec["dtype"] == "F16":
            arr = np.frombuffer(raw, dtype="<f2").astype(np.float32)
        elif spec["dtype"] == "BF16":
            arr = (np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16).view(np.float32)
        else:
            raise SystemExit(f"error: {name}: dtype {spec['dtype']} not supported here")
        out[name] = arr.astype(np.float32).reshape(spec["shape"])
    return out


def canonical(obj) -> bytes:
    """§6.1.1: JSON, no whitespace, keys sorted, ASCII (only strings, integers, lists and maps go in)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode("ascii")


def short_hash(obj, n: int = 12) -> str:
    return hashlib.sha256(canonical(obj)).hexdigest()[:n]


def numel(shape) -> int:
    k = 1
    for d in shape:
        k *= d
    return k


def load_topology(path: str):
    """nodes, edges, and the weight matrix {i: {j: w}} (self included), §9.4 and §6.1.1."""
    d = json.load(open(path))
    nodes = sorted(int(i) for i in d["nodes"])
    edges = sorted({(min(int(a), int(b)), max(int(a), int(b))) for a, b in d["edges"]})
    nbrs = {i: sorted({b for a, b in edges if a == i} | {a for a, b in edges if b == i}) for i in nodes}
    scheme = d.get("weights", "metropolis")
    w: dict[int, dict[int, float]] = {}
    for i in nodes:
        if scheme == "metropolis":
            row = {j: 1.0 / (1 + max(len(nbrs[i]), len(nbrs[j]))) for j in nbrs[i]}
        elif scheme == "uniform":
            dmax = max(len(v) for v in nbrs.values())
            row = {j: 1.0 / (1 + dmax) for j in nbrs[i]}
        else:
            given = {int(k): float(v) for k, v in scheme[str(i)].items()}
            row = {j: given.get(j, 0.0) for j in nbrs[i]}
            if i in given:
                row[i] = given[i]
        if i not in row:
            row[i] = max(0.0, 1.0 - math.fsum(v for j, v in row.items() if j != i))
        w[i] = dict(sorted(row.items()))
    return nodes, [list(e) for e in edges], nbrs, w


def partition(names: list[str], layer_prefix: str, n_layers: int) -> list[list[str]]:
    """The default DECA partition (§7.2): one block per decoder layer (no embeddings or head block)."""
    blocks = [[] for _ in range(n_layers)]
    for n in names:
        m = re.match(re.escape(layer_prefix) + r"\.(\d+)\.", n)
        if m:
            blocks[int(m.group(1))].append(n)
    return [sorted(b) for b in blocks]


def fingerprint(args, nodes, edges, weights, config: dict, shapes: dict, blocks) -> dict[str, str]:
    """§6.1.1, field by field."""
    def s(v):
        return ("true" if v else "false") if isinstance(v, bool) else str(v)

    text = {str(i): {str(j): "%.12f" % w for j, w in row.items()} for i, row in weights.items()}
    topo = f"{len(nodes)} nodes, {len(edges)} edges #{short_hash([nodes, edges, text])}"
    named = sorted([n, list(shp)] for n, shp in shapes.items())
    total = sum(numel(shp) for _, shp in named)
    parts = [str(config.get("model_type") or config["architectures"][0])[:40]]
    layers = config.get("num_hidden_layers", config.get("n_layer"))
    hidden = config.get("hidden_size", config.get("n_embd"))
    if layers is not None:
        parts.append(f"{layers} layers")
    if hidden is not None:
        parts.append(f"hidden {hidden}")
    parts.append(f"{total:,} params #{short_hash(named)}")
    layout = [sorted([n, list(shapes[n])] for n in b) for b in blocks]
    fp = {
        "protocol": str(VERSION), "algo": "deca", "comm": "gossip",
        "lora_rank": "n/a", "lora_alpha": "n/a", "lora_targets": "n/a",
        "embeddings_block": "false", "head_block": "false", "layers_per_block": "1",
        "rounds": s(args.rounds), "inner_steps": s(args.inner_steps), "gossip_every": s(args.gossip_every),
        "block_order": args.block_order, "seed": s(args.seed) if args.block_order == "random" else "n/a",
        "topology": topo, "model": ", ".join(parts),
        "blocks": f"{len(blocks)} blocks, {sum(numel(shp) for b in layout for _, shp in b):,} params "
                  f"#{short_hash(layout)}",
    }
    assert tuple(fp) == AGREE
    return {"digest": short_hash(fp, 16), **fp, "local.codec": args.codec}


# ------------------------------------------------------------------------------------------------------ schedule

def block_order(n_blocks: int, order: str, r: int, seed: int) -> list[int]:
    """§7.3."""
    if order == "ascending":
        return list(range(n_blocks))
    if order == "descending":
        return list(range(n_blocks - 1, -1, -1))
    key = {i: hashlib.sha256(f"deca-p2p/order/{seed}/{r}/{i}".encode("utf-8")).digest() for i in range(n_blocks)}
    return sorted(range(n_blocks), key=lambda i: (key[i], i))


class Schedule:
    """§7.1-7.5."""

    def __init__(self, n_blocks, rounds, inner_steps, gossip_every, order, seed):
        self.B, self.T, self.R, self.c = n_blocks, rounds, inner_steps, gossip_every
        self.orders = [block_order(n_blocks, order, r, seed) for r in range(rounds)]
        self.E = sum(1 for s in range(inner_steps) if self.is_exchange(s))

    def is_exchange(self, s: int) -> bool:
        return (s + 1) % self.c == 0 or s == self.R - 1

    def activations(self):
        return [(r, b) for r in range(self.T) for b in self.orders[r]]

    def seq(self, r: int, b: int, s: int):
        if not (0 <= r < self.T and 0 <= b < self.B and 0 <= s < self.R) or not self.is_exchange(s):
            return None
        pos = r * self.B + self.orders[r].index(b)
        return pos * self.E + s // self.c


# ----------------------------------------------------------------------------------------------------- messages

def pack(header: dict, payloads=()) -> list[bytes]:
    return [msgpack.packb(header, use_bin_type=True), *payloads]


def to_f32(dtype: str, payload: bytes, shape) -> np.ndarray:
    if dtype == "float32":
        return np.frombuffer(payload, dtype="<f4").reshape(shape).astype(np.float32)
    if dtype == "float16":
        return np.frombuffer(payload, dtype="<f2").astype(np.float32).reshape(shape)
    if dtype == "bfloat16":
        return (np.frombuffer(payload, dtype="<u2").astype(np.uint32) << 16).view(np.float32).reshape(shape)
    raise Drop("dtype")


def decode(frames: list[bytes]) -> dict:
    """Validate and decode one message (§5.2-5.6, checks 2-24); raises Drop(reason)."""
    if not 1 <= len(frames) <= MAX_TENSORS + 1:
        raise Drop("frames")
    if len(frames[0]) > MAX_HEADER_BYTES:
        raise Drop("header_size")
    try:
        h = msgpack.unpackb(frames[0], raw=False, strict_map_key=True, max_array_len=MAX_TENSORS, max_map_len=256,
                            max_ext_len=0, max_str_len=MAX_HEADER_BYTES, max_bin_len=MAX_HEADER_BYTES)
    except Exception:
        raise Drop("msgpack") from None
    if type(h) is not dict or type(h.get("v")) is not int:
        raise Drop("schema")
    if h["v"] != VERSION:
        raise Drop("version")
    if set(h) != HEADER_KEYS and set(h) != HEADER_KEYS | {"cfg"}:
        raise Drop("schema")
    if type(h["kind"]) is not str:
        raise Drop("schema")
    if h["kind"] not in KINDS:
        raise Drop("kind")
    if "cfg" in h and (h["kind"] != "hello" or type(h["cfg"]) is not dict or len(h["cfg"]) > 64 or not all(
            type(k) is str and 0 < len(k) <= 64 and type(v) is str and len(v) <= 256 for k, v in h["cfg"].items())):
        raise Drop("schema")
    if any(type(h[k]) is not int or not 0 <= h[k] <= MAX_INT for k in INT_KEYS):
        raise Drop("schema")
    if h["codec"] not in CODEC_DTYPES:
        raise Drop("codec")
    if type(h["full"]) is not bool or type(h["stats"]) is not dict or len(h["stats"]) > 256:
        raise Drop("schema")
    for k, v in h["stats"].items():
        if type(k) is not str or not 0 < len(k) <= 128 or type(v) not in (int, float):
            raise Drop("schema")
        if not math.isfinite(v):
            raise Drop("non_finite")
    if type(h["tensors"]) is not list or (h["tensors"] and h["kind"] != "block"):
        raise Drop("schema")
    specs, seen = [], set()
    for t in h["tensors"]:
        extra = {"scale"} if h["codec"] == "int8" else set()
        if type(t) is not dict or set(t) != {"name", "dtype", "shape", "nbytes"} | extra:
            raise Drop("schema")
        if type(t["name"]) is not str or not 0 < len(t["name"]) <= 512:
            raise Drop("names")
        if t["dtype"] not in ITEMSIZE or t["dtype"] not in CODEC_DTYPES[h["codec"]]:
            raise Drop("dtype")
        shape = t["shape"]
        if type(shape) is not list or len(shape) > 32 or any(type(d) is not int or not 0 <= d <= 2**40 for d in shape):
            raise Drop("shape")
        if numel([max(d, 1) for d in shape]) > 2**48:
            raise Drop("shape")
        if type(t["nbytes"]) is not int or t["nbytes"] != numel(shape) * ITEMSIZE[t["dtype"]]:
            raise Drop("nbytes")
        if extra:
            if type(t["scale"]) is not float:
                raise Drop("codec")
            if not math.isfinite(t["scale"]):
                raise Drop("non_finite")
            if t["scale"] < 0:
                raise Drop("codec")
        if t["name"] in seen:
            raise Drop("names")
        seen.add(t["name"])
        specs.append(t)
    if len(frames) - 1 != len(specs):
        raise Drop("frames")
    tensors = {}
    for t, payload in zip(specs, frames[1:]):
        if len(payload) != t["nbytes"]:
            raise Drop("nbytes")
    for t, payload in zip(specs, frames[1:]):
        if t["dtype"] == "int8":  # §8.4: float32(q) x float32(scale), one binary32 multiplication
            x = np.frombuffer(payload, dtype=np.int8).astype(np.float32).reshape(t["shape"]) * np.float32(t["scale"])
        else:
            x = to_f32(t["dtype"], payload, t["shape"])
        if not np.isfinite(x).all():
            raise Drop("non_finite")
        tensors[t["name"]] = x
    return {**{k: h[k] for k in HEADER_KEYS if k != "tensors"}, "cfg": h.get("cfg"), "tensors": tensors}


def encode_tensor(x: np.ndarray, codec: str) -> tuple[dict, bytes, np.ndarray]:
    """(descriptor without name, payload, what every receiver decodes) for one float32 tensor (§8.4)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if codec == "raw":
        return {"dtype": "float32", "shape": list(x.shape), "nbytes": x.nbytes}, x.astype("<f4").tobytes(), x.copy()
    if codec != "int8":
        raise SystemExit(f"error: this peer sends raw or int8, not {codec}")
    scale = np.float32(0.0)
    if x.size:
        absmax = max(np.float32(x.max()), np.float32(-x.min()))
        scale = np.float32(absmax / np.float32(127.0))
        with np.errstate(over="ignore"):
            if not np.isfinite(scale * np.float32(127.0)):
                scale = np.nextafter(scale, np.float32(0.0), dtype=np.float32)
    if scale == 0:
        q = np.zeros(x.shape, dtype=np.int8)
    else:
        q = np.clip(np.rint(x / scale), -127, 127).astype(np.int8)  # rint: round half to even
    desc = {"dtype": "int8", "shape": list(x.shape), "nbytes": q.nbytes, "scale": float(scale)}
    return desc, q.tobytes(), q.astype(np.float32) * scale


# --------------------------------------------------------------------------------------------------------- peer

class Peer:
    def __init__(self, args):
        self.args = args
        self.me = args.id
        nodes, edges, nbrs, weights = load_topology(args.topology)
        self.nbrs = nbrs[self.me]
        self.row = weights[self.me]
        config = json.load(open(os.path.join(args.model, "config.json")))
        self.weights = read_safetensors(os.path.join(args.model, "model.safetensors"))
        shapes = {n: tuple(a.shape) for n, a in self.weights.items()}
        self.blocks = partition(list(self.weights), args.layer_prefix, config.get("num_hidden_layers"))
        self.shapes = shapes
        self.cfg = fingerprint(args, nodes, edges, weights, config, shapes, self.blocks)
        self.sched = Schedule(len(self.blocks), args.rounds, args.inner_steps, args.gossip_every, args.block_order,
                              args.seed)
        self.inc = time.time_ns() & 0x7FFFFFFF
        largest = max(sum(numel(shapes[n]) for n in b) for b in self.blocks)
        self.max_payload = 4 * largest
        self.ctx = zmq.Context()
        self.router = self.ctx.socket(zmq.ROUTER)
        self.router.setsockopt(zmq.LINGER, 0)
        # §4.4 (wire): a reconnecting neighbour presents its routing id again and must take it over; without
        # this, its new connection is refused while libzmq still holds the old one, and nothing of it arrives
        self.router.setsockopt(zmq.ROUTER_HANDOVER, 1)
        self.router.setsockopt(zmq.MAXMSGSIZE, self.max_payload + (1 << 20))
        self.router.bind(f"tcp://127.0.0.1:{args.base_port + self.me}")
        self.dealers = {}
        for j in self.nbrs:
            d = self.ctx.socket(zmq.DEALER)
            d.setsockopt(zmq.ROUTING_ID, f"peer-{self.me}".encode())  # §4.3, plain mode
            d.setsockopt(zmq.IMMEDIATE, 1)
            d.setsockopt(zmq.SNDHWM, 4)
            d.setsockopt(zmq.LINGER, 2000)
            d.connect(f"tcp://127.0.0.1:{args.base_port + j}")
            self.dealers[j] = d
        # protocol state (§6.5, §8.3, §9.2-9.3)
        self.copies: dict[int, dict | None] = {j: None for j in self.nbrs}
        self.last_seq: dict[int, int | None] = {j: None for j in self.nbrs}
        self.peer_inc: dict[int, int] = {}
        self.pending: dict[int, dict[int, dict]] = {j: {} for j in self.nbrs}
        self.gone: set[int] = set()
        self.suspect: set[int] = set()
        self.unusable: set[int] = set()
        self.answered: set[tuple[int, int]] = set()
        self.refused: set[tuple[int, int]] = set()  # (neighbour, inc) whose hello carried another configuration
        self.full_to: set[int] = set()
        self.kept: deque = deque()
        self.position: int | None = None
        self.act_start = 0
        self.dropped: Counter = Counter()
        self.late = 0
        self.received = Counter()  # (kind, full) of valid messages, for the report
        self.exchanges: list[dict] = []

    # -- sockets
    def send(self, j: int, frames, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.dealers[j].send_multipart(frames, flags=zmq.NOBLOCK, copy=True)
                return True
            except zmq.Again:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self.dealers[j].poll(int(min(left, 0.05) * 1000) + 1, zmq.POLLOUT)

    def recv(self, timeout: float):
        if self.kept:
            return self.kept.popleft()
        return self.recv_socket(timeout)

    def recv_socket(self, timeout: float):
        """The next message from the ROUTER itself (the barrier reads here: what it keeps must not come back
        to it before the socket is read, or a kept block would hide a hello queued behind it)."""
        if not self.router.poll(max(0, int(timeout * 1000)), zmq.POLLIN):
            return None
        parts = self.router.recv_multipart()
        m = ROUTING_ID.fullmatch(parts[0])
        frames = parts[1:]
        if frames and len(frames[0]) == 9 and frames[0][0] == 0xC1:
            frames = frames[1:]  # an emulated link's stamp (§4.5): this peer emulates nothing, so it takes it now
        return (int(m.group(1)) if m else None), frames

    def hello(self, stats=None) -> list[bytes]:
        return pack({"v": VERSION, "kind": "hello", "src": self.me, "inc": self.inc, "round": 0, "block": 0, "step": 0,
                     "codec": "raw", "full": False, "tensors": [], "stats": stats or {}, "cfg": self.cfg})

    def control(self, kind: str) -> list[bytes]:
        return pack({"v": VERSION, "kind": kind, "src": self.me, "inc": self.inc, "round": 0, "block": 0, "step": 0,
                     "codec": "raw", "full": False, "tensors": [], "stats": {}})

    def answer(self, src: int, inc: int) -> None:
        """§6.1: the first hello of each (neighbour, inc) is answered with one hello, at any time."""
        if (src, inc) not in self.answered:
            self.answered.add((src, inc))
            self.send(src, self.hello(), 10.0)

    def differs(self, theirs: dict):
        for k in [k for k in self.cfg if k != "digest" and not k.startswith("local.")] + \
                 [k for k in theirs if k != "digest" and not k.startswith("local.") and k not in self.cfg]:
            if self.cfg.get(k, "absent") != theirs.get(k, "absent"):
                return k, self.cfg.get(k, "absent"), theirs.get(k, "absent")
        return None

    # -- §10.1
    def barrier(self, timeout: float) -> None:
        heard, accepted = set(), set()
        deadline = time.monotonic() + timeout
        next_tx = 0.0
        while not (heard >= set(self.nbrs) and accepted >= set(self.nbrs)):
            now = time.monotonic()
            if now > deadline:
                raise SystemExit(f"error: peer {self.me}: hello barrier timed out: no answer from "
                                 f"{sorted(set(self.nbrs) - heard) or sorted(set(self.nbrs) - accepted)}")
            if now >= next_tx:
                for j in self.nbrs:
                    if (j not in heard or j not in accepted) and self.send(j, self.hello(), 0.0):
                        accepted.add(j)
                next_tx = now + HELLO_INTERVAL
            got = self.recv_socket(min(0.05, max(0.0, next_tx - time.monotonic())))
            if got is None:
                continue
            src, frames = got
            if src not in self.dealers:
                continue
            try:
                msg = decode(frames)
            except Drop:
                self.kept.append(got)
                continue
            if msg["src"] == src and msg["kind"] == "hello":
                self.answer(src, msg["inc"])
                if msg["cfg"] is not None:
                    diff = self.differs(msg["cfg"])
                    if diff is not None:
                        raise SystemExit(f"error: peer {self.me}: configuration differs from neighbour {src} in "
                                         f"{diff[0]} ({diff[1]} vs {diff[2]})")
                    heard.add(src)
                if "seq" in msg["stats"]:
                    self.kept.append(got)
                continue
            self.kept.append(got)

    # -- §6, §8.3, §9.2
    def handle(self, src, frames, seq=None, arrived=None) -> None:
        if src not in self.dealers:
            return self.drop("unknown_sender")
        try:
            msg = decode(frames)
        except Drop as e:
            return self.drop(e.reason)
        if msg["src"] != src:
            return self.drop("spoofed_src")
        if msg["kind"] == "hello":
            self.answer(src, msg["inc"])  # always: a restarted neighbour with another configuration learns it
            if msg["cfg"] is not None and self.differs(msg["cfg"]) is not None:
                self.refused.add((src, msg["inc"]))
        if (src, msg["inc"]) in self.refused:  # §6.1: every message of that incarnation is dropped
            return self.drop("config")
        self.received[(msg["kind"], msg["full"])] += 1
        if self.peer_inc.get(src, msg["inc"]) != msg["inc"]:  # a restart (§6.5)
            self.copies[src] = None
            self.last_seq[src] = None
            self.pending[src].clear()
            self.full_to.add(src)
            if arrived is not None:
                arrived.discard(src)
            if self.position is not None:
                self.send(src, self.hello({"seq": float(self.position)}), 10.0)
        self.peer_inc[src] = msg["inc"]
        kind = msg["kind"]
        if kind == "hello":
            self.gone.discard(src)
            self.suspect.discard(src)
            return
        if kind == "bye":
            self.gone.add(src)
            return
        if kind == "resync":
            self.full_to.add(src)
            return
        self.gone.discard(src)
        m = self.sched.seq(msg["round"], msg["block"], msg["step"])
        if m is None:
            return self.drop("position")
        names = self.blocks[msg["block"]]
        if set(msg["tensors"]) != set(names):
            return self.drop("names")
        if any(msg["tensors"][n].shape != self.shapes[n] for n in names):
            return self.drop("shape")
        if seq is not None and m > seq:
            if m - seq > WINDOW or len(self.pending[src]) >= WINDOW:
                return self.drop("too_far_ahead")
            self.pending[src][m] = msg
            self.suspect.discard(src)
            return
        if m < self.act_start:
            return self.drop("stale")
        self.take(src, msg, m, seq, arrived)

    def take(self, j, msg, m, seq, arrived) -> None:
        if msg["codec"] == "raw" and not msg["full"]:
            return self.drop("raw_delta")  # §8: a lossless block is always whole
        if not msg["full"] and self.last_seq[j] != m - 1:
            self.drop("chain_gap")
            self.send(j, self.control("resync"), 10.0)
            if m == seq:
                self.unusable.add(j)
            return
        if msg["full"]:
            self.copies[j] = {k: v.copy() for k, v in msg["tensors"].items()}
        else:
            if self.copies[j] is None:
                return self.drop("no_base")
            for k, v in msg["tensors"].items():
                self.copies[j][k] = self.copies[j][k] + v  # float32 + float32
        self.last_seq[j] = m
        self.suspect.discard(j)
        if m == seq and arrived is not None:
            arrived.add(j)
        else:
            self.late += 1

    def drop(self, reason: str) -> None:
        self.dropped[reason] += 1

    # -- §9
    def exchange(self, r: int, b: int, s: int, theta: dict, own: dict | None) -> tuple[dict, dict]:
        seq = self.sched.seq(r, b, s)
        self.position = seq
        full_all = own is None or self.args.codec == "raw"  # §8.1: raw sends θ½ itself, whole, every time
        repair, self.full_to = (set() if full_all else self.full_to - self.gone), set()
        x = theta if full_all else {k: theta[k] - own[k] for k in theta}  # θ½ − θ̂ in float32
        entries, payloads, decoded = [], [], {}
        for name in sorted(x):
            desc, payload, dec = encode_tensor(x[name], self.args.codec)
            entries.append({"name": name, **desc})
            payloads.append(payload)
            decoded[name] = dec
        own = decoded if full_all else {k: own[k] + decoded[k] for k in own}  # the sender's θ̂ advances exactly so
        head = {"v": VERSION, "kind": "block", "src": self.me, "inc": self.inc, "round": r, "block": b, "step": s,
                "full": full_all, "stats": {"sent_at": time.time()}}
        frames = pack({**head, "codec": self.args.codec, "tensors": entries}, payloads)
        repaired = None
        if repair:  # §8.2: full to these links only, as our new public copy itself, raw float32
            rep = [encode_tensor(own[n], "raw") for n in sorted(own)]
            repaired = pack({**head, "full": True, "codec": "raw",
                             "tensors": [{"name": n, **d} for n, (d, _, _) in zip(sorted(own), rep)]},
                            [p for _, p, _ in rep])
        for j in self.nbrs:
            if j not in self.gone:
                self.send(j, repaired if j in repair else frames, min(10.0, self.args.exchange_timeout))
        arrived: set[int] = set()
        self.unusable = set()
        deadline = time.monotonic() + self.args.exchange_timeout
        for j in self.nbrs:
            for k in [k for k in self.pending[j] if k < seq]:
                del self.pending[j][k]
        while True:
            for j in self.nbrs:
                if j not in arrived and seq in self.pending[j]:
                    msg = self.pending[j].pop(seq)
                    self.take(j, msg, seq, seq, arrived)
            waiting = [j for j in self.nbrs if j not in arrived and j not in self.gone and j not in self.suspect
                       and j not in self.unusable]
            left = deadline - time.monotonic()
            if not waiting or left <= 0:
                got = self.recv(0)
                if got is not None:
                    self.handle(*got, seq=seq, arrived=arrived)
                    continue
                if left <= 0:
                    self.suspect.update(waiting)
                break
            got = self.recv(min(left, POLL))
            if got is not None:
                self.handle(*got, seq=seq, arrived=arrived)
        # §9.4: float64, neighbours in ascending id order, own θ½ last with the self weight 1 − Σ
        present = sorted(arrived)
        w_self = 1.0 - sum(self.row[j] for j in present)
        mixed = {}
        for k, v in theta.items():
            acc = np.zeros(v.shape, dtype=np.float64)
            for j in present:
                acc += self.row[j] * self.copies[j][k].astype(np.float64)
            acc += w_self * v.astype(np.float64)
            mixed[k] = acc.astype(np.float32)
        self.exchanges.append({"seq": seq, "round": r, "block": b, "step": s, "full": full_all,
                               "repaired": sorted(repair), "arrived": present,
                               "missing": [j for j in self.nbrs if j not in arrived]})
        return mixed, own

    def run(self) -> None:
        self.barrier(self.args.hello_timeout)
        print(f"peer {self.me} (independent): barrier done, digest {self.cfg['digest']}", flush=True)
        E = self.sched.E
        for a, (r, b) in enumerate(self.sched.activations()):
            self.act_start = a * E
            theta = {n: self.weights[n] for n in self.blocks[b]}  # a pure-gossip peer: θ½ is its current block
            own = None  # our public copy θ̂: reset at every activation (first block full)
            for s in range(self.args.inner_steps):
                if self.sched.is_exchange(s):
                    theta, own = self.exchange(r, b, s, theta, own)
            self.weights.update(theta)
        self.finish(self.args.exchange_timeout)

    def finish(self, timeout: float) -> None:
        """§10.4: bye, then read until every neighbour said bye (bounded)."""
        for j in self.nbrs:
            if j not in self.gone:
                self.send(j, self.control("bye"), 5.0)
        deadline = time.monotonic() + timeout
        while any(j not in self.gone for j in self.nbrs) and time.monotonic() < deadline:
            got = self.recv(min(POLL, max(0.0, deadline - time.monotonic())))
            if got is not None:
                self.handle(*got)

    def close(self) -> None:
        for d in self.dealers.values():
            d.close(linger=2000)
        self.router.close(linger=0)
        self.ctx.term()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--id", type=int, required=True)
    p.add_argument("--topology", required=True)
    p.add_argument("--base-port", type=int, required=True)
    p.add_argument("--model", required=True, help="a directory with config.json and model.safetensors")
    p.add_argument("--layer-prefix", default="model.layers")
    p.add_argument("--rounds", type=int, required=True)
    p.add_argument("--inner-steps", type=int, required=True)
    p.add_argument("--gossip-every", type=int, default=1)
    p.add_argument("--block-order", default="ascending", choices=("ascending", "descending", "random"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--codec", default="raw", choices=("raw", "int8"))
    p.add_argument("--exchange-timeout", type=float, default=60.0)
    p.add_argument("--hello-timeout", type=float, default=60.0)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    peer = Peer(args)
    try:
        peer.run()
    finally:
        peer.close()
    with open(args.out, "w") as f:
        json.dump({"digest": peer.cfg["digest"], "cfg": peer.cfg, "orders": peer.sched.orders,
                   "exchanges": peer.exchanges, "dropped": dict(peer.dropped), "late": peer.late,
                   "received": {f"{k}{'/full' if full else ''}": n for (k, full), n in peer.received.items()},
                   "final_block_sums": {str(b): float(sum(np.abs(peer.weights[n]).sum() for n in names))
                                        for b, names in enumerate(peer.blocks)},
                   "deca_p2p_loaded": sorted(m for m in sys.modules if m.split(".")[0] == "deca_p2p")}, f, indent=1)
    print(f"peer {peer.me} (independent): done, {len(peer.exchanges)} exchanges", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
