"""The `deca-peer` command."""
from __future__ import annotations

from typing import NoReturn

import click


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="deca-p2p")
def main() -> None:
    """Peer-to-peer full-parameter fine-tuning with DECA over ZeroMQ."""


# --------------------------------------------------------------------------- topology

def _fail(msg: str, code: int = 2) -> NoReturn:
    """One-line error on stderr and exit 2 (bad user input; 3: the training diverged)."""
    click.echo(f"error: {msg}", err=True)
    raise SystemExit(code)


@main.group()
def topology() -> None:
    """Generate and inspect topology files."""


@topology.command("gen")
@click.argument("kind")
@click.argument("args", nargs=-1)
@click.option("--seed", type=int, default=None, help="erdos: first seed to try (default 0).")
@click.option("--p", "p", type=float, default=None, help="erdos: edge probability.")
@click.option("--latency-ms", type=float, default=None, help="Default link latency.")
@click.option("--bandwidth-mbps", type=float, default=None,
              help="Default link bandwidth (unlimited if absent).")
@click.option("--jitter-ms", type=float, default=None, help="Default link jitter.")
def topology_gen(kind: str, args: tuple[str, ...], seed: int | None, p: float | None,
                 latency_ms: float | None, bandwidth_mbps: float | None,
                 jitter_ms: float | None) -> None:
    """Print a generated topology as JSON.

    KIND ARGS: ring N | torus ROWS COLS | complete N | star N | erdos N [P [SEED]] | exp N
    """
    from deca_p2p.topology import TopologyError, generate

    link = {k: v for k, v in (("latency_ms", latency_ms), ("bandwidth_mbps", bandwidth_mbps),
                              ("jitter_ms", jitter_ms)) if v is not None}
    try:
        t = generate(kind, *args, p=p, seed=seed, link=link or None)
    except TopologyError as e:
        _fail(str(e))
    click.echo(t.to_json(), nl=False)


@topology.command("show")
@click.argument("file", type=click.Path(dir_okay=False, path_type=str))
def topology_show(file: str) -> None:
    """Validate FILE and print nodes, weights, SLEM and spectral gap."""
    from deca_p2p.topology import TopologyError, load, summary

    try:
        click.echo(summary(load(file)))
    except TopologyError as e:
        _fail(str(e))


# --------------------------------------------------------------------------- training options

def _train_options(f):
    """Options shared by simulate, start and cluster; each overrides the config file (TOML or YAML)."""
    opts = [
        click.option("--config", "config_file", type=click.Path(dir_okay=False), help="TOML or YAML config file."),
        click.option("--model", "model_path", help="Local Hugging Face causal-LM directory (default: the embedded model)."),
        click.option("--data", "data_path", help="JSONL file of {prompt, completion, label?} (default: the embedded tasks)."),
        click.option("--algo", type=click.Choice(["deca", "dadam", "dsgd"]), help="Optimizer (default deca)."),
        click.option("--discrepancy", type=click.Choice(["paper", "qg", "none"]), help="DECA's h_r reading."),
        click.option("--lr", type=float, help="Learning rate γ."),
        click.option("--rounds", type=int, help="T: rounds over all blocks."),
        click.option("--inner-steps", type=int, help="R: local steps per block activation."),
        click.option("--block-order", type=click.Choice(["ascending", "descending", "random"])),
        click.option("--batch-size", type=int),
        click.option("--alpha", type=float, help="Dirichlet α of the non-IID split."),
        click.option("--seed", type=int),
        click.option("--comm", type=click.Choice(["gossip", "none"]), help="none: local-only baseline."),
        click.option("--codec", type=click.Choice(["raw", "bf16", "fp16", "int8"])),
        click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"])),
        click.option("--device", type=click.Choice(["cpu", "cuda", "auto"])),
        click.option("--threads", type=int, help="torch threads per peer (0: cores / local peers)."),
        click.option("--gossip-every", type=int, help="Exchange after every c-th inner step (default 1)."),
        click.option("--slowdown", type=float, help="Make this peer a straggler: each step takes FACTOR x longer."),
        click.option("--secure", is_flag=True, default=None,
                     help="ZeroMQ CURVE: encrypted links, only the bootstrap file's keys may connect (see `deca-peer keys`)."),
        click.option("--keys-dir", help="Directory of the peers' secret keys for --secure (default keys)."),
        click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help="Any other config key."),
    ]
    for opt in reversed(opts):
        f = opt(f)
    return f


_PATH_KEYS = ("config_file", "model_path", "data_path", "sets")


def _make_config(kw: dict):
    from deca_p2p.config import ConfigError, make_config

    overrides = {k: v for k, v in kw.items() if k not in _PATH_KEYS}
    for item in kw.get("sets") or ():
        key, sep, value = item.partition("=")
        if not sep:
            _fail(f"--set expects KEY=VALUE, got {item!r}")
        overrides[key.strip().replace("-", "_")] = value
    try:
        return make_config(kw.get("config_file"), overrides)
    except ConfigError as e:
        _fail(str(e))


def _load_topology(path: str):
    from deca_p2p.topology import TopologyError, load

    try:
        return load(path)
    except TopologyError as e:
        _fail(str(e))


def _user_errors():
    """Exceptions that mean the user's input is wrong: one line, exit 2."""
    from deca_p2p.config import ConfigError
    from deca_p2p.data import DataError
    from deca_p2p.models import ModelError
    from deca_p2p.keys import KeysError
    from deca_p2p.topology import TopologyError

    return (ConfigError, DataError, ModelError, TopologyError, KeysError)


# --------------------------------------------------------------------------- simulate

@main.command()
@click.option("--topology", "topology_file", required=True, type=click.Path(dir_okay=False), help="Topology JSON.")
@click.option("--run-dir", type=click.Path(file_okay=False), help="Write per-peer JSONL metrics here.")
@_train_options
def simulate(topology_file: str, run_dir: str | None, **kw) -> None:
    """Run the whole network in this one process (the reference the real peers must match)."""
    from deca_p2p.report import print_eval_table
    from deca_p2p.simulate import simulate as run_simulation
    from deca_p2p.trainer import TrainingDiverged

    topo = _load_topology(topology_file)
    cfg = _make_config(kw)
    try:
        res = run_simulation(topo, cfg, model_path=kw.get("model_path"), data_path=kw.get("data_path"),
                             run_dir=run_dir, progress=lambda s: click.echo(s, err=True))
    except _user_errors() as e:
        _fail(str(e))
    except TrainingDiverged as e:
        _fail(str(e), code=3)
    print_eval_table(res.per_peer, initial=res.initial, average_model=res.average_model,
                     title=f"simulate {topo.name}: {cfg.algo}/{cfg.discrepancy}, comm={cfg.comm}, {res.wall_s:.0f} s")


# --------------------------------------------------------------------------- start / cluster

def _env_id() -> int | None:
    import os

    for var in ("SLURM_PROCID", "RANK"):
        if os.environ.get(var, "").strip().isdigit():
            return int(os.environ[var])
    return None


@main.command()
@click.option("--id", "peer_id", type=int, help="This peer's id (default: $SLURM_PROCID or $RANK).")
@click.option("--neighbors", "topology_file", required=True, type=click.Path(dir_okay=False),
              help="Topology JSON: who talks to whom, mixing weights, link emulation.")
@click.option("--bootstrap", "bootstrap_file", type=click.Path(dir_okay=False),
              help="Bootstrap JSON: where each peer listens (default tcp://127.0.0.1:BASE_PORT+id).")
@click.option("--run-dir", default="runs/peer", show_default=True, type=click.Path(file_okay=False))
@click.option("--base-port", type=int, help="Port of peer 0 without a bootstrap file (default 5550).")
@click.option("--exchange-timeout", "exchange_timeout_s", type=float, help="Seconds to wait for a neighbour's block.")
@click.option("--hello-timeout", "hello_timeout_s", type=float, help="Seconds to wait for every neighbour at start-up.")
@_train_options
def start(peer_id, topology_file, bootstrap_file, run_dir, **kw) -> None:
    """Run one peer."""
    from deca_p2p.bootstrap import BootstrapError
    from deca_p2p.peer import PeerArgs, run_peer
    from deca_p2p.trainer import TrainingDiverged
    from deca_p2p.transport import TransportError

    if peer_id is None:
        peer_id = _env_id()
    if peer_id is None:
        _fail("no peer id: pass --id or set SLURM_PROCID or RANK")
    cfg = _make_config(kw)
    args = PeerArgs(peer_id, topology_file, run_dir, cfg, bootstrap_file, kw.get("model_path"), kw.get("data_path"))
    try:
        run_peer(args)
    except (*_user_errors(), BootstrapError, TransportError) as e:
        _fail(f"peer {peer_id}: {e}")
    except TrainingDiverged as e:
        _fail(f"peer {peer_id}: {e}", code=3)


def _passthrough(kw: dict) -> list[str]:
    """Rebuild the command-line options a peer process needs from the parsed ones."""
    out: list[str] = []
    for key, value in kw.items():
        if value is None or key == "sets":
            continue
        flag = {"config_file": "--config", "model_path": "--model", "data_path": "--data",
                "exchange_timeout_s": "--exchange-timeout", "hello_timeout_s": "--hello-timeout"}.get(
            key, "--" + key.replace("_", "-"))
        if isinstance(value, bool):  # an is_flag option: a bare flag when on, nothing when off
            if value:
                out.append(flag)
            continue
        out += [flag, str(value)]
    for item in kw.get("sets") or ():
        out += ["--set", item]
    return out


@main.command()
@click.option("--topology", "topology_file", required=True, type=click.Path(dir_okay=False))
@click.option("--bootstrap", "bootstrap_file", type=click.Path(dir_okay=False))
@click.option("--run-dir", type=click.Path(file_okay=False), help="Default: runs/<topology>-<time>.")
@click.option("--base-port", type=int)
@click.option("--exchange-timeout", "exchange_timeout_s", type=float)
@click.option("--hello-timeout", "hello_timeout_s", type=float)
@click.option("--no-live", is_flag=True, help="No live view (for logs and CI).")
@_train_options
def cluster(topology_file, bootstrap_file, run_dir, no_live, **kw) -> None:
    """Run a whole network on this machine: one `deca-peer start` process per node."""
    import time as _time
    from pathlib import Path

    from deca_p2p.cluster import run_cluster
    from deca_p2p.models import ensure_default_model
    from deca_p2p.runtime import default_threads

    topo = _load_topology(topology_file)
    cfg = _make_config(kw)  # validate once here rather than in n processes
    if not kw.get("model_path"):
        ensure_default_model()  # build it once, not n times in parallel
    if kw.get("threads") is None:
        kw["threads"] = cfg.threads or default_threads(len(topo.nodes))
    if cfg.secure:  # check every peer's keys here: one clear error instead of n failing processes
        from deca_p2p.keys import KeysError, load_curve

        if not bootstrap_file:
            _fail("--secure needs --bootstrap FILE holding every peer's public_key "
                  "(make it with `deca-peer keys --topology T --bootstrap FILE`)")
        try:
            for i in topo.nodes:
                load_curve(cfg.keys_dir, bootstrap_file, i, topo.nodes)
        except KeysError as e:
            _fail(str(e))
    run = Path(run_dir) if run_dir else Path("runs") / f"{topo.name}-{_time.strftime('%Y%m%d-%H%M%S')}"
    extra = ["--bootstrap", bootstrap_file] if bootstrap_file else []
    code = run_cluster(topo, topology_file, run, extra + _passthrough(kw), live=not no_live)
    raise SystemExit(code)


@main.command()
@click.argument("run_dir", type=click.Path(file_okay=False))
def report(run_dir) -> None:
    """Rebuild the final table and plots of RUN_DIR."""
    from pathlib import Path

    from deca_p2p.report import write_report

    if not Path(run_dir).is_dir():
        _fail(f"run directory {run_dir} does not exist")
    if write_report(run_dir) is None:
        _fail(f"{run_dir} holds no peer metrics with an evaluation yet")


@main.command("keys")
@click.option("--topology", "topology_file", required=True, type=click.Path(dir_okay=False))
@click.option("--bootstrap", "bootstrap_file", required=True, type=click.Path(dir_okay=False),
              help="Bootstrap JSON to write the public keys into (created with default endpoints if absent).")
@click.option("--keys-dir", default="keys", show_default=True, type=click.Path(file_okay=False),
              help="Where the secret keys go (mode 0600; never commit them).")
@click.option("--base-port", type=int, default=5550, show_default=True,
              help="Port of peer 0 when the bootstrap file is created.")
@click.option("--force", is_flag=True, help="Make new keypairs even where keys exist.")
def keys_cmd(topology_file, bootstrap_file, keys_dir, base_port, force) -> None:
    """Make a CURVE keypair per peer of TOPOLOGY for --secure; public keys go into the bootstrap file."""
    from deca_p2p.keys import KeysError, make_keys, secret_key_path

    topo = _load_topology(topology_file)
    try:
        publics = make_keys(topo.nodes, keys_dir, bootstrap_file, base_port=base_port, force=force)
    except KeysError as e:
        _fail(str(e))
    click.echo(f"{len(publics)} public keys written to {bootstrap_file}; secret keys in {keys_dir}/ "
               f"({secret_key_path(keys_dir, topo.nodes[0]).name}, ...); copy each host only the secret keys of its own peers")


@main.command("bootstrap")
@click.option("--topology", "topology_file", required=True, type=click.Path(dir_okay=False))
@click.option("--hosts", default="127.0.0.1", show_default=True, help="Comma-separated hosts, assigned round-robin.")
@click.option("--base-port", type=int, default=5550, show_default=True)
def bootstrap_cmd(topology_file, hosts, base_port) -> None:
    """Print a bootstrap file for TOPOLOGY's peers on HOSTS."""
    import json

    from deca_p2p import bootstrap

    topo = _load_topology(topology_file)
    try:
        doc = bootstrap.make(topo.nodes, [h.strip() for h in hosts.split(",") if h.strip()], base_port)
    except bootstrap.BootstrapError as e:
        _fail(str(e))
    click.echo(json.dumps(doc, indent=2))


if __name__ == "__main__":
    main()
