"""A bad model directory, run directory or config value is one `error:` line and exit 2, never a traceback."""
import json
import logging
import shutil
import subprocess

import pytest

from conftest import REPO, deca_peer_cmd
from deca_p2p.config import ConfigError, make_config
from deca_p2p.models import ModelError, default_model_path, load_model

RING4 = REPO / "topologies" / "ring4.json"
# the smallest simulate that reaches training: a config error or model error ends it long before a step
FAST = ["--threads", 1, "--rounds", 1, "--inner-steps", 1, "--batch-size", 2,
        "--set", "train_per_task=8", "--set", "eval_per_task=2"]


def _simulate(*args, cwd=None):
    return subprocess.run(deca_peer_cmd("simulate", "--topology", RING4, *FAST, *args), capture_output=True,
                          text=True, cwd=cwd, timeout=120)


def _assert_user_error(p, *needles):
    assert p.returncode == 2, (p.returncode, p.stderr[-2000:])
    assert "Traceback" not in p.stderr, p.stderr[-2000:]
    line = p.stderr.strip().splitlines()[-1]
    assert line.startswith("error: "), p.stderr[-2000:]
    for n in needles:
        assert n in line, line


def _model_copy(tmp_path, name, **config):
    """A copy of the packaged base with `config` changed in its config.json."""
    d = tmp_path / name
    shutil.copytree(default_model_path(), d)
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(config)
    (d / "config.json").write_text(json.dumps(cfg))
    return d


# ------------------------------------------------------------------------------------------------ the model

def test_corrupt_weights_are_one_line(tmp_path):
    d = _model_copy(tmp_path, "junk")
    (d / "model.safetensors").write_text("junk\n")
    _assert_user_error(_simulate("--model", d), str(d), "cannot load weights")


def test_weights_that_do_not_match_config_are_one_line_without_the_load_report(tmp_path):
    d = _model_copy(tmp_path, "narrow", hidden_size=64)
    p = _simulate("--model", d)
    _assert_user_error(p, str(d), "do not match its config.json", "in the weights")
    assert "LOAD REPORT" not in p.stderr, p.stderr[-2000:]


@pytest.mark.parametrize("layers", [-1, 0])
def test_a_model_without_decoder_layers_is_refused_at_load(tmp_path, layers):
    d = _model_copy(tmp_path, "flat", num_hidden_layers=layers)
    with pytest.raises(ModelError, match=f"has no decoder layers \\(num_hidden_layers {layers}") as e:
        load_model(d)
    assert "\n" not in str(e.value)


def test_a_model_without_decoder_layers_is_one_line_in_the_cli(tmp_path):
    d = _model_copy(tmp_path, "flat", num_hidden_layers=-1)
    _assert_user_error(_simulate("--model", d), str(d), "no decoder layers")


def test_a_usable_model_still_shows_its_load_report(tmp_path):
    # one layer fewer in config.json: the fourth layer's weights are unexpected, the model loads with a warning
    d = _model_copy(tmp_path, "three", num_hidden_layers=3)
    seen = []

    class Keep(logging.Handler):
        def emit(self, record):
            seen.append(record.getMessage())

    logger = logging.getLogger("transformers.modeling_utils")
    handler = Keep()
    logger.addHandler(handler)
    try:
        model, _ = load_model(d)
    finally:
        logger.removeHandler(handler)
    assert model.config.num_hidden_layers == 3
    assert any("LOAD REPORT" in m and "UNEXPECTED" in m for m in seen), seen


# ------------------------------------------------------------------------------------------------ the run directory

@pytest.mark.parametrize("command", ["simulate", "start", "cluster"])
def test_a_run_directory_under_a_file_is_one_line(tmp_path, command):
    (tmp_path / "afile").write_text("")
    run = tmp_path / "afile" / "run"
    if command == "simulate":
        p = _simulate("--run-dir", run)
    else:
        args = ["--id", 0, "--neighbors", RING4] if command == "start" else ["--topology", RING4, "--no-live"]
        p = subprocess.run(deca_peer_cmd(command, *args, *FAST, "--run-dir", run), capture_output=True, text=True,
                           cwd=tmp_path, timeout=120)
    _assert_user_error(p, f"cannot create run directory {run}", "Not a directory")


def test_a_run_directory_that_cannot_exist_is_one_line(tmp_path):
    _assert_user_error(_simulate("--run-dir", "/proc/deca-p2p-no-such-dir"), "cannot create run directory /proc/")


# ------------------------------------------------------------------------------------------------ config values

@pytest.mark.parametrize("name, text", [
    ("inf.toml", "rounds = inf\n"),
    ("ninf.toml", "inner_steps = -inf\n"),
    ("nan.toml", "rounds = nan\n"),
    ("inf.yaml", "rounds: .inf\n"),
    ("nan.yaml", "batch_size: .nan\n"),
    ("dp.yaml", "dp_seed: .inf\n"),
])
def test_infinite_or_nan_integers_are_config_errors(tmp_path, name, text):
    f = tmp_path / name
    f.write_text(text)
    key = text.split()[0].rstrip(":")
    with pytest.raises(ConfigError, match=f"{key}: cannot read .* as int"):
        make_config(f)


def test_infinite_rounds_in_the_cli(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text("gossip_every = inf\n")  # not a key FAST sets: the command line would win over the file
    _assert_user_error(_simulate("--config", f), "gossip_every: cannot read inf as int")


@pytest.mark.parametrize("overrides, needle", [
    ({"rounds": 2.7}, "rounds: cannot read 2.7 as int"),
    ({"rounds": True}, "rounds: cannot read True as int"),
    ({"rounds": "2.7"}, "rounds: cannot read '2.7' as int"),
    ({"secure": 5}, "secure: cannot read 5 as bool"),
    ({"head_block": 0.5}, "head_block: cannot read 0.5 as bool"),
    ({"lr": True}, "lr: cannot read True as float"),
    ({"dp_seed": "abc"}, "dp_seed: cannot read 'abc' as int"),
    ({"dp_seed": 1.5}, "dp_seed: cannot read 1.5 as int"),
    ({"seed": -1}, "seed must be >= 0"),
    ({"seed": 99999999999999999999999}, "seed must be >= 0 and below 2\\*\\*32"),
    ({"seed": 2**32}, "seed must be >= 0 and below 2\\*\\*32"),
    ({"dp_seed": -1}, "dp_seed must be >= 0"),
    ({"dp_seed": 2**64}, "dp_seed must be >= 0 and below 2\\*\\*32"),
    ({"threads": 99999999999999999999}, r"threads must be in \[0, 4096\]"),
    ({"threads": -1}, r"threads must be in \[0, 4096\]"),
])
def test_values_that_would_be_silently_changed_are_refused(overrides, needle):
    with pytest.raises(ConfigError, match=needle):
        make_config(None, overrides)


@pytest.mark.parametrize("key", ["rounds", "train_per_task", "eval_every", "warmup_steps", "max_len"])
def test_counts_above_two_to_the_31_are_refused(tmp_path, key):
    f = tmp_path / "c.yaml"
    f.write_text(f"{key}: 1.0e+30\n")  # YAML reads a float: whole and finite, so only the range can refuse it
    with pytest.raises(ConfigError, match=f"{key} must be at most 2147483647, got 1000000000000000019884624838656"):
        make_config(f)
    assert getattr(make_config(None, {key: 2**31 - 1}), key) == 2**31 - 1


def test_a_start_with_an_id_not_in_the_topology_leaves_no_run_directory(tmp_path):
    p = subprocess.run(deca_peer_cmd("start", "--id", 9, "--neighbors", RING4, *FAST, "--run-dir", "r"),
                       capture_output=True, text=True, cwd=tmp_path, timeout=120)
    _assert_user_error(p, "peer 9: peer id 9 is not in topology ring4 (nodes 0..3)")
    assert not (tmp_path / "r").exists()


def test_what_still_reads():
    cfg = make_config(None, {"rounds": 3.0, "secure": 1, "head_block": "yes", "seed": 2**32 - 1, "dp_seed": "7"})
    assert (cfg.rounds, cfg.secure, cfg.head_block, cfg.seed, cfg.dp_seed) == (3, True, True, 2**32 - 1, 7)
    assert make_config(None, {"secure": 0, "embeddings_block": False}).secure is False


@pytest.mark.parametrize("seed, needle", [("99999999999999999999999", "seed must be >= 0 and below"),
                                          ("-1", "seed must be >= 0")])
def test_seed_out_of_range_in_the_cli(seed, needle):
    _assert_user_error(_simulate("--seed", seed), needle)


# ------------------------------------------------------------------------------------------------ LoRA rank

def test_lora_rank_above_the_layer_width_is_one_line():
    _assert_user_error(_simulate("--algo", "declora", "--set", "lora_rank=100000"),
                       "lora_rank 100000", "128 wide", "at most 128")


def test_lora_rank_is_checked_against_the_targeted_layers_only():
    from deca_p2p import lora

    model, _ = load_model(default_model_path())
    # the base's narrowest linear layers are 128 wide: 129 is refused, 128 (full rank) builds
    with pytest.raises(ConfigError, match="at most 128"):
        lora.wrap(model, make_config(None, {"algo": "declora", "lora_rank": 129, "lora_targets": "q_proj"}))
    wrapped = lora.wrap(model, make_config(None, {"algo": "declora", "lora_rank": 128, "lora_targets": "q_proj"}))
    assert lora.adapter_names(wrapped)
