"""CURVE keys for --secure: one keypair per peer, public keys in the bootstrap file, secret keys on disk only.

``deca-peer keys --topology T --bootstrap B [--keys-dir keys]`` (``make_keys``) gives every peer of T a
keypair and writes

* ``<keys_dir>/peer-<id>.key_secret``: the peer's public *and* secret key, mode 0600, in ZeroMQ's
  certificate format (what ``zmq.auth.create_certificates`` writes; ``zmq.auth.load_certificate`` reads it);
* ``<keys_dir>/peer-<id>.key``: the public key only, same format;
* the ``"public_key"`` (z85) of every peer into the bootstrap file B (created with the default endpoints
  ``tcp://127.0.0.1:(base_port + id)`` when it does not exist; other entries are kept as they are).

Existing keypairs are kept (re-running the command is harmless) unless ``force``.  The bootstrap file is
public: it is the allow-list, and it never holds secret keys.  On a multi-host network copy each host only
the ``peer-<id>.key_secret`` files of the peers it runs (and the bootstrap file to every host).

Owners who keep their secret key on their own machine use the per-peer form instead:
``deca-peer keys --id I [--keys-dir keys]`` (``make_keypair``) makes only peer I's two files and prints its z85
public key, which the operator puts into the shared bootstrap file with
``deca-peer bootstrap --file B --set-key I=<key>`` (``set_public_keys``); no secret ever leaves its machine.

``load_curve`` builds a peer's ``curve.CurveConfig``: its keypair from the keys directory and every
peer's public key from the bootstrap file, checked against each other.  Every failure is a ``KeysError``
with a one-line message that never contains secret key material.
"""
from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Iterable

import zmq
import zmq.auth

from . import atomic, bootstrap
from .curve import CurveConfig

__all__ = ["KeysError", "secret_key_path", "public_key_path", "make_keys", "make_keypair", "set_public_keys",
           "load_curve", "check_public_key"]

_Z85_ALPHABET = frozenset(b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ.-:+=^!/*?&<>()[]{}@%$#")


class KeysError(ValueError):
    """Missing, unreadable or inconsistent keys; the message is one line naming the cause."""


def secret_key_path(keys_dir: str | Path, peer_id: int) -> Path:
    return Path(keys_dir) / f"peer-{int(peer_id)}.key_secret"


def public_key_path(keys_dir: str | Path, peer_id: int) -> Path:
    return Path(keys_dir) / f"peer-{int(peer_id)}.key"


def check_public_key(key: object, where: str) -> bytes:
    """A z85 CURVE public key (40 characters) as bytes, or KeysError naming ``where``."""
    if isinstance(key, str):
        try:
            key = key.encode("ascii")
        except UnicodeEncodeError:  # not "replace": its '?' is a z85 character and would pass as another key
            raise KeysError(f"{where}: public_key is not a 40-character z85 CURVE key") from None
    if not isinstance(key, bytes) or len(key) != 40 or not set(key) <= _Z85_ALPHABET:
        raise KeysError(f"{where}: public_key is not a 40-character z85 CURVE key")
    return key


def _banner(kind: str) -> str:
    return (f"#   ZeroMQ CURVE {kind} Certificate (deca-peer keys)\n"
            + ("#   DO NOT PROVIDE THIS FILE TO OTHER USERS nor change its permissions.\n" if kind == "**Secret**"
               else "#   The same public key is in the bootstrap file.\n")
            + "\n")


def _cert_text(public: bytes, secret: bytes | None) -> str:
    text = _banner("**Secret**" if secret else "Public") + "metadata\ncurve\n"
    text += f'    public-key = "{public.decode("ascii")}"\n'
    if secret:
        text += f'    secret-key = "{secret.decode("ascii")}"\n'
    return text


def _write_private(path: Path, text: str) -> None:
    atomic.write_text(path, text, 0o600)


def _write_public(path: Path, text: str) -> None:
    atomic.write_text(path, text, 0o644)


def _read_keypair(path: Path, peer_id: int) -> tuple[bytes, bytes]:
    """(public, secret) z85 from a secret certificate file; KeysError (one line, no key material) otherwise."""
    if not path.is_file():
        raise KeysError(f"secret key of peer {peer_id} not found at {path} (make keys with `deca-peer keys`)")
    if os.name == "posix":
        try:
            mode = path.stat().st_mode
        except OSError as e:
            raise KeysError(f"cannot read secret key {path}: {e.strerror}") from None
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise KeysError(f"secret key {path} is accessible by other users (mode {stat.S_IMODE(mode):04o}): "
                            f"chmod 600 {path}")
    try:
        public, secret = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else "not a ZeroMQ certificate"
        raise KeysError(f"cannot read secret key {path}: {reason}") from None
    if not secret:
        raise KeysError(f"{path} holds no secret-key")
    if len(secret) != 40 or not set(secret) <= _Z85_ALPHABET:
        raise KeysError(f"{path}: secret-key is not a 40-character z85 CURVE key")
    try:
        derived = zmq.curve_public(secret)
    except (zmq.ZMQError, ValueError):
        raise KeysError(f"{path}: secret-key is not a valid CURVE key") from None
    if public and public != derived:
        raise KeysError(f"{path}: its public-key does not belong to its secret-key")
    return derived, secret


def make_keypair(peer_id: int, keys_dir: str | Path, *, force: bool = False) -> tuple[bytes, bool]:
    """One peer's keypair in ``keys_dir`` (secret file 0600, public file 0644): ``(public z85, created)``.

    An existing keypair is kept (and checked) unless ``force``; ``created`` says whether a new one was made.  The
    secret key is written only to ``peer-<id>.key_secret`` and is never returned.
    """
    if not zmq.has("curve"):
        raise KeysError("this libzmq was built without CURVE support")
    i = int(peer_id)
    if i < 0:
        raise KeysError(f"peer id {i} is negative")
    kdir = Path(keys_dir)
    try:
        kdir.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as e:
        raise KeysError(f"cannot create keys directory {kdir}: {e.strerror}") from None
    spath = secret_key_path(kdir, i)
    created = force or not spath.exists()
    if created:
        public, secret = zmq.curve_keypair()
        try:
            _write_private(spath, _cert_text(public, secret))
        except OSError as e:
            raise KeysError(f"cannot write {spath}: {e.strerror}") from None
        del secret
    else:
        public, _ = _read_keypair(spath, i)
    try:
        _write_public(public_key_path(kdir, i), _cert_text(public, None))
    except OSError as e:
        raise KeysError(f"cannot write {public_key_path(kdir, i)}: {e.strerror}") from None
    return public, created


def set_public_keys(bootstrap_path: str | Path, keys: dict[int, object],
                    endpoints: dict[int, str] | None = None) -> dict[int, dict]:
    """Put peers' public keys (and endpoints) into an existing bootstrap file, in place and atomically.

    Each key is checked with ``check_public_key``; other entries and fields are kept.  A peer with no entry yet
    gets one only when ``endpoints`` names it.  Refuses a key that another peer of the file already holds (the
    allow-list identifies senders by key).  Returns the file's entries as ``bootstrap.load`` reads them.
    """
    checked = {int(i): check_public_key(k, f"peer {int(i)}").decode("ascii") for i, k in keys.items()}
    try:
        return bootstrap.update(bootstrap_path, public_keys=checked, endpoints=endpoints)
    except bootstrap.BootstrapError as e:
        raise KeysError(str(e)) from None


def make_keys(node_ids: Iterable[int], keys_dir: str | Path, bootstrap_path: str | Path, *,
              base_port: int = 5550, force: bool = False) -> dict[int, bytes]:
    """Keypairs for ``node_ids`` in ``keys_dir``; their public keys into the bootstrap file.  Returns {id: public z85}."""
    if not zmq.has("curve"):
        raise KeysError("this libzmq was built without CURVE support")
    ids = sorted(int(i) for i in node_ids)
    kdir = Path(keys_dir)
    bpath = Path(bootstrap_path)
    if bpath.exists():
        try:
            entries = bootstrap.load(bpath)
        except bootstrap.BootstrapError as e:
            raise KeysError(str(e)) from None
        if set(entries) != set(ids):
            missing, extra = sorted(set(ids) - set(entries)), sorted(set(entries) - set(ids))
            raise KeysError(f"bootstrap file {bpath} does not match the topology: "
                            + "; ".join(p for p in (f"missing peers {missing}" if missing else "",
                                                    f"extra peers {extra}" if extra else "") if p))
        doc = json.loads(bpath.read_text())
    else:
        # every endpoint as the loader will check it, before any file is written: peer i gets port base_port + i
        if ids and not (0 < base_port and base_port + ids[-1] < 65536):
            raise KeysError(f"--base-port {base_port}: peer i listens on port {base_port} + i, which must be in "
                            f"1..65535 for every peer (ids {ids[0]}..{ids[-1]})")
        try:
            doc = {"peers": {str(i): {"endpoint": bootstrap.check_endpoint(e, f"peer {i}")}
                             for i, e in bootstrap.default_endpoints(ids, base_port).items()}}
        except bootstrap.BootstrapError as e:
            raise KeysError(str(e)) from None
        try:
            bpath.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:  # a plain file on the way (FileExistsError), a directory we may not create in, ...
            why = "a plain file is in the way" if isinstance(e, (FileExistsError, NotADirectoryError)) else e.strerror
            raise KeysError(f"cannot create directory {bpath.parent} for bootstrap file {bpath}: {why}") from None
    publics: dict[int, bytes] = {i: make_keypair(i, kdir, force=force)[0] for i in ids}
    peers = doc["peers"]
    for key in list(peers):
        peers[key]["public_key"] = publics[int(key)].decode("ascii")
    try:
        _write_public(bpath, json.dumps(doc, indent=2) + "\n")
    except OSError as e:
        raise KeysError(f"cannot write bootstrap file {bpath}: {e.strerror}") from None
    return publics


def load_curve(keys_dir: str | Path, bootstrap_path: str | Path | None, my_id: int,
               node_ids: Iterable[int] | None = None) -> CurveConfig:
    """This peer's CurveConfig: its keypair from ``keys_dir``, every peer's public key from the bootstrap file."""
    if not zmq.has("curve"):
        raise KeysError("--secure needs CURVE, but this libzmq was built without it")
    if bootstrap_path is None:
        raise KeysError("--secure needs --bootstrap FILE holding every peer's public_key (make it with `deca-peer keys`)")
    try:
        entries = bootstrap.load(bootstrap_path)
    except bootstrap.BootstrapError as e:
        raise KeysError(str(e)) from None
    ids = sorted(entries) if node_ids is None else sorted(int(i) for i in node_ids)
    peer_keys: dict[int, bytes] = {}
    owner: dict[bytes, int] = {}
    for i in ids:
        entry = entries.get(i)
        if entry is None:
            raise KeysError(f"bootstrap file {bootstrap_path}: no entry for peer {i}")
        if "public_key" not in entry:
            raise KeysError(f"bootstrap file {bootstrap_path}: peer {i} has no public_key "
                            "(--secure needs one for every peer: run `deca-peer keys`)")
        key = check_public_key(entry["public_key"], f"bootstrap file {bootstrap_path}: peer {i}")
        if key in owner:
            raise KeysError(f"bootstrap file {bootstrap_path}: peers {owner[key]} and {i} have the same public_key")
        owner[key] = i
        peer_keys[i] = key
    me = int(my_id)
    if me not in peer_keys:
        raise KeysError(f"bootstrap file {bootstrap_path}: no entry for peer {me} (this peer)")
    spath = secret_key_path(keys_dir, me)
    public, secret = _read_keypair(spath, me)
    if public != peer_keys[me]:
        raise KeysError(f"secret key {spath} does not match peer {me}'s public_key in {bootstrap_path} "
                        "(re-run `deca-peer keys` or fix the bootstrap file)")
    return CurveConfig(public_key=public, secret_key=secret, peer_keys=peer_keys)

