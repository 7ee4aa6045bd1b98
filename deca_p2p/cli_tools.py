"""`deca-peer` commands around a run: topology files, splitting a data file over peers, CURVE keys and bootstrap
files before it; its report and the network-average model after it. cli.py adds them to `deca-peer`."""
from __future__ import annotations

import click

from .cli_common import fail, load_topology


@click.group()
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
        fail(str(e))
    click.echo(t.to_json(), nl=False)


@topology.command("show")
@click.argument("file", type=click.Path(dir_okay=False, path_type=str))
def topology_show(file: str) -> None:
    """Validate FILE and print nodes, weights, SLEM and spectral gap."""
    from deca_p2p.topology import TopologyError, load, summary

    try:
        click.echo(summary(load(file)))
    except TopologyError as e:
        fail(str(e))


@click.command()
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
        fail("give --peers N or --topology FILE")
    ids = load_topology(topology_file).nodes if topology_file else list(range(peers))
    if not ids:
        fail(f"--peers must be at least 1, got {peers}")
    if not (alpha > 0) or not (0 <= eval_fraction < 1):
        fail(f"need --alpha > 0 and 0 <= --eval-fraction < 1, got {alpha} and {eval_fraction}")
    try:
        shards, evals = split_examples(load_jsonl(file), ids, alpha, seed, eval_fraction, min_size=min_records)
        write_shards(out_dir, shards, evals)
    except (DataError, OSError) as e:
        fail(str(e))
    for i, ex in shards.items():
        labels = ", ".join(f"{k} {v}" for k, v in sorted(Counter(e.label for e in ex).items()))
        click.echo(f"{out_dir}/peer-{i}.jsonl: {len(ex)} records ({labels})")
    click.echo(f"{out_dir}/eval.jsonl: {len(evals)} records")


@click.command()
@click.argument("run_dir", type=click.Path(file_okay=False))
def report(run_dir) -> None:
    """Rebuild the final table and plots of RUN_DIR."""
    from pathlib import Path

    from deca_p2p.report import ReportError, check_run, write_report

    if not Path(run_dir).is_dir():
        fail(f"run directory {run_dir} does not exist")
    try:
        check_run(run_dir)  # the fields the report reads, in every record: nothing printed before an error
        table = write_report(run_dir)
    except ReportError as e:
        fail(str(e))
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        # a record check_run lets through yet the report cannot use (a valid run never gets here: tests report one)
        fail(f"{run_dir}: a record this version cannot read ({type(e).__name__}: {' '.join(str(e).split())[:200]})")
    except OSError as e:  # an unreadable metrics file, a read-only run directory (summary.md, plots/)
        fail(f"{e.filename or run_dir}: {e.strerror or e}")
    if table is None:
        fail(f"{run_dir} holds no peer metrics with an evaluation yet")


@click.command("keys")
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
            fail("--id makes one peer's keypair and writes no bootstrap file: drop --topology/--bootstrap "
                  "(put the printed key into the file with `deca-peer bootstrap --file F --set-key I=KEY`)")
        if peer_id < 0:
            fail(f"--id {peer_id} is negative")
        try:
            public, created = make_keypair(peer_id, keys_dir, force=force)
        except KeysError as e:
            fail(str(e))
        spath = secret_key_path(keys_dir, peer_id)
        click.echo(f"peer {peer_id}: {'new keypair' if created else 'existing keypair kept (--force makes a new one)'}; "
                   f"secret key in {spath} (keep it on this machine); public key on stdout, for "
                   f"`deca-peer bootstrap --file F --set-key {peer_id}=KEY`", err=True)
        click.echo(public.decode("ascii"))
        return
    if not topology_file or not bootstrap_file:
        fail("give --id I (one peer's keypair, on its own machine) or --topology T --bootstrap B (every peer's)")
    topo = load_topology(topology_file)
    try:
        publics = make_keys(topo.nodes, keys_dir, bootstrap_file, base_port=base_port, force=force)
    except KeysError as e:
        fail(str(e))
    click.echo(f"{len(publics)} public keys written to {bootstrap_file}; secret keys in {keys_dir}/ "
               f"({secret_key_path(keys_dir, topo.nodes[0]).name}, ...); copy each host only the secret keys of its own peers")


@click.command("bootstrap")
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
            if not sep or not (key.isascii() and key.isdigit()) or not value:  # "²".isdigit(), but int("²") fails
                fail(f"{option} expects I=VALUE with a peer id I, got {item!r}")
            i = int(key)
            if out.get(i, value) != value:
                fail(f"{option} gives peer {i} two different values")
            out[i] = value
        return out

    if bootstrap_file or set_keys or set_endpoints:
        from deca_p2p.keys import KeysError, set_public_keys

        if topology_file or hosts:
            fail("--file/--set-key/--endpoint edit an existing bootstrap file; --topology/--hosts print a new one: "
                  "give one or the other")
        if not bootstrap_file:
            fail("--set-key/--endpoint need --file FILE (the bootstrap file to edit)")
        if not set_keys and not set_endpoints:
            fail(f"nothing to change in {bootstrap_file}: give --set-key I=KEY and/or --endpoint I=tcp://host:port")
        new_keys, new_endpoints = _id_pairs(set_keys, "--set-key"), _id_pairs(set_endpoints, "--endpoint")
        try:
            entries = set_public_keys(bootstrap_file, new_keys, new_endpoints)
        except KeysError as e:
            fail(str(e))
        done = [f"public_key of peer{'s' if len(new_keys) > 1 else ''} {', '.join(map(str, sorted(new_keys)))}"] \
            if new_keys else []
        done += [f"endpoint of peer {i} ({ep})" for i, ep in sorted(new_endpoints.items())]
        missing = sorted(i for i, e in entries.items() if "public_key" not in e)
        click.echo(f"{bootstrap_file}: set {'; '.join(done)}"
                   + (f"; peers still without a public_key: {', '.join(map(str, missing))}" if missing else
                      f"; all {len(entries)} peers have a public_key"))
        return
    if not topology_file:
        fail("give --topology T [--hosts H,...] to print a new bootstrap file, "
              "or --file F --set-key I=KEY to edit one")
    hosts = hosts or "127.0.0.1"
    topo = load_topology(topology_file)
    try:
        doc = bootstrap.make(topo.nodes, [h.strip() for h in hosts.split(",") if h.strip()], base_port)
    except bootstrap.BootstrapError as e:
        fail(str(e))
    click.echo(json.dumps(doc, indent=2))


@click.command()
@click.argument("run_dir")
@click.option("--out", help="Directory to write the averaged Hugging Face model to (required).")
@click.option("--weighted", is_flag=True, help="Weight each peer by its train_examples (default: uniform mean).")
def average(run_dir, out, weighted) -> None:
    """Average the peers' final checkpoints of RUN_DIR into one Hugging Face model (with tokenizer).

    --out may be new, empty, or a previous average (replaced); anything else is refused.
    """
    from deca_p2p.average import AverageError, average_run

    if not out:
        fail("--out DIR is required: where to write the averaged model")
    info: dict = {}
    try:
        average_run(run_dir, out, weighted=weighted, info=info)
    except AverageError as e:
        fail(str(e))
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
