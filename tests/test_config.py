"""Config: defaults <- TOML/YAML file <- command-line overrides; bad values are ConfigErrors."""
import pytest

from deca_p2p.config import ConfigError, make_config


def test_toml_then_overrides(tmp_path):
    f = tmp_path / "run.toml"
    f.write_text('lr = 0.01\nrounds = 3\ncodec = "bf16"\nbetas = [0.5, 0.6]\n')
    cfg = make_config(f, {"rounds": 7, "seed": None})
    assert (cfg.lr, cfg.rounds, cfg.codec, cfg.betas, cfg.seed) == (0.01, 7, "bf16", (0.5, 0.6), 0)


def test_yaml_and_string_overrides(tmp_path):
    f = tmp_path / "run.yaml"
    f.write_text("discrepancy: qg\nhead_block: false\n")
    cfg = make_config(f, {"inner_steps": "12", "embeddings_block": "false"})
    assert (cfg.discrepancy, cfg.head_block, cfg.inner_steps, cfg.embeddings_block) == ("qg", False, 12, False)


@pytest.mark.parametrize("overrides, needle", [
    ({"codec": "zip"}, "codec must be one of"),
    ({"io_time_slice": "true"}, "io_time_slice must be one of"),
    ({"rounds": 0}, "rounds must be at least 1"),
    ({"lr": "fast"}, "lr: cannot read"),
    ({"nonsense": 1}, "unknown config key"),
    ({"head_block": "maybe"}, "head_block: cannot read"),
    ({"lr": 1e38}, "lr must be at most"),
    ({"betas": [0.9, 1.0]}, r"betas must be two numbers in \[0, 1\)"),
    ({"time_slice_ms": 101}, r"time_slice_ms must be in \[0, 100\]"),
    ({"time_slice_ms": -1}, r"time_slice_ms must be in \[0, 100\]"),
    ({"time_slice_ms": float("nan")}, r"time_slice_ms must be in \[0, 100\]"),
])
def test_bad_values(overrides, needle):
    with pytest.raises(ConfigError, match=needle):
        make_config(None, overrides)


def test_an_unquoted_yaml_word_read_as_a_boolean_says_to_quote_it(tmp_path):
    f = tmp_path / "run.yaml"
    f.write_text("io_time_slice: off\n")
    with pytest.raises(ConfigError, match=r'io_time_slice: got the boolean False .* e.g. io_time_slice: "auto"'):
        make_config(f)


def test_yaml_that_is_not_a_table(tmp_path):
    f = tmp_path / "run.yaml"
    f.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="top level"):
        make_config(f)
