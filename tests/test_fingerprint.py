"""The configuration handshake: the fingerprint in the hello (fingerprint.py), its wire form, the hello barrier that
fails both peers on a mismatch, and (integration) real peers that disagree exiting 2 with one line naming the field."""
import json
import os
import subprocess
import threading

import pytest

from conftest import REPO, deca_peer_cmd, free_base_port
from deca_p2p import fingerprint, wire
from deca_p2p.config import make_config
from deca_p2p.topology import complete, ring
from deca_p2p.trainer import make_blocks
from deca_p2p.transport import Transport, TransportError


def _model(layers=2, hidden=16, vocab=64):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                                        num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=2,
                                        max_position_embeddings=32))


@pytest.fixture(scope="module")
def base():
    return _model()


def _fp(model, topo=None, **over):
    cfg = make_config(None, over)
    if cfg.algo == "declora":
        import copy

        from deca_p2p import lora

        model = lora.wrap(copy.deepcopy(model), cfg)
    return fingerprint.build(cfg, model, make_blocks(model, cfg), topo or ring(4))


# ------------------------------------------------------------------------------------------------ unit

def test_equal_configurations_give_equal_fingerprints(base):
    a, b = _fp(base), _fp(_model())  # another instance of the same architecture (weights do not matter)
    assert a == b
    assert fingerprint.first_difference(a, b) is None
    assert list(a)[: len(fingerprint.AGREE) + 1] == ["digest", *fingerprint.AGREE]
    assert all(isinstance(v, str) and len(v) <= fingerprint.MAX_VALUE_LEN for v in a.values())
    assert a["digest"] == fingerprint.digest(a) and len(a["digest"]) == 16
    # the hello that carries it stays far below the header limit, and round-trips
    frames = wire.encode(wire.Message("hello", src=3, inc=7, cfg=a))
    assert len(frames[0]) < wire.MAX_HEADER_BYTES // 8
    assert wire.decode(frames).cfg == a


@pytest.mark.parametrize("key, value", [
    ("rounds", 4), ("inner_steps", 16), ("gossip_every", 2), ("block_order", "descending"), ("algo", "dadam"),
    ("comm", "none"), ("embeddings_block", True), ("head_block", True), ("layers_per_block", 2),
])
def test_each_field_that_must_agree_is_detected_and_named(base, key, value):
    a, b = _fp(base), _fp(base, **{key: value})
    assert a["digest"] != b["digest"]
    field, mine, theirs = fingerprint.first_difference(a, b)
    assert field == key, (field, mine, theirs)
    assert (mine, theirs) == (a[key], b[key])
    assert fingerprint.describe(field, mine, theirs) == f"{key} ({a[key]} vs {b[key]})"


def test_seed_matters_only_for_random_order_and_declora(base):
    assert fingerprint.first_difference(_fp(base, seed=1), _fp(base, seed=2)) is None  # ascending: per-peer batches
    assert fingerprint.first_difference(_fp(base, block_order="random", seed=1),
                                        _fp(base, block_order="random", seed=2))[0] == "seed"
    assert fingerprint.first_difference(_fp(base, algo="declora", seed=1), _fp(base, algo="declora", seed=2))[0] == "seed"


def test_lora_settings_are_named(base):
    a = _fp(base, algo="declora")
    assert fingerprint.first_difference(a, _fp(base, algo="declora", lora_rank=4))[0] == "lora_rank"
    assert fingerprint.first_difference(a, _fp(base, algo="declora", lora_alpha=8))[0] == "lora_alpha"
    assert fingerprint.first_difference(a, _fp(base, algo="declora", lora_targets="q_proj,v_proj"))[0] == "lora_targets"


def test_model_topology_and_blocks_are_detected(base):
    a = _fp(base)
    field, mine, theirs = fingerprint.first_difference(a, _fp(_model(layers=3)))
    assert field == "model" and "2 layers" in mine and "3 layers" in theirs
    assert fingerprint.first_difference(a, _fp(_model(hidden=32)))[0] == "model"
    assert fingerprint.first_difference(a, _fp(base, topo=complete(4)))[0] == "topology"
    # a partition no config key explains (e.g. another partition rule) is still caught by "blocks"
    b = dict(a, blocks="7 blocks, 1 params #000000000000")
    assert fingerprint.first_difference(a, b)[0] == "blocks"
    # a field one side does not know is a difference too (a future version); "absent" names the gap
    assert fingerprint.first_difference(a, {**a, "tokenizer": "x"}) == ("tokenizer", "absent", "x")


RING4_CANONICAL = ('[[0,1,2,3],[[0,1],[0,3],[1,2],[2,3]],{'
                   '"0":{"0":"0.333333333333","1":"0.333333333333","3":"0.333333333333"},'
                   '"1":{"0":"0.333333333333","1":"0.333333333333","2":"0.333333333333"},'
                   '"2":{"1":"0.333333333333","2":"0.333333333333","3":"0.333333333333"},'
                   '"3":{"0":"0.333333333333","2":"0.333333333333","3":"0.333333333333"}}]')


def test_the_hashes_are_the_ones_protocol_md_specifies(deca_cache):
    """PROTOCOL.md §6.1.1 says exactly what each hash covers, with these test vectors (ring4, the embedded model), so
    that a peer in another language computes the same fingerprint (tests/conformance_peer.py does, from the text)."""
    import hashlib

    from deca_p2p.models import default_model_path, load_model
    from deca_p2p.topology import load

    assert fingerprint.canonical_json([[0, 1], {"b": "é", "a": 1}]) == b'[[0,1],{"a":1,"b":"\\u00e9"}]'
    model, _ = load_model(default_model_path())
    cfg = make_config(None, {"rounds": 2, "inner_steps": 3, "gossip_every": 2, "block_order": "random", "seed": 11})
    fp = fingerprint.build(cfg, model, make_blocks(model, cfg), load(REPO / "topologies" / "ring4.json"))
    assert fp["topology"] == "4 nodes, 4 edges #" + hashlib.sha256(RING4_CANONICAL.encode()).hexdigest()[:12]
    assert fp["topology"] == "4 nodes, 4 edges #72d080645c1d"
    assert fp["model"] == "llama, 4 layers, hidden 128, 878,976 params #b8666f001eb1"
    assert fp["blocks"] == "4 blocks, 852,992 params #4cc79b6b7203"
    assert fp["protocol"] == str(wire.VERSION) == "3"
    assert fp["digest"] == "1471177ec6233f6b"
    text = (REPO / "PROTOCOL.md").read_text()
    for v in (RING4_CANONICAL, fp["topology"], fp["model"], fp["blocks"], fp["digest"]):
        assert v in text, v


def test_per_peer_settings_may_differ_and_are_reported(base):
    a = _fp(base, lr=1e-3)
    b = _fp(base, lr=3e-4, weight_decay=0.1, max_grad_norm=1.0, codec="int8", dtype="bfloat16", batch_size=4,
            grad_accum=2, discrepancy="paper", lr_schedule="cosine", warmup_steps=5, exchange_timeout_s=5,
            max_len=64, threads=1, eval_every=2, checkpoint_every=3, slowdown=2.0, alpha=0.5)
    assert fingerprint.first_difference(a, b) is None
    assert a["digest"] == b["digest"]
    diff = fingerprint.local_differences(a, b)
    assert diff["lr"] == ("0.001", "0.0003")
    assert set(diff) == {"lr", "weight_decay", "max_grad_norm", "codec", "dtype", "batch_size", "grad_accum",
                         "discrepancy", "lr_schedule", "warmup_steps"}
    assert fingerprint.local_differences(a, a) == {}


# ---------------------------------------------------------------------------------------------- wire

def test_wire_validates_the_hello_cfg():
    ok = wire.encode(wire.Message("hello", src=1, inc=2, cfg={"a": "b"}))
    assert wire.decode(ok).cfg == {"a": "b"}
    assert wire.decode(wire.encode(wire.Message("hello", src=1))).cfg is None  # optional
    import msgpack

    def bad(edit, kind="hello"):
        h = msgpack.unpackb(wire.encode(wire.Message(kind, src=1, inc=2))[0], raw=False)
        edit(h)
        with pytest.raises(wire.WireError) as ei:
            wire.decode([msgpack.packb(h, use_bin_type=True)])
        return ei.value.reason

    assert bad(lambda h: h.update(cfg={"a": "b"}), kind="bye") == "schema"  # only a hello carries it
    assert bad(lambda h: h.update(cfg={"a": "b"}), kind="resync") == "schema"
    assert bad(lambda h: h.update(cfg=["a"])) == "schema"
    assert bad(lambda h: h.update(cfg={"a": 1})) == "schema"
    assert bad(lambda h: h.update(cfg={"": "x"})) == "schema"
    assert bad(lambda h: h.update(cfg={"k" * (wire.MAX_CFG_KEY_LEN + 1): "x"})) == "schema"
    assert bad(lambda h: h.update(cfg={"a": "x" * (wire.MAX_CFG_VALUE_LEN + 1)})) == "schema"
    assert bad(lambda h: h.update(cfg={f"k{i}": "" for i in range(wire.MAX_CFG_ENTRIES + 1)})) == "schema"
    assert bad(lambda h: h.update(cfgx={})) == "schema"
    with pytest.raises(wire.WireError):
        wire.encode(wire.Message("block", src=1, cfg={"a": "b"}))


# ----------------------------------------------------------------------------------- hello barrier

def _barrier_pair(cfgs, timeout=10.0):
    base = free_base_port(2)
    eps = {i: f"tcp://127.0.0.1:{base + i}" for i in range(2)}
    results = {}

    def run(i):
        t = Transport(i, eps, [1 - i], linger_ms=500, hello_cfg=cfgs[i])
        try:
            t.start()
            t.barrier(10 + i, timeout)
            results[i] = ("ok", t.neighbour_cfg.get(1 - i))
            for _ in range(20):  # keep answering a little: the other may still be in its barrier
                t.recv(0.05)
        except Exception as e:  # noqa: BLE001 - reported by the test
            results[i] = ("error", e)
        finally:
            t.flush(2.0)
            t.close()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout + 10)
    return results


def test_barrier_fails_both_sides_naming_the_first_differing_field(base):
    a, b = _fp(base, inner_steps=32), _fp(base, inner_steps=16, lr=0.5)
    res = _barrier_pair([a, b])
    assert res[0][0] == "error" and res[1][0] == "error", res
    assert isinstance(res[0][1], TransportError)
    assert str(res[0][1]) == "configuration differs from neighbour 1 in inner_steps (32 vs 16)"
    assert str(res[1][1]) == "configuration differs from neighbour 0 in inner_steps (16 vs 32)"


def test_barrier_passes_equal_fingerprints_and_keeps_the_neighbours(base):
    a, b = _fp(base), _fp(base, lr=0.5)  # per-peer settings may differ
    res = _barrier_pair([a, b])
    assert res[0] == ("ok", b) and res[1] == ("ok", a), res


# ------------------------------------------------------------------------------- real processes

def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO)
    return env


PEER_ARGS = ["--rounds", 1, "--inner-steps", 2, "--batch-size", 4, "--threads", 1, "--hello-timeout", 60,
             "--set", "train_per_task=20", "--set", "eval_per_task=1", "--set", "max_len=32",
             "--set", "eval_max_new_tokens=4"]


def _two_peers(tmp_path, args0, args1, model0, model1):
    topo = tmp_path / "ring2.json"
    topo.write_text(ring(2).to_json())
    base = free_base_port(2)
    procs = [subprocess.Popen(deca_peer_cmd("start", "--id", i, "--neighbors", topo, "--run-dir", tmp_path / "run",
                                            "--base-port", base, "--model", m, *PEER_ARGS, *a),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(), cwd=tmp_path)
             for i, (a, m) in enumerate(((args0, model0), (args1, model1)))]
    out = []
    try:
        for p in procs:
            out.append(p.communicate(timeout=180))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return [p.returncode for p in procs], out


def _assert_mismatch(codes, out, field):
    for i, (code, (stdout, stderr)) in enumerate(zip(codes, out)):
        assert code == 2, (i, code, stderr[-2000:])
        assert "Traceback" not in stderr, stderr[-3000:]
        lines = stderr.strip().splitlines()
        assert len(lines) == 1, stderr[-3000:]
        assert lines[0].startswith(f"error: peer {i}: configuration differs from neighbour {1 - i} in {field} ("), lines


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from deca_p2p.models import DEFAULT_MODEL_CONFIG, build_default_model

    root = tmp_path_factory.mktemp("models")
    four = build_default_model(root / "four")  # the default architecture, untrained (4 layers)
    two = root / "two"
    import shutil

    shutil.copytree(four, two)
    from transformers import LlamaConfig, LlamaForCausalLM

    m = LlamaForCausalLM(LlamaConfig(**{**DEFAULT_MODEL_CONFIG, "num_hidden_layers": 2}))
    m.save_pretrained(two, safe_serialization=True)
    return four, two


@pytest.mark.integration
def test_peers_with_different_inner_steps_both_exit_2(models, tmp_path):
    codes, out = _two_peers(tmp_path, ["--inner-steps", 2], ["--inner-steps", 3, "--lr", "3e-4"], models[0], models[0])
    _assert_mismatch(codes, out, "inner_steps")
    assert "inner_steps (2 vs 3)" in out[0][1] and "inner_steps (3 vs 2)" in out[1][1]


@pytest.mark.integration
def test_peers_with_different_models_both_exit_2(models, tmp_path):
    codes, out = _two_peers(tmp_path, [], [], models[0], models[1])
    _assert_mismatch(codes, out, "model")
    assert "4 layers" in out[0][1] and "2 layers" in out[0][1]


@pytest.mark.integration
def test_peers_with_different_learning_rates_start_and_say_so(models, tmp_path):
    codes, out = _two_peers(tmp_path, ["--lr", "1e-3"], ["--lr", "3e-4"], models[0], models[0])
    assert codes == [0, 0], [o[1][-2000:] for o in out]
    assert "neighbour 1 uses its own lr (0.0003; here 0.001)" in out[0][0]
    ready = [json.loads(line) for line in (tmp_path / "run" / "peer-1" / "metrics.jsonl").read_text().splitlines()
             if '"ready"' in line][0]
    assert ready["neighbour_settings"] == {"0": {"lr": ["0.0003", "0.001"]}}
    final = [json.loads(line) for line in (tmp_path / "run" / "peer-1" / "metrics.jsonl").read_text().splitlines()
             if '"final"' in line][0]
    assert final["alone_exchanges"] == 0 and final["nonfinite_stats"] == 0
