"""`deca-peer average`: one Hugging Face model at the end, the (weighted) mean of the peers' final checkpoints."""
import json
import os
import subprocess

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from conftest import REPO, deca_peer_cmd, free_base_port
from deca_p2p.average import MARKER, AverageError, average_checkpoints, average_run
from deca_p2p.checkpoint import latest, read_weights, save_atomic
from deca_p2p.cli import main
from deca_p2p.models import default_model_path, load_model

EXAMPLES = {0: 100, 1: 300}


def _env():
    return dict(os.environ, PYTHONPATH=str(REPO))


def _write_peer(run, i, model, tok, examples=None, activation=7):
    save_atomic(model, tok, run / f"peer-{i}" / "checkpoint", tag=f"a{activation:05d}",
                extra_files={"deca_state.json": json.dumps({"activation": activation, "round": 0, "block": 0})})
    recs = [{"event": "hello", "peer": i}]  # the first record *with* train_examples counts
    if examples is not None:
        recs += [{"event": "start", "peer": i, "train_examples": examples},
                 {"event": "start", "peer": i, "train_examples": 1}]  # a later restart's record: ignored
    (run / f"peer-{i}" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))


def _perturbed(seed):
    model, tok = load_model(default_model_path())
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model, tok


@pytest.fixture(scope="module")
def run(deca_cache, tmp_path_factory):
    run = tmp_path_factory.mktemp("avg") / "run"
    for i, seed in ((0, 1), (1, 2)):
        _write_peer(run, i, *_perturbed(seed), examples=EXAMPLES[i])
    return run


def _weights(run):
    return [read_weights(latest(run / f"peer-{i}" / "checkpoint")) for i in (0, 1)]


def _mean(tensors, w):
    return (tensors[0].double() * w[0] + tensors[1].double() * w[1]).to(tensors[0].dtype)


def _one_error_line(res) -> str:
    assert res.exit_code == 2, res.output
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), res.output
    return lines[0]


def test_average_is_the_elementwise_mean_and_loads_as_a_hf_model(run, tmp_path):
    out = tmp_path / "avg"
    p = subprocess.run(deca_peer_cmd("average", run, "--out", out), capture_output=True, text=True, env=_env(),
                       cwd=tmp_path, timeout=300)
    assert p.returncode == 0, p.stderr
    assert f"averaged 2 peers (uniform) into {out}" in p.stdout and "weight 0.5" in p.stdout
    a, b = _weights(run)
    avg = load_file(out / "model.safetensors")
    assert set(avg) == set(a)
    for k in a:
        assert avg[k].dtype == a[k].dtype
        torch.testing.assert_close(avg[k], _mean([a[k], b[k]], [0.5, 0.5]), rtol=0, atol=1e-7)
    assert any(not torch.equal(a[k], b[k]) for k in a)  # the peers did differ
    info = json.loads((out / MARKER).read_text())
    assert info["weighting"] == "uniform" and [p["weight"] for p in info["peers"].values()] == [0.5, 0.5]
    assert {p["activation"] for p in info["peers"].values()} == {7}
    assert not [f for f in out.parent.iterdir() if f.name.startswith(".")]  # no temp dir left behind

    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(out, local_files_only=True)
    tok = AutoTokenizer.from_pretrained(out, local_files_only=True)
    ids = tok("Q: 2+2=", return_tensors="pt").input_ids
    assert ids.shape[1] == 7 and tok.decode(ids[0]) == "Q: 2+2="
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, 7, tok.vocab_size) and torch.isfinite(logits).all()


def test_weighted_average_uses_train_examples(run, tmp_path):
    out = tmp_path / "avg"
    res = CliRunner().invoke(main, ["average", str(run), "--out", str(out), "--weighted"])
    assert res.exit_code == 0, res.output
    assert "(train_examples)" in res.output and "weight 0.25, train_examples 100" in res.output
    w = [EXAMPLES[0] / 400, EXAMPLES[1] / 400]
    a, b = _weights(run)
    avg = load_file(out / "model.safetensors")
    for k in a:
        torch.testing.assert_close(avg[k], _mean([a[k], b[k]], w), rtol=0, atol=1e-7)
    assert not all(torch.allclose(avg[k], _mean([a[k], b[k]], [0.5, 0.5])) for k in a)  # not the uniform mean
    # running again over a previous average replaces it
    res = CliRunner().invoke(main, ["average", str(run), "--out", str(out)])
    assert res.exit_code == 0, res.output
    avg = load_file(out / "model.safetensors")
    k = next(iter(a))
    torch.testing.assert_close(avg[k], _mean([a[k], b[k]], [0.5, 0.5]), rtol=0, atol=1e-7)
    assert json.loads((out / MARKER).read_text())["weighting"] == "uniform"


def test_average_checkpoints_api_normalizes_weights(run):
    dirs = [latest(run / f"peer-{i}" / "checkpoint") for i in (0, 1)]
    a, b = _weights(run)
    model = average_checkpoints(dirs, [2, 6])
    sd = model.state_dict()
    for k in a:
        torch.testing.assert_close(sd[k], _mean([a[k], b[k]], [0.25, 0.75]), rtol=0, atol=1e-7)
    with pytest.raises(AverageError, match="weights"):
        average_checkpoints(dirs, [1, float("nan")])
    with pytest.raises(AverageError, match="sum to 0"):
        average_checkpoints(dirs, [0, 0])
    with pytest.raises(AverageError, match="no checkpoints"):
        average_checkpoints([])


def test_average_holds_at_most_two_models_at_a_time(run, monkeypatch):
    """The first model (the result's container) plus the one being read: never all n."""
    import weakref

    from deca_p2p import average as average_mod

    alive, real_load = [], average_mod._load

    def load(path):
        assert sum(r() is not None for r in alive) <= 1, "a previous peer's model is still in memory"
        model = real_load(path)
        alive.append(weakref.ref(model))
        return model

    monkeypatch.setattr(average_mod, "_load", load)
    d0, d1 = (latest(run / f"peer-{i}" / "checkpoint") for i in (0, 1))
    average_checkpoints([d0, d1, d0, d1])
    assert len(alive) == 4


def test_average_refuses_to_overwrite_what_is_not_an_average(run, tmp_path):
    keep = tmp_path / "model"
    keep.mkdir()
    (keep / "config.json").write_text("{}")
    assert "refusing to overwrite" in _one_error_line(CliRunner().invoke(main, ["average", str(run), "--out", str(keep)]))
    assert [f.name for f in keep.iterdir()] == ["config.json"]
    f = tmp_path / "file"
    f.write_text("x")
    assert "not a directory" in _one_error_line(CliRunner().invoke(main, ["average", str(run), "--out", str(f)]))
    empty = tmp_path / "empty"
    empty.mkdir()
    assert average_run(run, empty) == empty and (empty / "model.safetensors").is_file()


def test_average_user_errors_are_one_line(run, deca_cache, tmp_path):
    def err(run_dir, *extra):
        return _one_error_line(CliRunner().invoke(main, ["average", str(run_dir), "--out", str(tmp_path / "o"), *extra]))

    assert "--out" in _one_error_line(CliRunner().invoke(main, ["average", str(run)]))
    assert "does not exist" in err(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    assert "no peer directories" in err(tmp_path / "empty")
    nock = tmp_path / "nock"
    (nock / "peer-0").mkdir(parents=True)
    assert "no peer checkpoints" in err(nock)
    # one peer without a checkpoint: the average of the others is not the network's
    part = tmp_path / "part"
    model, tok = load_model(default_model_path())
    _write_peer(part, 0, model, tok, examples=5)
    (part / "peer-1").mkdir()
    assert "peer 1 has no checkpoint" in err(part)
    # --weighted without train_examples
    _write_peer(part, 1, model, tok, examples=None)
    assert "no record with train_examples" in err(part, "--weighted")
    assert not (tmp_path / "o").exists()
    # checkpoints of different architectures
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**{**model.config.to_dict(), "num_hidden_layers": 2})
    _write_peer(part, 1, LlamaForCausalLM(cfg), tok, examples=5)
    line = err(part)
    assert "different" in line and "num_hidden_layers" in line, line
    assert not (tmp_path / "o").exists()
    assert not [f for f in tmp_path.iterdir() if f.name.startswith(".")]


@pytest.mark.integration
def test_average_of_a_real_two_peer_network(deca_cache, tmp_path):
    env = _env()
    g = subprocess.run(deca_peer_cmd("topology", "gen", "complete", 2), capture_output=True, text=True, env=env,
                       timeout=60)
    assert g.returncode == 0, g.stderr
    topo = tmp_path / "complete2.json"
    topo.write_text(g.stdout)
    run = tmp_path / "run"
    p = subprocess.run(deca_peer_cmd("cluster", "--topology", topo, "--rounds", 1, "--inner-steps", 2, "--no-live",
                                     "--run-dir", run, "--base-port", free_base_port(2), "--threads", 1,
                                     "--set", "train_per_task=100", "--set", "eval_per_task=3"),
                       capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert p.returncode == 0, (p.stdout[-3000:], p.stderr[-3000:])
    # nothing at exit either (a Pool's semaphores, unlinked by the stopped resource tracker, once printed tracebacks)
    assert "Traceback" not in p.stderr and "leaked" not in p.stderr, p.stderr[-3000:]
    out = tmp_path / "final"
    a = subprocess.run(deca_peer_cmd("average", run, "--out", out), capture_output=True, text=True, env=env,
                       cwd=tmp_path, timeout=300)
    assert a.returncode == 0, a.stderr
    assert "averaged 2 peers" in a.stdout
    w0, w1 = _weights(run)
    avg = load_file(out / "model.safetensors")
    assert set(avg) == set(w0)
    for k in w0:
        torch.testing.assert_close(avg[k], _mean([w0[k], w1[k]], [0.5, 0.5]), rtol=0, atol=1e-7)
    starts = {i: [json.loads(line) for line in (run / f"peer-{i}" / "metrics.jsonl").read_text().splitlines()]
              for i in (0, 1)}
    counts = {i: next((r["train_examples"] for r in recs if "train_examples" in r), None) for i, recs in starts.items()}
    assert None not in counts.values(), "the peers' start records carry no train_examples"
    wa = subprocess.run(deca_peer_cmd("average", run, "--out", out, "--weighted"), capture_output=True, text=True,
                        env=env, cwd=tmp_path, timeout=300)
    assert wa.returncode == 0, wa.stderr
    n = counts[0] + counts[1]
    avg = load_file(out / "model.safetensors")
    for k in w0:
        torch.testing.assert_close(avg[k], _mean([w0[k], w1[k]], [counts[0] / n, counts[1] / n]), rtol=0, atol=1e-7)
