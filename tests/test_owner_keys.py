"""Keys the way owners hold them: `deca-peer keys --id I` on each peer's machine, `deca-peer bootstrap --set-key`."""
import json
import os
import stat
import subprocess

import pytest
import zmq
import zmq.auth

from conftest import REPO, deca_peer_cmd
from deca_p2p.keys import KeysError, check_public_key, load_curve, make_keypair, secret_key_path, set_public_keys

pytestmark = pytest.mark.skipif(not zmq.has("curve"), reason="libzmq without CURVE")


def _run(*args, cwd):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run(deca_peer_cmd(*args), capture_output=True, text=True, env=env, cwd=cwd, timeout=60)


def _secret(kdir, i) -> str:
    for line in secret_key_path(kdir, i).read_text().splitlines():
        if line.strip().startswith("secret-key"):
            return line.split("=", 1)[1].strip().strip('"')
    raise AssertionError("no secret-key line")


def _one_error_line(p) -> str:
    assert p.returncode == 2, (p.returncode, p.stdout, p.stderr)
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), p.stderr
    assert "Traceback" not in p.stderr
    return lines[0]


def test_keys_id_prints_only_the_public_key_and_keeps_the_secret_0600(tmp_path):
    kdir = tmp_path / "keys"
    p = _run("keys", "--id", 3, "--keys-dir", kdir, cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert p.stdout.endswith("\n") and p.stdout.count("\n") == 1  # one line: `$(deca-peer keys --id 3)` is the key
    key = p.stdout.strip()
    assert check_public_key(key, "stdout").decode() == key
    sp = secret_key_path(kdir, 3)
    assert stat.S_IMODE(sp.stat().st_mode) == 0o600
    public, secret = zmq.auth.load_certificate(sp)
    assert public.decode() == key and zmq.curve_public(secret) == public
    assert zmq.auth.load_certificate(kdir / "peer-3.key") == (public, None)
    assert "secret" not in (kdir / "peer-3.key").read_text()
    assert secret.decode() not in p.stdout + p.stderr
    assert sorted(f.name for f in kdir.iterdir()) == ["peer-3.key", "peer-3.key_secret"]  # only this peer's

    again = _run("keys", "--id", 3, "--keys-dir", kdir, cwd=tmp_path)  # kept
    assert again.returncode == 0 and again.stdout.strip() == key
    assert _secret(kdir, 3) == secret.decode()
    forced = _run("keys", "--id", 3, "--keys-dir", kdir, "--force", cwd=tmp_path)  # replaced
    assert forced.returncode == 0 and forced.stdout.strip() != key
    assert check_public_key(forced.stdout.strip(), "stdout")
    assert stat.S_IMODE(sp.stat().st_mode) == 0o600 and _secret(kdir, 3) != secret.decode()
    assert _secret(kdir, 3) not in forced.stdout + forced.stderr


def test_keys_id_defaults_to_keys_dir_and_needs_no_topology(tmp_path):
    p = _run("keys", "--id", 0, cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert (tmp_path / "keys" / "peer-0.key_secret").is_file()


def test_owners_keys_into_a_bootstrap_file_make_a_working_secure_setup(tmp_path):
    """Two owners make their keypairs on their own machines; the operator only ever sees the public keys."""
    topo = tmp_path / "complete2.json"
    g = _run("topology", "gen", "complete", 2, cwd=tmp_path)
    assert g.returncode == 0, g.stderr
    topo.write_text(g.stdout)
    b = _run("bootstrap", "--topology", topo, "--base-port", 7200, cwd=tmp_path)
    assert b.returncode == 0, b.stderr
    boot = tmp_path / "peers.json"
    doc = json.loads(b.stdout)
    doc["comment"] = "kept"  # other top-level keys survive the edit
    boot.write_text(json.dumps(doc))
    machines = {i: tmp_path / f"host{i}" / "keys" for i in (0, 1)}
    publics = {}
    for i, kdir in machines.items():
        p = _run("keys", "--id", i, "--keys-dir", kdir, cwd=tmp_path)
        assert p.returncode == 0, p.stderr
        publics[i] = p.stdout.strip()

    with pytest.raises(KeysError, match="no public_key"):  # before the keys are in the file
        load_curve(machines[0], boot, 0, [0, 1])
    s = _run("bootstrap", "--file", boot, "--set-key", f"0={publics[0]}", "--set-key", f"1={publics[1]}", cwd=tmp_path)
    assert s.returncode == 0, s.stderr
    assert "all 2 peers have a public_key" in s.stdout
    new = json.loads(boot.read_text())
    assert new["comment"] == "kept"
    assert new["peers"] == {str(i): {"endpoint": f"tcp://127.0.0.1:{7200 + i}", "public_key": publics[i]}
                            for i in (0, 1)}
    assert "secret" not in boot.read_text()
    assert not any(_secret(machines[i], i) in boot.read_text() + s.stdout + s.stderr for i in (0, 1))
    assert sorted(f.name for f in tmp_path.iterdir() if f.name.startswith(".")) == []  # no temp file left
    for i in (0, 1):
        cfg = load_curve(machines[i], boot, i, [0, 1])
        assert cfg.public_key.decode() == publics[i]
        assert {j: k.decode() for j, k in cfg.peer_keys.items()} == publics
    # one owner rotates its key: only its entry changes
    p = _run("keys", "--id", 1, "--keys-dir", machines[1], "--force", cwd=tmp_path)
    with pytest.raises(KeysError, match="does not match peer 1"):
        load_curve(machines[1], boot, 1, [0, 1])
    assert _run("bootstrap", "--file", boot, "--set-key", f"1={p.stdout.strip()}", cwd=tmp_path).returncode == 0
    load_curve(machines[1], boot, 1, [0, 1])
    assert json.loads(boot.read_text())["peers"]["0"]["public_key"] == publics[0]


def test_set_key_adds_a_peer_only_with_its_endpoint(tmp_path):
    boot = tmp_path / "peers.json"
    boot.write_text(json.dumps({"peers": {"0": {"endpoint": "tcp://10.0.0.1:5550"}}}))
    key, _ = make_keypair(2, tmp_path / "keys")
    before = boot.read_bytes()
    line = _one_error_line(_run("bootstrap", "--file", boot, "--set-key", f"2={key.decode()}", cwd=tmp_path))
    assert "no peer 2" in line and "--endpoint 2=" in line
    assert boot.read_bytes() == before
    p = _run("bootstrap", "--file", boot, "--set-key", f"2={key.decode()}", "--endpoint", "2=tcp://10.0.0.2:5550",
             cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert "peers still without a public_key: 0" in p.stdout
    assert json.loads(boot.read_text())["peers"] == {
        "0": {"endpoint": "tcp://10.0.0.1:5550"},
        "2": {"endpoint": "tcp://10.0.0.2:5550", "public_key": key.decode()}}
    # the library call does the same and refuses a key another peer already holds
    with pytest.raises(KeysError, match="same public_key"):
        set_public_keys(boot, {0: key})


@pytest.mark.parametrize("args, expect", [
    (["--set-key", "0=not-a-key"], "40-character z85"),
    (["--set-key", "0=" + "a" * 39 + "\u00e9"], "40-character z85"),
    (["--set-key", "zero=" + "a" * 40], "I=VALUE"),
    (["--set-key", "0"], "I=VALUE"),
    (["--set-key", "0=" + "a" * 40, "--set-key", "0=" + "b" * 40], "two different values"),
    (["--endpoint", "0=http://x:1"], "tcp://host:port"),
    ([], "nothing to change"),
    (["--set-key", "0=" + "a" * 40, "--topology", "t.json"], "one or the other"),
])
def test_bad_set_key_is_one_line_exit_2_and_leaves_the_file(tmp_path, args, expect):
    boot = tmp_path / "peers.json"
    boot.write_text(json.dumps({"peers": {"0": {"endpoint": "tcp://127.0.0.1:5550"}}}))
    before = boot.read_bytes()
    line = _one_error_line(_run("bootstrap", "--file", boot, *args, cwd=tmp_path))
    assert expect in line, line
    assert boot.read_bytes() == before


def test_user_errors_of_keys_and_bootstrap_are_one_line(tmp_path):
    assert "--topology/--bootstrap" in _one_error_line(_run("keys", "--id", 1, "--topology", "t.json", cwd=tmp_path))
    assert "--id I" in _one_error_line(_run("keys", cwd=tmp_path))
    assert "negative" in _one_error_line(_run("keys", "--id", -1, cwd=tmp_path))
    assert "does not exist" in _one_error_line(
        _run("bootstrap", "--file", tmp_path / "none.json", "--set-key", "0=" + "a" * 40, cwd=tmp_path))
    assert "need --file" in _one_error_line(_run("bootstrap", "--set-key", "0=" + "a" * 40, cwd=tmp_path))
    assert "--topology T" in _one_error_line(_run("bootstrap", cwd=tmp_path))
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    assert "not valid JSON" in _one_error_line(_run("bootstrap", "--file", bad, "--set-key", "0=" + "a" * 40,
                                                    cwd=tmp_path))
    assert bad.read_text() == "{not json"
    (tmp_path / "keys").write_text("a file where the keys directory should be")
    assert "cannot create keys directory" in _one_error_line(_run("keys", "--id", 0, cwd=tmp_path))
