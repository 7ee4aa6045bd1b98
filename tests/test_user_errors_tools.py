"""User errors of the commands around a run (average, report, keys, bootstrap, topology): damaged run directories
and files, bad options. Each gets one `error:` line and exit 2, never a traceback."""
import json
import logging
import shutil
import subprocess
import warnings

import pytest
import zmq
from click.testing import CliRunner

from conftest import deca_peer_cmd
from deca_p2p import bootstrap, topology as T
from deca_p2p.cli import main
from deca_p2p.metrics import read_metrics, records

Z85_KEY = "a" * 40  # 40 z85 characters: what check_public_key accepts


def _cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def _user_error(res, *needles) -> str:
    """The one `error:` line of a command that exits 2 with nothing else on stderr and no traceback."""
    assert res.exit_code == 2, (res.exit_code, res.output[-2000:], res.exception)
    assert "Traceback" not in res.output
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def sim_run(deca_cache, tmp_path_factory):
    """A tiny saved simulation (2 peers, 1 round): a valid run directory with checkpoints, to damage copies of."""
    d = tmp_path_factory.mktemp("sim")
    (d / "ring2.json").write_text(T.ring(2).to_json())
    p = subprocess.run(deca_peer_cmd("simulate", "--topology", "ring2.json", "--threads", 1, "--rounds", 1,
                                     "--inner-steps", 1, "--batch-size", 2, "--set", "train_per_task=8",
                                     "--set", "eval_per_task=2", "--run-dir", "R", "--save"),
                       cwd=d, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    return d / "R"


@pytest.fixture
def run_copy(sim_run, tmp_path):
    run = tmp_path / "R"
    shutil.copytree(sim_run, run, symlinks=True)
    return run


def _latest(run, i):
    return (run / f"peer-{i}" / "checkpoint" / "latest").resolve()


# --------------------------------------------------------------------------- metrics.jsonl reader


def test_reader_skips_lines_that_are_not_records_and_keeps_skipping_a_torn_last_line(tmp_path):
    d = tmp_path / "peer-0"
    d.mkdir()
    good = [{"event": "start", "train_examples": 5}, {"event": "step", "istep": 0}]
    (d / "metrics.jsonl").write_bytes(b"".join(json.dumps(r).encode() + b"\n" for r in good[:1])
                                      + b"7\n\xff\xfe\n[1, 2]\n\"x\"\n" + b"[" * 100000 + b"\n"
                                      + json.dumps(good[1]).encode() + b"\n" + b'{"event": "step", "ist')
    (tmp_path / "peer-\u00b2").mkdir()  # "²".isdigit(), yet int() refuses it
    (tmp_path / "peer-\u00b2" / "metrics.jsonl").write_text("{}\n")
    assert records(tmp_path, 0) == good
    assert records(tmp_path, 0, "step") == good[1:]
    assert read_metrics(tmp_path) == {0: good}


def test_weighted_average_with_damaged_metrics(run_copy, tmp_path):
    with open(run_copy / "peer-0" / "metrics.jsonl", "ab") as f:
        f.write(b"7\n\xff\n")
    out = tmp_path / "avg"
    res = _cli("average", run_copy, "--out", out, "--weighted")
    assert res.exit_code == 0, res.output
    assert "train_examples" in res.stdout
    (run_copy / "peer-1" / "metrics.jsonl").write_bytes(b"\xff\xfe\n5\n")  # nothing readable left: one line
    _user_error(_cli("average", run_copy, "--out", out, "--weighted"), "peer 1", "no record with train_examples")


# --------------------------------------------------------------------------- average


def test_average_out_that_cannot_be_created(sim_run, tmp_path):
    (tmp_path / "afile").write_text("x")
    _user_error(_cli("average", sim_run, "--out", tmp_path / "afile" / "sub"), "afile is not a directory")
    _user_error(_cli("average", sim_run, "--out", "/proc/avg"), "cannot write /proc/avg")
    assert not list(tmp_path.glob(".*"))


def test_average_of_a_file_says_it_is_not_a_directory(tmp_path):
    (tmp_path / "ring2.json").write_text("{}")
    _user_error(_cli("average", tmp_path / "ring2.json", "--out", tmp_path / "x"), "ring2.json is not a directory")


def test_average_of_a_junk_safetensors_names_the_checkpoint(run_copy, tmp_path):
    (_latest(run_copy, 1) / "model.safetensors").write_text("junk\n")
    _user_error(_cli("average", run_copy, "--out", tmp_path / "o"), "cannot load checkpoint", str(_latest(run_copy, 1)))
    assert not (tmp_path / "o").exists()


class _Records(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.mark.parametrize("damage", ["hidden_size", "missing_tensor"])
def test_average_of_a_checkpoint_that_does_not_fit_its_config(run_copy, tmp_path, damage):
    """transformers would fill such tensors with random values (and log a LOAD REPORT): refused in one line,
    with no report printed."""
    ckpt = _latest(run_copy, 1)
    if damage == "hidden_size":
        cfg = json.loads((ckpt / "config.json").read_text())
        cfg["hidden_size"] *= 2
        (ckpt / "config.json").write_text(json.dumps(cfg))
        needles = ("has shape", "but its config.json needs")
    else:
        from safetensors.torch import load_file, save_file

        sd = load_file(ckpt / "model.safetensors")
        del sd["model.norm.weight"]
        save_file(sd, ckpt / "model.safetensors", metadata={"format": "pt"})
        needles = ("lacks tensor model.norm.weight",)
    seen = _Records()
    hf = logging.getLogger("transformers")  # the library's root logger: it does not propagate to ours
    hf.addHandler(seen)
    try:
        line = _user_error(_cli("average", run_copy, "--out", tmp_path / "o"), "cannot load checkpoint", *needles)
    finally:
        hf.removeHandler(seen)
    assert str(ckpt) in line
    assert not [m for m in seen.messages if "LOAD REPORT" in m]
    assert not (tmp_path / "o").exists()


def test_average_skips_peer_dirs_that_are_not_ascii_digits(run_copy, tmp_path):
    (run_copy / "peer-\u00b2").mkdir()
    res = _cli("average", run_copy, "--out", tmp_path / "o")
    assert res.exit_code == 0, res.output
    assert "averaged 2 peers" in res.stdout


# --------------------------------------------------------------------------- report


def test_report_of_a_valid_run(run_copy):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = _cli("report", run_copy)
    assert res.exit_code == 0, (res.output, res.exception)
    assert "mean" in res.stdout and (run_copy / "summary.md").is_file() and (run_copy / "plots" / "loss.png").is_file()
    assert not [w for w in caught if "legend" in str(w.message)]  # no eval record before the final one: no legend


def _metrics(run, peer, *recs, raw: bytes = b""):
    d = run / f"peer-{peer}"
    d.mkdir(parents=True, exist_ok=True)
    (d / "metrics.jsonl").write_bytes(b"".join(json.dumps(r).encode() + b"\n" for r in recs) + raw)


FINAL = {"event": "final", "eval_loss": 1.0, "acc": 0.5}


def test_report_skips_lines_that_are_not_records(run_copy, tmp_path):
    with open(run_copy / "peer-0" / "metrics.jsonl", "ab") as f:
        f.write(b"5\n")
    res = _cli("report", run_copy)
    assert res.exit_code == 0, (res.output, res.exception)
    _metrics(tmp_path / "b", 0, raw=b"\xff\xfe")
    _user_error(_cli("report", tmp_path / "b"), "no peer metrics with an evaluation")


@pytest.mark.parametrize("recs, needle", [
    ([{"event": "step", "loss": 1.0}, {"event": "eval", "eval_loss": 1.0, "acc": 0.5}], "step record without istep"),
    ([{"event": "step", "istep": 0}, {"event": "eval", "eval_loss": 1.0}], "eval record without acc"),
    ([{"event": "start", "labels": [1, 2]}, FINAL], "start record with labels [1, 2]"),
    ([{**FINAL, "flagged": {"a": 1}}], "final record with flagged {'a': 1}"),
    ([{"event": "step", "istep": 0, "bytes_sent": "x"}, FINAL], "step record with bytes_sent 'x'"),
    ([{"event": "step", "istep": 0, "compute_s": 10**400}, FINAL], "step record with compute_s"),
    ([{**FINAL, "dp_releases": 3, "dp_epsilon": "big"}], "final record with dp_epsilon 'big'"),
    ([{"event": "eval", "acc": 0.5, "activation": "x"}, FINAL], "eval record with activation 'x'"),
])
def test_report_of_records_with_fields_of_the_wrong_shape(tmp_path, recs, needle):
    run = tmp_path / "R"
    _metrics(run, 0, FINAL)
    _metrics(run, 1, *recs)
    res = _cli("report", run)
    _user_error(res, f"{run / 'peer-1' / 'metrics.jsonl'}: a record this version cannot read", needle)
    assert res.stdout == ""  # nothing printed before the error


def test_report_ignores_an_average_eval_that_is_not_an_object(tmp_path):
    """As one that is not JSON: the avg model row is left out."""
    run = tmp_path / "R"
    _metrics(run, 0, FINAL)
    (run / "average").mkdir()
    (run / "average" / "eval.json").write_text("[1, 2]")
    res = _cli("report", run)
    assert res.exit_code == 0, (res.output, res.exception)
    assert "avg" not in res.stdout


def test_report_of_a_damaged_run_real_process(tmp_path):
    run = tmp_path / "R"
    _metrics(run, 0, {"event": "step", "loss": 1.0}, FINAL)
    p = subprocess.run(deca_peer_cmd("report", run), capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
    assert p.stderr.strip().splitlines() == [f"error: {run / 'peer-0' / 'metrics.jsonl'}: a record this version "
                                             "cannot read (step record without istep)"]


# --------------------------------------------------------------------------- keys and bootstrap


@pytest.fixture
def ring4(tmp_path):
    p = tmp_path / "ring4.json"
    p.write_text(T.ring(4).to_json())
    return p


needs_curve = pytest.mark.skipif(not zmq.has("curve"), reason="libzmq without CURVE")


@needs_curve
def test_keys_bootstrap_where_no_directory_can_be_made(ring4, tmp_path):
    (tmp_path / "afile").write_text("x")
    _user_error(_cli("keys", "--topology", ring4, "--bootstrap", tmp_path / "afile" / "b.json",
                     "--keys-dir", tmp_path / "kd"), "cannot create directory", "a plain file is in the way")
    _user_error(_cli("keys", "--topology", ring4, "--bootstrap", "/proc/foo/b.json", "--keys-dir", tmp_path / "kd"),
                "cannot create directory /proc/foo")


@needs_curve
@pytest.mark.parametrize("base", [70000, 65533, 0, -10])
def test_keys_base_port_out_of_range(ring4, tmp_path, base):
    _user_error(_cli("keys", "--topology", ring4, "--bootstrap", tmp_path / "b.json", "--keys-dir", tmp_path / "kd",
                     "--base-port", base), f"--base-port {base}", "1..65535")
    assert not (tmp_path / "b.json").exists() and not (tmp_path / "kd").exists()  # nothing written


@pytest.mark.parametrize("args, needle", [
    (["--base-port", "0"], "--base-port 0 is not a TCP port"),
    (["--base-port", "-5"], "--base-port -5 is not a TCP port"),
    (["--hosts", "::1"], "'::1' is not a host name"),
    (["--hosts", "tcp://a:5"], "'tcp://a:5' is not a host name"),
    (["--hosts", "a:5"], "'a:5' is not a host name"),
    (["--hosts", "ok,bad host!"], "'bad host!' is not a host name"),
    (["--base-port", "65534"], "out of range"),
])
def test_bootstrap_writes_only_endpoints_the_loader_reads(ring4, args, needle):
    res = _cli("bootstrap", "--topology", ring4, *args)
    _user_error(res, needle)
    assert res.stdout == ""


def test_bootstrap_made_files_load(ring4, tmp_path):
    res = _cli("bootstrap", "--topology", ring4, "--hosts", "[::1],h-1.example", "--base-port", 65534)
    assert res.exit_code == 0, res.output
    (tmp_path / "b.json").write_text(res.stdout)
    assert sorted(bootstrap.load(tmp_path / "b.json")) == [0, 1, 2, 3]


def test_bootstrap_peer_ids_are_ascii_digits(ring4, tmp_path):
    b = tmp_path / "b.json"
    b.write_text(_cli("bootstrap", "--topology", ring4).stdout)
    _user_error(_cli("bootstrap", "--file", b, "--set-key", f"\u00b2={Z85_KEY}"), "--set-key expects I=VALUE")
    _user_error(_cli("bootstrap", "--file", b, "--endpoint", "\u00b2=tcp://h:1"), "--endpoint expects I=VALUE")
    doc = json.loads(b.read_text())
    doc["peers"]["\u00b2"] = doc["peers"].pop("3")
    b.write_text(json.dumps(doc))
    _user_error(_cli("bootstrap", "--file", b, "--set-key", f"0={Z85_KEY}"), "peer id '²' is not a non-negative integer")


def test_bootstrap_hosts_differing_only_in_case_are_one_host(ring4):
    doc = bootstrap.make([0, 1, 2, 3], ["H1", "h1"], 7000)
    assert sorted(e["endpoint"].rsplit(":", 1)[1] for e in doc["peers"].values()) == ["7000", "7001", "7002", "7003"]


def test_an_endpoint_with_a_trailing_newline_is_refused():
    with pytest.raises(bootstrap.BootstrapError, match="is not tcp://host:port"):
        bootstrap.check_endpoint("tcp://h:5550\n", "peer 0")


def test_a_huge_integer_line_in_metrics_is_skipped(tmp_path):
    f = tmp_path / "peer-0" / "metrics.jsonl"
    f.parent.mkdir()
    f.write_text('{"event": "step", "x": ' + "9" * 5000 + '}\n{"event": "step", "x": 1}\n')
    assert [r["x"] for r in records(tmp_path, 0, "step")] == [1]


def test_average_of_a_run_with_an_undecodable_state_file(run_copy, tmp_path):
    state = _latest(run_copy, 0) / "deca_state.json"
    state.unlink(missing_ok=True)  # (a peer's is a hard link shared with older checkpoints: not written through)
    state.write_bytes(b"\xff\xfe{")
    res = _cli("average", run_copy, "--out", tmp_path / "avg")
    assert res.exit_code == 0, res.output
    assert (tmp_path / "avg" / "model.safetensors").is_file()


# --------------------------------------------------------------------------- topology


def test_topology_id_keys_are_ascii_digits(tmp_path):
    base = {"name": "x", "nodes": [0, 1, 2], "edges": [[0, 1], [1, 2], [0, 2]]}
    with pytest.raises(T.TopologyError, match="key '\u0661' is not a node id"):  # ARABIC-INDIC DIGIT ONE
        T.from_dict({**base, "weights": {"0": {"\u0661": 0.5, "2": 0.0}, "1": {"0": 0.5, "2": 0.0},
                                         "2": {"0": 0.0, "1": 0.0}}})
    with pytest.raises(T.TopologyError, match="\u0661-2"):
        T.from_dict({**base, "links": {"\u0661-2": {"latency_ms": 5}}})


def test_topology_node_ids_below_ten_to_the_ten(tmp_path):
    big = 10**20
    f = tmp_path / "t.json"
    f.write_text(json.dumps({"name": "x", "nodes": [0, big], "edges": [[0, big]]}))
    for args in (["topology", "show", f], ["bootstrap", "--topology", f]):
        _user_error(_cli(*args), f"node id {big} is too large", "below 10^10")
    assert T.from_dict({"name": "x", "nodes": [0, 10**10 - 1], "edges": [[0, 10**10 - 1]]}).nodes[1] == 10**10 - 1
    with pytest.raises(T.TopologyError, match="too large"):
        T.from_dict({"name": "x", "nodes": [0, 10**10], "edges": [[0, 10**10]]})


def test_topology_weights_must_connect_the_graph(tmp_path):
    f = tmp_path / "t.json"
    f.write_text(json.dumps({"name": "x", "nodes": [0, 1], "edges": [[0, 1]],
                             "weights": {"0": {"1": 0.0}, "1": {"0": 0.0}}}))
    _user_error(_cli("topology", "show", f), "weights", "[1] cut off from [0]")
    square = {"name": "sq", "nodes": [0, 1, 2, 3], "edges": [[0, 1], [1, 2], [2, 3], [0, 3]]}
    with pytest.raises(T.TopologyError, match=r"leave \[2, 3\] cut off from \[0, 1\]"):
        T.from_dict({**square, "weights": {"0": {"1": 0.5, "3": 0}, "1": {"0": 0.5, "2": 0},
                                           "2": {"1": 0, "3": 0.5}, "3": {"2": 0.5, "0": 0}}})
    # a zero weight on an edge the others bypass is fine: the mixing graph stays connected
    t = T.from_dict({**square, "weights": {"0": {"1": 0.5, "3": 0}, "1": {"0": 0.5, "2": 0.25},
                                           "2": {"1": 0.25, "3": 0.25}, "3": {"2": 0.25, "0": 0}}})
    assert t.spectral_gap() > 0


def test_cluster_checks_every_peers_endpoint_before_starting_any(tmp_path):
    """A base port that puts the last peer past 65535, or a bootstrap file missing a peer: one line before any peer
    starts (before: the peers started, one failed to bind, the others waited for it)."""
    topo = tmp_path / "ring4.json"
    topo.write_text(T.ring(4).to_json())
    _user_error(_cli("cluster", "--topology", topo, "--base-port", 65533, "--no-live", "--run-dir", tmp_path / "r"),
                "puts peer 3 on port 65536", "at most 65532")
    bs = tmp_path / "b.json"
    bs.write_text(json.dumps({"peers": {str(i): {"endpoint": f"tcp://127.0.0.1:{6000 + i}"} for i in range(3)}}))
    _user_error(_cli("cluster", "--topology", topo, "--bootstrap", bs, "--no-live", "--run-dir", tmp_path / "r"), "3")
    assert not (tmp_path / "r").exists()  # nothing started, nothing written
