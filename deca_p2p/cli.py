"""The `deca-peer` command: the group, the commands that train (simulate, start, cluster) and how the program
starts and ends; the commands around a run are in cli_tools.py and cli_plan.py."""
from __future__ import annotations

import contextlib
import gc
import os
import sys

import click

from .cli_common import fail as _fail, load_topology as _load_topology, make_run_dir as _make_run_dir
from .cli_common import user_errors as _user_errors


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="deca-p2p")
def main() -> None:
    """Peer-to-peer full-parameter fine-tuning with DECA over ZeroMQ."""


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
                          "(default 30; 0: the kernel's default throughout). ZeroMQ's I/O thread gets it too where no link "
                          "is emulated (--set io_time_slice=auto|always|never)."),
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
    if run_dir:
        _make_run_dir(run_dir)
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
        v = os.environ.get(var, "").strip()
        if v.isascii() and v.isdigit():  # "²".isdigit() is True, and int() refuses it
            return int(v)
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
    try:  # before the run directory exists: a mistyped id leaves nothing behind
        _load_topology(topology_file).check_peer(peer_id)
    except _user_errors() as e:
        _fail(f"peer {peer_id}: {e}")
    _make_run_dir(run_dir)
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
    _check_endpoints(topo, bootstrap_file, cfg.base_port)  # likewise: one line, not n failing peers
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
        _make_run_dir(run)
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


def _check_endpoints(topo, bootstrap_file, base_port: int) -> None:
    """Every peer's endpoint, from the bootstrap file or base_port + id, before any peer starts."""
    from deca_p2p import bootstrap
    from deca_p2p.topology import TopologyError, check_ids

    try:
        if bootstrap_file:
            check_ids(topo, bootstrap.load(bootstrap_file).keys(), what=f"bootstrap file {bootstrap_file}")
        else:
            bootstrap.default_endpoints(topo.nodes, base_port)
    except (bootstrap.BootstrapError, TopologyError) as e:
        _fail(str(e))


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


# --------------------------------------------------------------------------- the other commands (cli_tools.py, cli_plan.py)

def _add_commands() -> None:
    from .cli_plan import plan_cmd
    from .cli_tools import average, bootstrap_cmd, keys_cmd, report, split, topology

    for cmd in (topology, split, report, keys_cmd, bootstrap_cmd, plan_cmd, average):
        main.add_command(cmd)


_add_commands()


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
