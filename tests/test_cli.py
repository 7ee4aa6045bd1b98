"""User mistakes get one clear line on stderr and exit code 2, never a traceback."""
import json
import socket
import subprocess


from conftest import REPO, deca_peer_cmd, free_base_port

RING4 = REPO / "topologies" / "ring4.json"


def _run(*args, cwd=None, timeout=120):
    return subprocess.run(deca_peer_cmd(*args), capture_output=True, text=True, cwd=cwd, timeout=timeout)


def _assert_user_error(p, *needles):
    assert p.returncode == 2, (p.returncode, p.stderr[-2000:])
    assert "Traceback" not in p.stderr
    line = p.stderr.strip().splitlines()[-1]
    for n in needles:
        assert n in line, line


def test_missing_topology(tmp_path):
    _assert_user_error(_run("simulate", "--topology", tmp_path / "nope.json"), "nope.json", "no such file")


def test_id_not_in_topology(tmp_path):
    _assert_user_error(_run("start", "--id", 9, "--neighbors", RING4, "--run-dir", tmp_path), "9", "not in topology")


def test_unknown_config_key(tmp_path):
    _assert_user_error(_run("start", "--id", 0, "--neighbors", RING4, "--set", "bogus=1"), "bogus")


def test_bad_config_file(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text("lr = [oops")
    _assert_user_error(_run("simulate", "--topology", RING4, "--config", cfg), "c.toml", "TOML")


def test_missing_model_path(deca_cache, tmp_path):
    p = _run("start", "--id", 0, "--neighbors", RING4, "--run-dir", tmp_path, "--base-port", free_base_port(4),
             "--model", tmp_path / "no-model")
    _assert_user_error(p, "no-model", "does not exist")


def test_malformed_data_file(deca_cache, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"prompt": "a", "completion": "b"}) + "\n{not json\n")
    p = _run("start", "--id", 0, "--neighbors", RING4, "--run-dir", tmp_path, "--base-port", free_base_port(4),
             "--data", data)
    _assert_user_error(p, "d.jsonl:2")


def test_port_already_in_use(deca_cache, tmp_path):
    base = free_base_port(4)
    with socket.socket() as s:
        s.bind(("127.0.0.1", base))
        s.listen()
        p = _run("start", "--id", 0, "--neighbors", RING4, "--run-dir", tmp_path, "--base-port", base)
    _assert_user_error(p, str(base), "in use")


def test_bad_bootstrap_file(tmp_path):
    boot = tmp_path / "b.json"
    boot.write_text(json.dumps({"peers": {"0": {"endpoint": "udp://x"}}}))
    _assert_user_error(_run("start", "--id", 0, "--neighbors", RING4, "--bootstrap", boot), "b.json", "tcp://host:port")


def test_bootstrap_ids_must_match_topology(tmp_path):
    boot = tmp_path / "b.json"
    boot.write_text(json.dumps({"peers": {str(i): {"endpoint": f"tcp://127.0.0.1:{7000 + i}"} for i in range(3)}}))
    _assert_user_error(_run("start", "--id", 0, "--neighbors", RING4, "--bootstrap", boot), "missing [3]")


def test_bootstrap_command_writes_a_loadable_file(tmp_path):
    p = _run("bootstrap", "--topology", RING4, "--hosts", "10.0.0.1,10.0.0.2", "--base-port", 6000)
    assert p.returncode == 0, p.stderr
    peers = json.loads(p.stdout)["peers"]
    assert peers["0"]["endpoint"] == "tcp://10.0.0.1:6000" and peers["1"]["endpoint"] == "tcp://10.0.0.2:6000"
    assert peers["2"]["endpoint"] == "tcp://10.0.0.1:6001"


def test_report_on_missing_dir(tmp_path):
    _assert_user_error(_run("report", tmp_path / "nothing"), "does not exist")


def test_divergence_stops_with_one_line(deca_cache, tmp_path):
    # a checkpoint holding an infinite weight makes the first loss NaN: exit 3, one line, no traceback
    from safetensors.torch import load_file, save_file

    from deca_p2p.models import build_default_model

    model = build_default_model(tmp_path / "model")
    weights = load_file(model / "model.safetensors")
    name = next(k for k in weights if "layers.0." in k and k.endswith("q_proj.weight"))
    weights[name][0, 0] = float("inf")
    save_file(weights, model / "model.safetensors", metadata={"format": "pt"})
    p = _run("simulate", "--topology", RING4, "--model", model, "--rounds", "1", "--inner-steps", "2")
    assert p.returncode == 3, (p.returncode, p.stderr[-2000:])
    assert "Traceback" not in p.stderr
    assert "training diverged" in p.stderr.strip().splitlines()[-1]


def test_imports_run_with_the_collector_paused_and_frozen_only_in_the_program_itself(monkeypatch):
    import gc

    from deca_p2p import cli

    assert gc.isenabled()
    frozen = gc.get_freeze_count()
    with cli._collector_paused():
        assert not gc.isenabled()
    assert gc.isenabled() and gc.get_freeze_count() == frozen  # a caller of main (this test) keeps its collector
    monkeypatch.setattr(cli, "_OWN_PROCESS", True)
    try:
        with cli._collector_paused():
            keep = [object() for _ in range(10)]
        assert gc.isenabled() and gc.get_freeze_count() > frozen  # the `deca-peer` program freezes what it imported
    finally:
        gc.unfreeze()
    assert keep


def test_a_rank_that_is_not_ascii_digits_is_no_id(monkeypatch):
    from deca_p2p.cli import _env_id

    monkeypatch.setenv("SLURM_PROCID", "\u00b2")
    monkeypatch.setenv("RANK", "3")
    assert _env_id() == 3
    monkeypatch.delenv("RANK")
    assert _env_id() is None
