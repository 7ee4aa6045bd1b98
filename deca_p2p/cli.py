"""The `deca-peer` command."""
from __future__ import annotations

import contextlib
import gc
import os
import sys
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
        click.option("--data", "data_path", type=click.Path(dir_okay=False),
                     help="JSONL records ({prompt, completion} | {messages} | {text}, each with an optional label). "
                          "start: this peer's own file, all of it trains; simulate/cluster: one file split over the "
                          "peers (default: the embedded tasks)."),
        click.option("--algo", type=click.Choice(["deca", "dadam", "dsgd", "declora"]),
                     help="Optimizer (default deca); declora: LoRA adapters (peft) + Adam + gossip."),
        click.option("--discrepancy", type=click.Choice(["paper", "qg", "consensus", "none"]), help="DECA's h_r reading."),
        click.option("--lr", type=float, help="Learning rate γ."),
        click.option("--rounds", type=int, help="T: rounds over all blocks."),
        click.option("--inner-steps", type=int, help="R: local steps per block activation."),
        click.option("--block-order", type=click.Choice(["ascending", "descending", "random"])),
        click.option("--batch-size", type=int),
        click.option("--grad-accum", type=int, help="Micro-batches per local step (gradient accumulation)."),
        click.option("--max-len", type=int, help="Tokens per sequence (default: the model's limit, at most 1024 on CPU)."),
        click.option("--eval-batch-size", type=int, help="Sequences per evaluation batch (default: --batch-size)."),
        click.option("--lr-schedule", type=click.Choice(["constant", "linear", "cosine"]),
                     help="Learning-rate schedule over the whole run (transformers.get_scheduler)."),
        click.option("--warmup-steps", type=int, help="Linear warm-up over the first N local steps."),
        click.option("--warmup-ratio", type=float, help="Warm-up over this share of the run's local steps."),
        click.option("--weight-decay", type=float, help="Decoupled weight decay (AdamW; matrices only)."),
        click.option("--max-grad-norm", type=float, help="Clip the active block's gradient norm (0: off)."),
        click.option("--gradient-checkpointing/--no-gradient-checkpointing", default=None,
                     help="Recompute activations in backward (less memory, more compute)."),
        click.option("--alpha", type=float, help="Dirichlet α of the non-IID split."),
        click.option("--seed", type=int),
        click.option("--comm", type=click.Choice(["gossip", "none"]), help="none: local-only baseline."),
        click.option("--codec", type=click.Choice(["raw", "bf16", "fp16", "int8"])),
        click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"])),
        click.option("--device", type=click.Choice(["cpu", "cuda", "auto"])),
        click.option("--threads", type=int, help="torch threads per peer (0: cores / local peers)."),
        click.option("--time-slice-ms", type=float,
                     help="CPU time slice a peer's training thread asks Linux for, the kernel's default while it waits for a block "
                          "(default 30; 0: the kernel's default throughout)."),
        click.option("--gossip-every", type=int, help="Exchange after every c-th inner step (default 1)."),
        click.option("--overlap/--no-overlap", default=None,
                     help="Compute each step's gradient while its exchange is in flight (one-step-delayed gossip)."),
        click.option("--slowdown", type=float, help="Make this peer a straggler: each step takes FACTOR x longer."),
        click.option("--robust", type=click.Choice(["none", "clip", "trim"]),
                     help="Mixing robust to a bad neighbour: clip (self-centred clipping), trim (trimmed mean)."),
        click.option("--robust-tau", type=float,
                     help="clip radius as a share of the peer's own block norm (0: automatic, the default)."),
        click.option("--dp-clip", type=float,
                     help="Differential privacy: clip each release's block change to this L2 norm C (0: off)."),
        click.option("--dp-noise", type=float,
                     help="Differential privacy: Gaussian noise of std SIGMA x C on each released block (needs --dp-clip)."),
        click.option("--dp-delta", type=float, help="δ of the reported privacy spent (ε, δ) (default 1e-5)."),
        click.option("--secure", is_flag=True, default=None,
                     help="ZeroMQ CURVE: encrypted links, only the bootstrap file's keys may connect (see `deca-peer keys`)."),
        click.option("--keys-dir", help="Directory of the peers' secret keys for --secure (default keys)."),
        click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help="Any other config key."),
    ]
    for opt in reversed(opts):
        f = opt(f)
    return f


_PATH_KEYS = ("config_file", "model_path", "data_path", "eval_path", "data_dir", "sets")


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

    from deca_p2p.checkpoint import CheckpointError

    return (ConfigError, DataError, ModelError, TopologyError, KeysError, CheckpointError)


# --------------------------------------------------------------------------- simulate

@main.command()
@click.option("--topology", "topology_file", required=True, type=click.Path(dir_okay=False), help="Topology JSON.")
@click.option("--run-dir", type=click.Path(file_okay=False), help="Write per-peer JSONL metrics here.")
@click.option("--data-dir", "data_dir", type=click.Path(file_okay=False),
              help="Per-peer files written by `deca-peer split` (peer-<id>.jsonl, eval.jsonl).")
@click.option("--save", is_flag=True, help="Write every peer's final checkpoint under the run directory, as cluster does.")
@_train_options
def simulate(topology_file: str, run_dir: str | None, save: bool, **kw) -> None:
    """Run the whole network in this one process (the reference the real peers must match)."""
    import time as _time

    from deca_p2p.report import epsilon_cell, print_eval_table
    from deca_p2p.simulate import simulate as run_simulation
    from deca_p2p.trainer import TrainingDiverged

    topo = _load_topology(topology_file)
    cfg = _make_config(kw)
    if kw.get("data_dir") and kw.get("data_path"):
        _fail("give --data FILE (split over the peers) or --data-dir DIR (one file per peer), not both")
    if save and not run_dir:
        run_dir = f"runs/{topo.name}-simulate-{_time.strftime('%Y%m%d-%H%M%S')}"
    try:
        res = run_simulation(topo, cfg, model_path=kw.get("model_path"), data_path=kw.get("data_path"),
                             data_dir=kw.get("data_dir"), run_dir=run_dir, save=save,
                             progress=lambda s: click.echo(s, err=True))
    except _user_errors() as e:
        _fail(str(e))
    except TrainingDiverged as e:
        _fail(str(e), code=3)
    print_eval_table(res.per_peer, initial=res.initial, average_model=res.average_model, labels=res.labels,
                     extra={i: {"ε": epsilon_cell(p)} for i, p in res.privacy.items()},
                     title=f"simulate {topo.name}: {cfg.algo}/{cfg.discrepancy}, comm={cfg.comm}, {res.wall_s:.0f} s")
    if save:
        click.echo(f"checkpoints: {run_dir}/peer-<id>/checkpoint/latest")


# --------------------------------------------------------------------------- start / cluster

def _env_id() -> int | None:
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
@click.option("--eval-data", "eval_path", type=click.Path(dir_okay=False),
              help="This peer's own held-out JSONL (default: a share of --data, see eval_fraction).")
@click.option("--no-initial-eval", is_flag=True,
              help="Do not evaluate the starting model (cluster: a peer whose eval file and model another peer "
                   "already evaluates).")
@_train_options
def start(peer_id, topology_file, bootstrap_file, run_dir, no_initial_eval, **kw) -> None:
    """Run one peer."""
    with _collector_paused():  # a peer started on its own imports torch and transformers here (forked ones have them)
        from deca_p2p.bootstrap import BootstrapError
        from deca_p2p.launch import import_model_module
        from deca_p2p.peer import PeerArgs, run_peer
        from deca_p2p.trainer import TrainingDiverged
        from deca_p2p.transport import TransportError

        import_model_module(kw.get("model_path"))

    if peer_id is None:
        peer_id = _env_id()
    if peer_id is None:
        _fail("no peer id: pass --id or set SLURM_PROCID or RANK")
    cfg = _make_config(kw)
    args = PeerArgs(peer_id, topology_file, run_dir, cfg, bootstrap_file, kw.get("model_path"), kw.get("data_path"),
                    kw.get("eval_path"), initial_eval=not no_initial_eval)
    try:
        run_peer(args)
    except (*_user_errors(), BootstrapError, TransportError) as e:
        _fail(f"peer {peer_id}: {e}")
    except TrainingDiverged as e:
        _fail(f"peer {peer_id}: {e}", code=3)
    # Everything the run wrote is closed and on disk (metrics, checkpoints: atomic; the transport: closed)
    _exit_without_teardown(0)


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
            elif key == "gradient_checkpointing":  # an on/off option
                out.append("--no-gradient-checkpointing")
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
@click.option("--data-dir", "data_dir", type=click.Path(file_okay=False),
              help="Per-peer files (peer-<id>.jsonl, and eval.jsonl or peer-<id>.eval.jsonl): each peer reads its own.")
@click.option("--no-average", is_flag=True, help="Do not write RUN/average (the network average of the final checkpoints).")
@_train_options
def cluster(topology_file, bootstrap_file, run_dir, no_live, no_average, **kw) -> None:
    """Run a whole network on this machine: one `deca-peer start` process per node."""
    import time as _time
    from pathlib import Path

    from deca_p2p.cluster import run_cluster
    from deca_p2p.launch import Launcher

    topo = _load_topology(topology_file)
    cfg = _make_config(kw)  # validate once here rather than in n processes
    # the peers' fork server starts importing torch and transformers now, while we check and split the data. Nothing
    # above imports torch: its 1.3 s here would come before the server's import, with the other core idle
    launcher = Launcher(kw.get("model_path"), ["peft"] if cfg.algo == "declora" else [])
    try:
        from deca_p2p.models import ensure_default_model
        from deca_p2p.runtime import default_threads

        if not kw.get("model_path"):
            ensure_default_model()  # build it once, not n times in parallel
        if not kw.get("threads"):  # 0 too: the peers' environment holds OpenMP at 1 thread until they set theirs
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
        try:
            files = _cluster_data(topo, cfg, run, kw.pop("data_dir", None), kw.pop("data_path", None))
        except _user_errors() as e:
            _fail(str(e))
        per_peer = {i: ["--data", str(train)] + (["--eval-data", str(ev)] if ev else []) for i, (train, ev) in files.items()}
        # peers sharing one eval file would all score the same starting model on it: the first one does (as simulate)
        first_with = {}
        for i, (_, ev) in sorted(files.items()):
            if ev and first_with.setdefault(ev, i) != i:
                per_peer[i].append("--no-initial-eval")
        evals = sorted({ev for _, ev in files.values() if ev})
        code = run_cluster(topo, topology_file, run, extra + _passthrough(kw), live=not no_live, per_peer_args=per_peer,
                           average_eval=None if no_average else evals, launcher=launcher)
    finally:
        launcher.close()
    # the peers, the averaging process and the fork server have exited; the report and plots are written
    _exit_without_teardown(code)
    raise SystemExit(code)


def _cluster_data(topo, cfg, run, data_dir, data_path) -> dict:
    """Each peer's own (training file, eval file or None). One file or the embedded tasks are first split into RUN/data, the way
    `deca-peer split` does, so every peer reads only its own shard, exactly as in a real deployment."""
    from deca_p2p.data import load_jsonl
    from deca_p2p.runtime import embedded_data, shard_paths, split_examples, write_shards

    if data_dir and data_path:
        _fail("give --data FILE (split over the peers) or --data-dir DIR (one file per peer), not both")
    if not data_dir:
        if data_path:
            shards, evals = split_examples(load_jsonl(data_path), topo.nodes, cfg.alpha, cfg.seed, cfg.eval_fraction,
                                           min_size=cfg.batch_size)
        else:
            shards, evals = embedded_data(cfg, topo.nodes)
        data_dir = write_shards(run / "data", shards, evals)
    return {i: shard_paths(data_dir, i) for i in topo.nodes}


@main.command()
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--peers", type=int, help="Number of peers (ids 0..N-1).")
@click.option("--topology", "topology_file", type=click.Path(dir_okay=False), help="Take the peer ids from a topology.")
@click.option("--alpha", type=float, default=0.25, show_default=True, help="Dirichlet concentration over `label`.")
@click.option("--eval-fraction", type=float, default=0.1, show_default=True,
              help="Share held out (per label) as DIR/eval.jsonl.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--min-records", type=int, default=16, show_default=True,
              help="Redraw the split until every peer has this many records (one batch).")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False))
def split(file, peers, topology_file, alpha, eval_fraction, seed, min_records, out_dir) -> None:
    """Split FILE over peers for a simulation: OUT/peer-<id>.jsonl (Dirichlet over `label`) and OUT/eval.jsonl."""
    from collections import Counter

    from deca_p2p.data import DataError, load_jsonl
    from deca_p2p.runtime import split_examples, write_shards

    if (peers is None) == (topology_file is None):
        _fail("give --peers N or --topology FILE")
    ids = _load_topology(topology_file).nodes if topology_file else list(range(peers))
    if not ids:
        _fail(f"--peers must be at least 1, got {peers}")
    if not (alpha > 0) or not (0 <= eval_fraction < 1):
        _fail(f"need --alpha > 0 and 0 <= --eval-fraction < 1, got {alpha} and {eval_fraction}")
    try:
        shards, evals = split_examples(load_jsonl(file), ids, alpha, seed, eval_fraction, min_size=min_records)
        write_shards(out_dir, shards, evals)
    except (DataError, OSError) as e:
        _fail(str(e))
    for i, ex in shards.items():
        labels = ", ".join(f"{k} {v}" for k, v in sorted(Counter(e.label for e in ex).items()))
        click.echo(f"{out_dir}/peer-{i}.jsonl: {len(ex)} records ({labels})")
    click.echo(f"{out_dir}/eval.jsonl: {len(evals)} records")


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
@click.option("--id", "peer_id", type=int,
              help="Make only this peer's keypair (on its own machine) and print its public key.")
@click.option("--topology", "topology_file", type=click.Path(dir_okay=False),
              help="All peers at once: a keypair for every node of this topology.")
@click.option("--bootstrap", "bootstrap_file", type=click.Path(dir_okay=False),
              help="With --topology: bootstrap JSON to write the public keys into (created with default endpoints if absent).")
@click.option("--keys-dir", default="keys", show_default=True,
              help="Where the secret keys go (mode 0600; never commit them).")
@click.option("--base-port", type=int, default=5550, show_default=True,
              help="Port of peer 0 when the bootstrap file is created.")
@click.option("--force", is_flag=True, help="Make new keypairs even where keys exist.")
def keys_cmd(peer_id, topology_file, bootstrap_file, keys_dir, base_port, force) -> None:
    """Make CURVE keypairs for --secure.

    \b
    --id I: one peer's keypair, made on the machine that runs peer I; its secret key stays in
            KEYS_DIR/peer-I.key_secret (0600) and only the z85 public key is printed (stdout, one line), for
            `deca-peer bootstrap --file F --set-key I=<key>`.
    --topology T --bootstrap B: every peer's keypair here, public keys written into B.
    """
    from deca_p2p.keys import KeysError, make_keypair, make_keys, secret_key_path

    if peer_id is not None:
        if topology_file or bootstrap_file:
            _fail("--id makes one peer's keypair and writes no bootstrap file: drop --topology/--bootstrap "
                  "(put the printed key into the file with `deca-peer bootstrap --file F --set-key I=KEY`)")
        if peer_id < 0:
            _fail(f"--id {peer_id} is negative")
        try:
            public, created = make_keypair(peer_id, keys_dir, force=force)
        except KeysError as e:
            _fail(str(e))
        spath = secret_key_path(keys_dir, peer_id)
        click.echo(f"peer {peer_id}: {'new keypair' if created else 'existing keypair kept (--force makes a new one)'}; "
                   f"secret key in {spath} (keep it on this machine); public key on stdout, for "
                   f"`deca-peer bootstrap --file F --set-key {peer_id}=KEY`", err=True)
        click.echo(public.decode("ascii"))
        return
    if not topology_file or not bootstrap_file:
        _fail("give --id I (one peer's keypair, on its own machine) or --topology T --bootstrap B (every peer's)")
    topo = _load_topology(topology_file)
    try:
        publics = make_keys(topo.nodes, keys_dir, bootstrap_file, base_port=base_port, force=force)
    except KeysError as e:
        _fail(str(e))
    click.echo(f"{len(publics)} public keys written to {bootstrap_file}; secret keys in {keys_dir}/ "
               f"({secret_key_path(keys_dir, topo.nodes[0]).name}, ...); copy each host only the secret keys of its own peers")


@main.command("bootstrap")
@click.option("--topology", "topology_file", type=click.Path(dir_okay=False),
              help="Print a new bootstrap file for this topology's peers on --hosts.")
@click.option("--hosts", help="Comma-separated hosts, assigned round-robin (default 127.0.0.1).")
@click.option("--base-port", type=int, default=5550, show_default=True)
@click.option("--file", "bootstrap_file", type=click.Path(dir_okay=False),
              help="Edit this existing bootstrap file in place (with --set-key / --endpoint).")
@click.option("--set-key", "set_keys", multiple=True, metavar="I=KEY",
              help="Put peer I's z85 public key (from `deca-peer keys --id I`) into --file; repeatable.")
@click.option("--endpoint", "set_endpoints", multiple=True, metavar="I=tcp://HOST:PORT",
              help="Set peer I's endpoint in --file (adds peer I if it has no entry); repeatable.")
def bootstrap_cmd(topology_file, hosts, base_port, bootstrap_file, set_keys, set_endpoints) -> None:
    """Print a bootstrap file for TOPOLOGY's peers on HOSTS, or edit one (--file) with peers' public keys.

    \b
    deca-peer bootstrap --topology T --hosts H1,H2 > peers/x.json
    deca-peer bootstrap --file peers/x.json --set-key 3="$(deca-peer keys --id 3)" [--endpoint 3=tcp://host:port]
    """
    import json

    from deca_p2p import bootstrap

    def _id_pairs(items: tuple[str, ...], option: str) -> dict[int, str]:
        """`I=VALUE` items of a repeatable option as {I: VALUE}; one-line error (exit 2) for a bad one."""
        out: dict[int, str] = {}
        for item in items:
            key, sep, value = item.partition("=")  # z85 keys may contain '=', peer ids never do
            key, value = key.strip(), value.strip()
            if not sep or not key.isdigit() or not value:
                _fail(f"{option} expects I=VALUE with a peer id I, got {item!r}")
            i = int(key)
            if out.get(i, value) != value:
                _fail(f"{option} gives peer {i} two different values")
            out[i] = value
        return out

    if bootstrap_file or set_keys or set_endpoints:
        from deca_p2p.keys import KeysError, set_public_keys

        if topology_file or hosts:
            _fail("--file/--set-key/--endpoint edit an existing bootstrap file; --topology/--hosts print a new one: "
                  "give one or the other")
        if not bootstrap_file:
            _fail("--set-key/--endpoint need --file FILE (the bootstrap file to edit)")
        if not set_keys and not set_endpoints:
            _fail(f"nothing to change in {bootstrap_file}: give --set-key I=KEY and/or --endpoint I=tcp://host:port")
        new_keys, new_endpoints = _id_pairs(set_keys, "--set-key"), _id_pairs(set_endpoints, "--endpoint")
        try:
            entries = set_public_keys(bootstrap_file, new_keys, new_endpoints)
        except KeysError as e:
            _fail(str(e))
        done = [f"public_key of peer{'s' if len(new_keys) > 1 else ''} {', '.join(map(str, sorted(new_keys)))}"] \
            if new_keys else []
        done += [f"endpoint of peer {i} ({ep})" for i, ep in sorted(new_endpoints.items())]
        missing = sorted(i for i, e in entries.items() if "public_key" not in e)
        click.echo(f"{bootstrap_file}: set {'; '.join(done)}"
                   + (f"; peers still without a public_key: {', '.join(map(str, missing))}" if missing else
                      f"; all {len(entries)} peers have a public_key"))
        return
    if not topology_file:
        _fail("give --topology T [--hosts H,...] to print a new bootstrap file, "
              "or --file F --set-key I=KEY to edit one")
    hosts = hosts or "127.0.0.1"
    topo = _load_topology(topology_file)
    try:
        doc = bootstrap.make(topo.nodes, [h.strip() for h in hosts.split(",") if h.strip()], base_port)
    except bootstrap.BootstrapError as e:
        _fail(str(e))
    click.echo(json.dumps(doc, indent=2))


@main.command("plan")
@click.option("--model", "model_spec", required=True,
              help="A preset (llama-3-8b, llama-3.2-1b, qwen2.5-0.5b, ...) or an HF config.json / model directory.")
@click.option("--topology", "topology_file", required=True, type=click.Path(dir_okay=False),
              help="Topology JSON with its links (latency_ms, bandwidth_mbps).")
@click.option("--algo", "method", default="deca", show_default=True,
              help="Method of the per-peer table: deca, dadam or declora (all three are compared).")
@click.option("--codec", default="raw", show_default=True, help="raw, bf16, fp16 or int8.")
@click.option("--inner-steps", default="8", show_default=True, help="R: local steps per block activation.")
@click.option("--rounds", default="24", show_default=True, help="T: rounds over all blocks.")
@click.option("--batch-size", default="16", show_default=True, help="Sequences per local step.")
@click.option("--seq-len", default="512", show_default=True, help="Tokens per sequence.")
@click.option("--dtype", default=None, help="Working dtype (default: bfloat16 on a GPU, float32 on a CPU).")
@click.option("--gossip-every", default="1", show_default=True, help="Exchange after every c-th inner step.")
@click.option("--layers-per-block", default="1", show_default=True)
@click.option("--lora-rank", default="8", show_default=True, help="Dec-LoRA's rank.")
@click.option("--embeddings-block", is_flag=True, help="Train the embeddings as an extra DECA block.")
@click.option("--head-block", is_flag=True, help="Train the final norm + LM head as an extra DECA block.")
@click.option("--gradient-checkpointing", is_flag=True)
@click.option("--shared-uplink", is_flag=True,
              help="A peer's links share one access link (degree x bytes / bandwidth); default: independent links, "
                   "as the emulator runs them.")
@click.option("--peers-per-core", default="1", show_default=True,
              help="Peers sharing each core of a host (make cluster here: 8 peers / 2 cores = 4); the compute speed "
                   "is then one peer's on one core.")
@click.option("--device", "device_class", default="gpu", show_default=True,
              help="Default speeds of a device class: cpu, gpu (H100/H200), consumer-gpu (RTX 3090/4090).")
@click.option("--calibrate", is_flag=True, help="Measure FLOP/s and memory bandwidth on this machine (auto: cuda or cpu).")
@click.option("--flops", default=None, help="Effective FLOP/s of a training step (overrides the device class).")
@click.option("--mem-bw", default=None, help="Memory bandwidth in bytes/s (overrides the device class).")
@click.option("--json", "as_json", is_flag=True, help="Print the whole prediction as JSON.")
def plan_cmd(model_spec, topology_file, method, codec, inner_steps, rounds, batch_size, seq_len, dtype, gossip_every,
             layers_per_block, lora_rank, embeddings_block, head_block, gradient_checkpointing, shared_uplink,
             peers_per_core, device_class, calibrate, flops, mem_bw, as_json) -> None:
    """Predict what a run costs: time per step / round / run, traffic and memory per peer (a model, not a run).

    \b
    deca-peer plan --model llama-3-8b --topology topologies/exp16.json --codec bf16 --flops 4e14
    deca-peer plan --model /models/my-llama/config.json --topology ring8.json --calibrate --json
    """
    import dataclasses
    import json

    from deca_p2p import plan

    def number(name: str, value, kind=int):
        try:
            v = kind(value)
        except (TypeError, ValueError):
            _fail(f"--{name} must be a {'positive integer' if kind is int else 'positive number'}, got {value!r}")
        if not (v > 0) or (kind is float and v == float("inf")):
            _fail(f"--{name} must be {'a positive integer' if kind is int else 'a positive finite number'}, got {value!r}")
        return v

    ints = {k: number(k.replace("_", "-"), v) for k, v in
            (("inner_steps", inner_steps), ("rounds", rounds), ("batch_size", batch_size), ("seq_len", seq_len),
             ("gossip_every", gossip_every), ("layers_per_block", layers_per_block), ("lora_rank", lora_rank))}
    if calibrate and flops is not None:
        _fail("give --calibrate (measure here) or --flops X (a given speed), not both")
    share = number("peers-per-core", peers_per_core, float)
    if share < 1:
        _fail(f"--peers-per-core must be at least 1 (1: every peer has a core of its own), got {peers_per_core!r}")
    topo = _load_topology(topology_file)
    try:
        arch = plan.load_arch(model_spec)
        if calibrate:
            device = plan.calibrate("auto")
        else:
            if device_class not in plan.DEVICES:
                _fail(f"--device must be one of {', '.join(plan.DEVICES)}, got {device_class!r}")
            device = plan.DEVICES[device_class]
        if flops is not None:
            device = dataclasses.replace(device, flops=number("flops", flops, float), kind=f"given: {device.kind}")
        if mem_bw is not None:
            device = dataclasses.replace(device, mem_bw=number("mem-bw", mem_bw, float))
        inp = plan.PlanInputs(method=method, codec=codec, dtype=dtype or ("bfloat16" if device.on_gpu else "float32"),
                              embeddings_block=embeddings_block, head_block=head_block,
                              gradient_checkpointing=gradient_checkpointing, shared_uplink=shared_uplink,
                              peers_per_core=share, **ints)
        result = plan.make_plan(arch, topo, inp, device)
    except plan.PlanError as e:
        _fail(str(e))
    if as_json:
        click.echo(json.dumps(result, indent=1))
    else:
        plan.render(result)


@main.command()
@click.argument("run_dir")
@click.option("--out", help="Directory to write the averaged Hugging Face model to (required).")
@click.option("--weighted", is_flag=True, help="Weight each peer by its train_examples (default: uniform mean).")
def average(run_dir, out, weighted) -> None:
    """Average the peers' final checkpoints of RUN_DIR into one Hugging Face model (with tokenizer).

    --out may be new, empty, or a previous average (replaced); anything else is refused.
    """
    from deca_p2p.average import AverageError, average_run

    if not out:
        _fail("--out DIR is required: where to write the averaged model")
    info: dict = {}
    try:
        average_run(run_dir, out, weighted=weighted, info=info)
    except AverageError as e:
        _fail(str(e))
    peers = info["peers"]
    click.echo(f"averaged {len(peers)} peers ({info['weighting']}) into {out} "
               f"({info['parameters']:,} parameters, {info['dtype']}{', with tokenizer' if info['tokenizer'] else ''})")
    for i, p in peers.items():
        n = f", train_examples {p['train_examples']}" if "train_examples" in p else ""
        click.echo(f"  peer {i}: weight {p['weight']:.6g}{n}  {p['checkpoint']}")
    acts = {i: p.get("activation") for i, p in peers.items()}
    if len(set(acts.values())) > 1:
        where = ", ".join(f"peer {i}: {a}" for i, a in acts.items())
        click.echo(f"warning: the peers' checkpoints are from different activations ({where}): "
                   "some peer stopped early", err=True)


_OWN_PROCESS = False  # True when this process is the `deca-peer` program itself, not a caller of `main` (tests)


@contextlib.contextmanager
def _collector_paused():
    """Import with Python's cyclic garbage collector paused: torch and transformers make hundreds of thousands of
    objects that all live on, and collecting over them was 0.7 s of a 4.4 s import here (the fork server does the
    same: preload_start.py). In the `deca-peer` program itself the imported objects are then frozen, as in a peer
    forked from that server; a caller of `main` (tests) keeps its collector as it was."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if _OWN_PROCESS:
            gc.freeze()
        if was:
            gc.enable()


def _exit_without_teardown(code: int) -> None:
    """End this process now with `code`, when it is the `deca-peer` program itself and everything it wrote is
    closed. Tearing down an interpreter that holds torch and transformers took 1.35 s of CPU (strace of one peer;
    0.5 s for `cluster`): skip it, as multiprocessing's children (cluster's peers) already do. Returns, doing
    nothing, under a caller of `main` (tests), a profiler or coverage, which write their results at exit."""
    if not _OWN_PROCESS or sys.getprofile() is not None or sys.gettrace() is not None:
        return
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe: nothing more can reach it anyway
            pass
    os._exit(code)


def entry() -> None:
    """The `deca-peer` program: `start` first re-executes itself with huge-page malloc (peer_env.py), then click."""
    global _OWN_PROCESS
    from .peer_env import maybe_reexec

    maybe_reexec()
    _OWN_PROCESS = True
    main()


if __name__ == "__main__":
    entry()
