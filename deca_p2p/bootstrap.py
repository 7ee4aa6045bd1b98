"""Bootstrap files: where each peer listens (and, with --secure, its public key). They replace a server.

Format (DESIGN §4): {"peers": {"<id>": {"endpoint": "tcp://host:port", "public_key": "<z85>"?}}}.
Without a file, peer i listens on tcp://127.0.0.1:(base_port + i).

``make`` builds a file for a topology (``deca-peer bootstrap --topology T --hosts ...``); ``update`` edits one in
place (``deca-peer bootstrap --file F --set-key I=KEY --endpoint I=tcp://host:port``), atomically.
"""
from __future__ import annotations

import json
import re
import stat
from pathlib import Path
from typing import Iterable, Sequence

from . import atomic

_ENDPOINT = re.compile(r"tcp://(\[[0-9a-fA-F:]+\]|[A-Za-z0-9.\-]+):([0-9]{1,5})")


class BootstrapError(ValueError):
    """A bad bootstrap file or host list; the message is one line naming the cause."""


def default_endpoints(ids: Iterable[int], base_port: int, host: str = "127.0.0.1") -> dict[int, str]:
    """Peer i at base_port + i; BootstrapError when the largest id's port is past 65535 (before any peer binds)."""
    ids = [int(i) for i in ids]
    if ids and base_port + max(ids) > 65535:
        raise BootstrapError(f"--base-port {base_port} puts peer {max(ids)} on port {base_port + max(ids)}, past 65535: "
                             f"use at most {65535 - max(ids)}")
    return {i: f"tcp://{host}:{base_port + i}" for i in ids}


def load(path: str | Path) -> dict[int, dict]:
    """{peer id: {"endpoint": ..., "public_key"?: ...}}, validated."""
    p = Path(path)
    if not p.is_file():
        raise BootstrapError(f"bootstrap file {p} does not exist")
    try:
        data = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BootstrapError(f"{p}: not valid JSON ({e})") from None
    except OSError as e:
        raise BootstrapError(f"cannot read bootstrap file {p}: {e.strerror}") from None
    return _validate(data, p)


def check_endpoint(endpoint: object, where: str) -> str:
    """``endpoint`` if it is ``tcp://host:port`` with a valid port, else BootstrapError naming ``where``."""
    m = _ENDPOINT.fullmatch(endpoint) if isinstance(endpoint, str) else None
    if not m or not 0 < int(m.group(2)) < 65536:
        raise BootstrapError(f"{where}: endpoint {endpoint!r} is not tcp://host:port")
    return endpoint


def _validate(data: object, p: Path) -> dict[int, dict]:
    if not isinstance(data, dict) or not isinstance(data.get("peers"), dict) or not data["peers"]:
        raise BootstrapError(f'{p}: expected {{"peers": {{"<id>": {{"endpoint": "tcp://host:port"}}}}}}')
    out: dict[int, dict] = {}
    for key, entry in data["peers"].items():
        if not (str(key).isascii() and str(key).isdigit()):  # "²".isdigit(), but int("²") fails
            raise BootstrapError(f"{p}: peer id {key!r} is not a non-negative integer")
        if not isinstance(entry, dict) or not isinstance(entry.get("endpoint"), str):
            raise BootstrapError(f"{p}: peer {key}: missing string 'endpoint'")
        check_endpoint(entry["endpoint"], f"{p}: peer {key}")
        if int(key) in out:
            raise BootstrapError(f"{p}: peer {int(key)} is given more than once")
        unknown = set(entry) - {"endpoint", "public_key"}
        if unknown:
            raise BootstrapError(f"{p}: peer {key}: unknown key(s) {', '.join(sorted(unknown))}")
        out[int(key)] = dict(entry)
    endpoints = [e["endpoint"] for e in out.values()]
    dup = {e for e in endpoints if endpoints.count(e) > 1}
    if dup:
        raise BootstrapError(f"{p}: endpoint {sorted(dup)[0]} is given to more than one peer")
    return out


def update(path: str | Path, public_keys: dict[int, str] | None = None,
           endpoints: dict[int, str] | None = None) -> dict[int, dict]:
    """Set peers' ``public_key`` and/or ``endpoint`` in the existing bootstrap file ``path``, in place.

    Other peers, other fields and other top-level keys are kept.  A peer without an entry gets one only if
    ``endpoints`` names it (a key alone does not say where the peer listens).  ``public_keys`` must already be
    checked (``keys.check_public_key``); two peers may not end up with the same key.  The new file is validated
    as ``load`` would, then written through a temp file and renamed over the old one (same permissions), so
    readers see the old file or the new one, never a torn one.  Returns the new entries.
    """
    p = Path(path)
    if not p.exists():
        raise BootstrapError(f"bootstrap file {p} does not exist "
                             "(make it with `deca-peer bootstrap --topology T --hosts H > FILE`)")
    load(p)  # the file as it is must be valid: never rewrite (and lose) something we cannot read
    doc = json.loads(p.read_text())
    peers: dict = doc["peers"]
    by_id = {int(k): k for k in peers}
    for i, ep in sorted((endpoints or {}).items()):
        if i < 0:
            raise BootstrapError(f"peer id {i} is negative")
        check_endpoint(ep, f"peer {i}")
        if i in by_id:
            peers[by_id[i]]["endpoint"] = ep
        else:
            peers[str(i)] = {"endpoint": ep}
            by_id[i] = str(i)
    for i, key in sorted((public_keys or {}).items()):
        if i not in by_id:
            raise BootstrapError(f"bootstrap file {p} has no peer {i}: give its endpoint too to add it "
                                 f"(--endpoint {i}=tcp://host:port)")
        peers[by_id[i]]["public_key"] = key
    owner: dict[str, int] = {}
    for i, k in sorted(by_id.items()):
        key = peers[k].get("public_key")
        if key is None:
            continue
        if key in owner:
            raise BootstrapError(f"peers {owner[key]} and {i} would have the same public_key "
                                 "(each peer needs its own keypair: `deca-peer keys --id I` on its machine)")
        owner[key] = i
    doc["peers"] = {k: peers[k] for _, k in sorted(by_id.items())}
    entries = _validate(doc, p)
    _replace_text(p, json.dumps(doc, indent=2) + "\n")
    return entries


def _replace_text(p: Path, text: str) -> None:
    """Write ``text`` over ``p`` atomically (temp file in the same directory, fsync, rename), keeping p's mode."""
    try:
        mode = stat.S_IMODE(p.stat().st_mode)
    except OSError:
        mode = 0o644
    p = p.resolve()  # a symlinked bootstrap file stays a symlink: its target is what gets replaced
    try:
        atomic.write_text(p, text, mode)
    except OSError as e:
        raise BootstrapError(f"cannot write bootstrap file {p}: {e.strerror}") from None


def endpoints(entries: dict[int, dict]) -> dict[int, str]:
    return {i: e["endpoint"] for i, e in entries.items()}


def make(ids: Sequence[int], hosts: Sequence[str], base_port: int) -> dict:
    """Peers assigned to hosts round-robin; peers sharing a host get consecutive ports from base_port.

    Every endpoint passes ``check_endpoint``, as ``load`` will check it: nothing is made that cannot be read back.
    """
    if not hosts:
        raise BootstrapError("give at least one host")
    if not 0 < base_port < 65536:
        raise BootstrapError(f"--base-port {base_port} is not a TCP port (1..65535)")
    for host in hosts:
        try:
            check_endpoint(f"tcp://{host}:{base_port}", "--hosts")
        except BootstrapError:
            raise BootstrapError(f"--hosts: {host!r} is not a host name or address (give bare hosts, without "
                                 "tcp:// or a port; an IPv6 address in brackets, e.g. [::1])") from None
    per_host: dict[str, int] = {}
    peers = {}
    for k, i in enumerate(sorted(ids)):
        host = hosts[k % len(hosts)]
        same = host.lower()  # host names are case-insensitive: A and a are one host, so they share the port count
        port = base_port + per_host.get(same, 0)
        per_host[same] = per_host.get(same, 0) + 1
        if port > 65535:
            raise BootstrapError(f"port {port} out of range: lower --base-port")
        peers[str(i)] = {"endpoint": check_endpoint(f"tcp://{host}:{port}", f"peer {i}")}
    return {"peers": peers}


def _ephemeral_range() -> tuple[int, int]:
    try:
        lo, hi = (int(x) for x in open("/proc/sys/net/ipv4/ip_local_port_range").read().split())
        return lo, hi
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default


def free_base_port(n: int, host: str = "127.0.0.1") -> int:
    """A port p such that p .. p+n-1 are all free on `host` right now (for local networks in tests and benchmarks).

    Chosen below the kernel's ephemeral range: a port in it could be taken, before a slow peer binds it, as the
    local end of some outgoing connection (the other peers' DEALERs make them while the network starts).
    """
    import random
    import socket

    lo, hi = _ephemeral_range()
    first, last = (10000, lo - n) if lo - n > 10000 else (hi + 1, 65535 - n)
    if first >= last:  # no room outside the ephemeral range: take our chances inside it
        first, last = 10000, 65535 - n
    rng = random.Random()
    for _ in range(200):
        base = rng.randrange(first, last)
        socks = []
        try:
            for k in range(n):
                t = socket.socket()
                socks.append(t)
                t.bind((host, base + k))
            return base
        except OSError:
            continue
        finally:
            for t in socks:
                t.close()
    raise RuntimeError(f"no run of {n} free ports found on {host}")


def free_ports(k: int, host: str = "127.0.0.1") -> list[int]:
    """k distinct ports free on `host` right now, each chosen by the OS (any ports, unlike free_base_port)."""
    import socket

    socks = []
    try:
        for _ in range(k):
            s = socket.socket()
            socks.append(s)
            s.bind((host, 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()
