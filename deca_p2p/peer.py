"""The peer process: load model and data, meet the neighbours, run the rounds, log, checkpoint.

    transport.start()            bind my ROUTER (a port in use fails here, before any slow loading)
    load model, data, my shard
    transport.barrier()          hello with every neighbour
    for round, block in schedule:
        activate block           freeze the rest, fresh moments, next message is a full block
        for step in range(R):
            local step -> θ½ ; gossip exchange -> Σ_j w_ij θ̂_j ; mix + BMA ; log
        eval + atomic checkpoint at the end of each round
    final eval, checkpoint, bye
SIGINT/SIGTERM stop at the next step boundary with a final checkpoint, bye, and exit code 0.
"""
from __future__ import annotations

import json
import os
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import torch

from . import bootstrap, fingerprint, topology
from .checkpoint import CheckpointError, differing_keys, latest, save_atomic
from .config import TrainConfig
from .attacks import make_attack
from .gossip import Gossip
from .optim import overlap_correction
from .metrics import METRICS_FILE, MetricsLog, peer_dir, records
from .privacy import public_stats
from .robust import make_mixer
from .timeslice import default_slice, request_io_slice, request_slice
from .runtime import PeerData, embedded_data, evaluate_run, label_counts, load, make_batcher, own_data, set_threads
from .trainer import PeerTrainer
from .transport import Transport


@dataclass
class PeerArgs:
    peer_id: int
    topology_path: str
    run_dir: str
    cfg: TrainConfig
    bootstrap_path: str | None = None
    model_path: str | None = None
    data_path: str | None = None   # this peer's own records (None: its shard of the embedded tasks)
    eval_path: str | None = None   # this peer's own held-out records (None: a share of data_path is held out)
    initial_eval: bool = True      # evaluate the starting model (cluster turns it off where another peer does)


def resolve_endpoints(args: PeerArgs, topo: topology.Topology) -> dict[int, str]:
    if args.bootstrap_path is None:
        return bootstrap.default_endpoints(topo.nodes, args.cfg.base_port)
    entries = bootstrap.load(args.bootstrap_path)
    topology.check_ids(topo, entries.keys(), what=f"bootstrap file {args.bootstrap_path}")
    return bootstrap.endpoints(entries)


def _install_stop_handlers(stop: threading.Event) -> None:
    def handler(signum, frame):
        if stop.is_set():  # a second signal: the user really means it (e.g. stuck in the hello barrier)
            raise SystemExit(128 + signum)
        stop.set()
    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)


def _bytes(tr: Transport) -> tuple[int, int]:
    cs = tr.counters().values()
    return (sum(c.sent_header + c.sent_payload for c in cs), sum(c.recv_header + c.recv_payload for c in cs))


def _transport_security(args: PeerArgs, topo: topology.Topology) -> dict:
    """Keyword arguments for Transport that turn on CURVE when --secure is set (see keys.py).

    Secure mode needs the bootstrap file (every peer's public_key: the allow-list) and this peer's
    secret key in cfg.keys_dir; any problem is a one-line keys.KeysError.
    """
    if not args.cfg.secure:
        return {}
    from .keys import KeysError, load_curve

    if args.bootstrap_path is None:
        raise KeysError("--secure needs --bootstrap FILE holding every peer's public_key "
                        "(make it with `deca-peer keys --topology T --bootstrap FILE`)")
    return {"curve": load_curve(args.cfg.keys_dir, args.bootstrap_path, args.peer_id, topo.nodes)}


def run_peer(args: PeerArgs, stop: threading.Event | None = None) -> None:
    cfg = args.cfg
    me = args.peer_id
    topo = topology.load(args.topology_path)
    topo.check_peer(me)
    endpoints = resolve_endpoints(args, topo)
    security = _transport_security(args, topo)
    stop = stop or threading.Event()
    _install_stop_handlers(stop)
    if cfg.threads:
        set_threads(cfg.threads)
    data = _peer_data(args, topo)
    lm = load(cfg, args.model_path)
    trainer = PeerTrainer(lm.model, make_batcher(cfg, lm, me, data), cfg, peer_id=me)
    inputs = PeerInputs(lm.tokenizer, lm.max_len, data)
    nbrs = topo.neighbors(me)
    transport = Transport(me, endpoints, nbrs, {j: topo.link(me, j) for j in nbrs},
                          max_message_bytes=trainer.max_block_bytes() + (1 << 20),  # nothing bigger is legitimate
                          send_timeout_s=min(10.0, cfg.exchange_timeout_s), seed=cfg.seed,
                          # what every neighbour must agree on: a mismatch fails both at the hello barrier (exit 2)
                          hello_cfg=fingerprint.build(cfg, trainer.model, trainer.blocks, topo),
                          log=lambda msg: print(f"peer {me}: {msg}", flush=True), **security)
    transport.start()
    restarted = (peer_dir(args.run_dir, me) / METRICS_FILE).is_file()  # this peer ran here before: a rejoin
    log = MetricsLog(args.run_dir, me)
    said_bye = False
    try:
        _train(args, topo, inputs, trainer, transport, log, stop, restarted)
        said_bye = True  # _train ends with gossip's bye
    finally:
        log.close()
        transport.flush(5.0)
        # the transport's bye matters when training failed before gossip said its own (to every neighbour, also
        # those that said theirs first). After it, a second one only waits out its 1 s timeout, refused by the
        # closed sockets of the neighbours that answered, and holds the peer's exit with it
        transport.close(send_bye=not said_bye)


@dataclass
class PeerInputs:
    tokenizer: object
    max_len: int
    data: PeerData


def _peer_data(args: PeerArgs, topo: topology.Topology) -> PeerData:
    """Only this peer's own files are opened; without --data, its shard of the generated embedded tasks."""
    if args.data_path:
        return own_data(args.cfg, args.peer_id, args.data_path, args.eval_path)
    if args.eval_path:
        from .data import DataError
        raise DataError("--eval-data needs --data (the peer's own training file)")
    shards, evals = embedded_data(args.cfg, topo.nodes)
    return PeerData(shards[args.peer_id], evals, f"its shard of the embedded tasks ({len(shards[args.peer_id])} records)",
                    "the embedded tasks' eval set")


def _evaluate(trainer: PeerTrainer, inputs: PeerInputs) -> dict:
    return evaluate_run(trainer.cfg, trainer.model, inputs.tokenizer, inputs.data.evals, inputs.max_len)


def _resume(trainer: PeerTrainer, ckpt_root: Path, log: MetricsLog) -> int:
    """Load the latest checkpoint of this peer, if any: returns the activation to start from.

    Every parameter and persistent buffer is restored bit for bit (`checkpoint.restore_weights`; declora: the
    adapters, `lora.restore_adapters`); a checkpoint that misses, adds or reshapes any key raises `CheckpointError`
    (the record's missing/unexpected stay 0).
    """
    ckpt = latest(ckpt_root)
    if ckpt is None:
        return 0
    try:  # a run directory another command wrote (`simulate --save`), or a damaged one: say so, in one line
        state = json.loads((ckpt / "deca_state.json").read_text())
        act, rnd, gen = state["activation"], state["round"], state["batcher_generator"]
        for key, v in (("activation", act), ("round", rnd)):  # a negative activation would index from the end
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{key} is {v!r}, not a whole number >= 0")
        generator = torch.tensor(gen, dtype=torch.uint8)
        if generator.shape != trainer.batcher.state_dict()["generator"].shape:
            raise ValueError(f"batcher_generator holds {generator.numel()} bytes, not a generator state")
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as e:  # RuntimeError: torch, bytes above 255
        raise CheckpointError(f"{ckpt} is not a peer checkpoint this peer can resume from ({type(e).__name__}: "
                              f"{e}); give a fresh --run-dir, or --set resume=false") from None
    trainer.restore(ckpt)
    trainer.batcher.load_state_dict({"generator": generator})
    log.write("resume", checkpoint=str(ckpt), activation=act, round=rnd, missing=0, unexpected=0)
    return act + 1


def _checkpoint(trainer: PeerTrainer, tokenizer, ckpt_root: Path, a: int, rnd: int, blk: int,
                changed: set[str] | None = None) -> None:
    """CHANGED: the parameters of every block active since the last checkpoint (only their shards are written again;
    None: all)."""
    state = {"activation": a, "round": rnd, "block": blk,
             "batcher_generator": trainer.batcher.state_dict()["generator"].tolist()}
    save_atomic(trainer.export_model(), tokenizer, ckpt_root, tag=f"a{a:05d}",  # declora: merged, adapters beside
                extra_files={"deca_state.json": json.dumps(state), **trainer.checkpoint_files()},
                groups=trainer.checkpoint_groups(), changed=changed)


def _verify_last_checkpoint(trainer: PeerTrainer, tokenizer, ckpt_root: Path, saved: tuple[int, int, int],
                            log: MetricsLog, me: int) -> int:
    """Read the last checkpoint back and compare it with the model; if any tensor differs, save it again in full.

    A block-sharded save links the shards of blocks the peer says did not change (checkpoint_reuse.py): a slip in
    that bookkeeping would leave stale weights in the model a user keeps, silently. One read of the last checkpoint
    per run. Returns how many tensors differed (0: it was exact)."""
    ckpt = latest(ckpt_root)
    if ckpt is None or trainer.checkpoint_groups() is None:  # declora: every save is a full one
        return 0
    stale = differing_keys(trainer.export_model(), ckpt)
    if stale:
        print(f"peer {me}: the last checkpoint differed from the model in {len(stale)} tensors ({stale[0]} first); "
              f"saved again in full", flush=True)
        _checkpoint(trainer, tokenizer, ckpt_root, *saved, changed=None)
        log.write("checkpoint_repaired", tensors=len(stale), first=stale[0])
    return len(stale)


def _released_before(run_dir: str, me: int) -> int:
    """DP releases this peer made before a restart: the last count it logged, plus one it may have sent before a
    crash kept it from logging it (privacy accounting must not undercount; re-done steps count again)."""
    counts = [r.get("dp_releases") or 0 for r in records(run_dir, me, "step")]
    counts = [c for c in counts if isinstance(c, (int, float)) and not isinstance(c, bool)]  # a damaged record: skipped
    return max(counts, default=0) + 1


def _neighbour_settings(me: int, transport: Transport) -> dict[str, dict[str, list[str]]]:
    """Each neighbour's own settings that differ from ours (learning rate, codec, ...; fingerprint.LOCAL_KEYS): legal,
    but they change what the network computes, so they are said once on the console and kept in the ready record."""
    out = {}
    for j, theirs in sorted(transport.neighbour_cfg.items()):
        diff = fingerprint.local_differences(transport.hello_cfg, theirs)
        if diff:
            out[str(j)] = {k: [a, b] for k, (a, b) in diff.items()}
            print(f"peer {me}: neighbour {j} uses its own " + ", ".join(f"{k} ({b}; here {a})" for k, (a, b) in
                                                                       diff.items()), flush=True)
    return out


def _say_alone(me: int, gossip: Gossip, alone: bool) -> None:
    if alone:
        gone = sorted(gossip.gone)
        quiet = sorted(j for j in gossip.suspect if j not in gossip.gone)
        why = "; ".join(x for x in (f"gone: {', '.join(map(str, gone))}" if gone else "",
                                    f"not answering: {', '.join(map(str, quiet))}" if quiet else "") if x)
        print(f"peer {me}: no live neighbour left ({why}); training alone until one comes back", flush=True)
    else:
        print(f"peer {me}: a neighbour is back; no longer alone", flush=True)


def _train(args: PeerArgs, topo, inputs, trainer: PeerTrainer, transport: Transport, log: MetricsLog,
           stop: threading.Event, restarted: bool) -> None:
    cfg, me = args.cfg, args.peer_id
    sched = trainer.schedule
    acts = sched.activations()
    ckpt_root = peer_dir(args.run_dir, me) / "checkpoint"
    first = _resume(trainer, ckpt_root, log) if cfg.resume else 0
    if restarted and trainer.privacy is not None:
        trainer.privacy.releases = _released_before(args.run_dir, me)
    inc = time.time_ns() & 0x7FFFFFFF  # incarnation: changes whenever the process restarts
    data = inputs.data
    labels = label_counts(data.train)
    trunc = trainer.batcher.truncation
    named = dict(trainer.model.named_parameters())
    # a long CPU slice for this thread, but the default while it waits for a block, so that woken it reads the block at
    # once (timeslice.py). The transport's threads, started already, keep the default; ZeroMQ's I/O thread may get
    # this slice after the barrier (below).
    time_slice_ms = request_slice(cfg.time_slice_ms)
    log.write("start", pid=os.getpid(), inc=inc, glibc_tunables=os.environ.get("GLIBC_TUNABLES"), time_slice_ms=time_slice_ms,
              endpoint=transport.endpoint, neighbours=topo.neighbors(me),
              train_examples=len(data.train), eval_examples=len(data.evals), train_source=data.source,
              eval_source=data.eval_source, labels=labels, max_len=inputs.max_len, truncated=trunc.as_dict(),
              n_blocks=len(trainer.blocks), block_numel=[sum(named[n].numel() for n in b.param_names) for b in trainer.blocks])
    print(f"peer {me}: training on {data.source}; evaluating on {data.eval_source} ({len(data.evals)} records); "
          f"max_len {inputs.max_len}", flush=True)
    if trunc.total:
        print(f"peer {me}: {trunc.describe(len(data.train), inputs.max_len)}", flush=True)
    if me == topo.nodes[0] and first == 0:
        (Path(args.run_dir) / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
    if first == 0 and args.initial_eval:
        log.write("eval", round=-1, activation=-1, **_evaluate(trainer, inputs))
    t_barrier = time.perf_counter()
    transport.barrier(inc, cfg.hello_timeout_s)
    # the same slice for ZeroMQ's I/O thread, so that its wake-ups stop preempting other peers' steps, but not where a
    # link is emulated: there it would read blocks after their due time (timeslice.request_io_slice). After the
    # barrier: libzmq names the thread from inside it, so only once it has carried the hellos is its name certain.
    io_slice = cfg.io_time_slice == "always" or (cfg.io_time_slice == "auto" and not transport.emulates)
    io_slices = request_io_slice(time_slice_ms if time_slice_ms and io_slice else 0)
    log.write("ready", barrier_s=time.perf_counter() - t_barrier, config_digest=transport.hello_cfg["digest"],
              io_time_slice_ms=io_slices,
              neighbour_settings=_neighbour_settings(me, transport))
    gossip = Gossip(transport, me, topo, sched, [b.param_names for b in trainer.blocks],
                    block_shapes=[[tuple(named[n].shape) for n in b.param_names] for b in trainer.blocks],
                    codec=cfg.codec, inc=inc, timeout_s=cfg.exchange_timeout_s, stop=stop,
                    robust=make_mixer(cfg, me, topo.weight_row(me), log=lambda msg: print(f"peer {me}: {msg}", flush=True)),
                    attack=make_attack(cfg, me, topo.weight_row(me)),  # a test/benchmark hook; None unless cfg names me
                    zero_copy=True)  # the mix gives the parameters new storage (trainer.apply_mix): θ½ goes out as is
    if time_slice_ms:
        gossip.waiting = default_slice()
    if gossip.attack is not None:
        print(f"peer {me}: TEST HOOK: publishing attacked blocks ({cfg.attack})", flush=True)
    first_step = 0
    if restarted and cfg.comm != "none":  # a rejoin: pick up where the network is, not where we stopped
        resumed_at = first
        # its own resume point goes to every neighbour first (catch_up says why)
        heard = gossip.catch_up(cfg.exchange_timeout_s, resume_seq=first * sched.exchanges_per_activation)
        where = sched.locate(heard or 0)
        start_seq = first * sched.exchanges_per_activation
        if where is not None and where[0] >= first:
            first, first_step = where[0], where[2] - (where[2] % cfg.gossip_every)
            start_seq = heard
        gossip.announce(start_seq)  # a neighbour that restarted with us may wait for where we start (catch_up)
        # network_seq None: no neighbour told where it is within the timeout
        log.write("rejoin", activation=first, step=first_step, missed_activations=first - resumed_at, network_seq=heard)
    proc = psutil.Process()
    peak_rss = 0
    last_stats: dict = {}  # --overlap sends a block before its step's numbers exist: the previous step's go with it
    alone_exchanges, was_alone = 0, False
    evaluated: tuple[int, dict] = (-1, {})  # (activation, metrics) of the latest evaluation
    cpu = gossip.cpu  # this thread's CPU by part (cpu_parts.py): gossip times send, receive and mix
    changed: set[str] = set()  # only the active block changes: the next checkpoint rewrites these blocks' shards
    saved = None  # (activation, round, block) of this process's last checkpoint
    for a in range(first, len(acts)):
        rnd, blk = acts[a]
        flight = res = mixed = None  # the previous block's buffers go before the switch trims the heap
        with cpu.part("activate"):
            trainer.activate(blk)
        changed.update(trainer.blocks[blk].param_names)
        gossip.begin_activation(rnd, blk)
        for step in range(first_step if a == first else 0, cfg.inner_steps):
            exchanging = cfg.comm != "none" and sched.is_exchange(step)
            flight = None
            if exchanging and cfg.overlap:  # send θ now: its blocks travel while this step's gradient is computed
                flight = gossip.send(rnd, blk, step, trainer.block(), last_stats, keep=True)
            with cpu.part("step"):
                stats = trainer.local_step(sched.step_index(rnd, blk, step))
            if cfg.slowdown > 1:  # a straggler on purpose
                time.sleep((cfg.slowdown - 1) * stats["compute_s"])
            extra = {}
            if not exchanging:
                mixed = [t.clone() for t in trainer.block().values()]
            else:
                if flight is not None:  # it lands: θ½ + (Σ_j w_ij θ_j − θ), the mix's correction on this step's θ½
                    res = gossip.collect(flight)
                    with cpu.part("mix"):
                        mixed = overlap_correction(list(trainer.block().values()), res.mixed, flight.own)
                else:  # with DP, only data-independent numbers go out beside the (noised) block
                    res = gossip.exchange(rnd, blk, step, trainer.block(),
                                          stats if trainer.privacy is None else public_stats(stats))
                    mixed = res.mixed
                extra = {"wait_s": res.wait_s, "missing": res.missing,
                         "mixed": res.arrived if res.robust is None else list(res.robust.mixed),
                         "disagreement": res.disagreement,
                         "encode_s": gossip.encode_s, "mix_s": res.mix_s,
                         "links": {str(j): [st.get("nbytes"), st.get("one_way_s"), st.get("read_after_s")]
                                   for j, st in res.neighbour_stats.items()}, **gossip.robust.record()}
                extra["alone"] = alone = gossip.alone()
                alone_exchanges += alone
                if alone != was_alone:  # said once when it happens (and once when it ends), not every step
                    _say_alone(me, gossip, alone)
                    was_alone = alone
            last_stats = stats
            t_apply = time.perf_counter()
            with cpu.part("apply"):
                stats.update(trainer.apply_mix(mixed))
            stats["apply_s"] = time.perf_counter() - t_apply  # the optimizer's mix step (BMA) and copy-back
            with cpu.part("log"):
                sent, recv = _bytes(transport)
                log.write("step", round=rnd, block=blk, step=step, istep=sched.step_index(rnd, blk, step),
                          seq=sched.seq(rnd, blk, step), bytes_sent=sent, bytes_recv=recv,
                          dropped=sum(gossip.dropped.values()), rejected_handshakes=transport.rejected_handshakes,
                          **stats, **extra)
            if stop.is_set():
                break
        peak_rss = max(peak_rss, proc.memory_info().rss)
        end_of_round = (a + 1) % sched.n_blocks == 0
        if stop.is_set() or end_of_round or (a + 1) % cfg.checkpoint_every == 0:
            with cpu.part("checkpoint"):  # before eval: a stop has a grace period
                _checkpoint(trainer, inputs.tokenizer, ckpt_root, a, rnd, blk, changed)
            changed, saved = set(), (a, rnd, blk)
        if stop.is_set():
            break
        if (end_of_round and not cfg.eval_every) or (cfg.eval_every and (a + 1) % cfg.eval_every == 0):
            with cpu.part("evaluate"):
                evaluated = (a, _evaluate(trainer, inputs))
            log.write("eval", round=rnd, activation=a, **evaluated[1])
    if saved is not None:
        with cpu.part("checkpoint"):
            _verify_last_checkpoint(trainer, inputs.tokenizer, ckpt_root, saved, log, me)
    # the model has not changed since an evaluation after the last activation: its numbers are the final ones
    with cpu.part("evaluate"):
        final = evaluated[1] if evaluated[0] == len(acts) - 1 else _evaluate(trainer, inputs)
    gossip.finish(cfg.exchange_timeout_s)  # slower neighbours may still need our last block (and we said bye)
    sent, recv = _bytes(transport)
    cs = [c for c in transport.counters().values() if c.data_sent]
    log.write("final", stopped=stop.is_set(), bytes_sent=sent, bytes_recv=recv, peak_rss_mb=peak_rss / 2**20,
              handoff_late_ms=1e3 * sum(c.handoff_late_s for c in cs) / max(1, sum(c.data_sent for c in cs)),
              handoff_late_max_ms=1e3 * max((c.handoff_late_max_s for c in cs), default=0.0),
              dropped=dict(gossip.dropped), late=gossip.late, alone_exchanges=alone_exchanges,
              # what the transport refused or lost before gossip saw it (PROTOCOL.md §5.6, §12.2)
              rejected_handshakes=transport.rejected_handshakes, handshake_failures=dict(transport.handshake_failures),
              spoofed_routing_ids=transport.spoofed_routing_ids, unknown_msgs_recv=transport.unknown_msgs_recv,
              **transport.held_stamps(),
              send_failures=sum(c.send_failures for c in transport.counters().values()),
              nonfinite_stats=gossip.nonfinite_stats, **gossip.robust.final_record(),
              # where its CPU went: by part (this thread), this thread in all, the process with its other threads
              cpu_parts=cpu.record(), cpu_main_s=time.thread_time(), cpu_process_s=time.process_time(),
              **(trainer.privacy.final_record() if trainer.privacy is not None else {}), **final)
