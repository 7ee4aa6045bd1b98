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

from . import bootstrap, topology
from .checkpoint import save_atomic
from .config import TrainConfig
from .data import evaluate
from .gossip import Gossip
from .metrics import MetricsLog, peer_dir
from .runtime import load_run_inputs, set_threads
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
    data_path: str | None = None


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


def run_peer(args: PeerArgs, stop: threading.Event | None = None) -> None:
    cfg = args.cfg
    me = args.peer_id
    topo = topology.load(args.topology_path)
    if me not in topo.nodes:
        raise topology.TopologyError(f"peer id {me} is not in topology {topo.name} (nodes {topo.nodes[0]}..{topo.nodes[-1]})")
    endpoints = resolve_endpoints(args, topo)
    nbrs = topo.neighbors(me)
    stop = stop or threading.Event()
    _install_stop_handlers(stop)
    if cfg.threads:
        set_threads(cfg.threads)
    transport = Transport(me, endpoints, nbrs, {j: topo.link(me, j) for j in nbrs},
                          send_timeout_s=min(10.0, cfg.exchange_timeout_s), seed=cfg.seed)
    transport.start()
    log = MetricsLog(args.run_dir, me)
    try:
        _train(args, topo, transport, log, stop)
    finally:
        log.close()
        transport.flush(5.0)
        transport.close(send_bye=True)  # a repeat of gossip's bye is harmless; it matters when training failed


def _train(args: PeerArgs, topo, transport: Transport, log: MetricsLog, stop: threading.Event) -> None:
    cfg, me = args.cfg, args.peer_id
    inputs = load_run_inputs(cfg, topo.nodes, model_path=args.model_path, data_path=args.data_path)
    setup = inputs.peer(me)
    trainer = PeerTrainer(inputs.model, setup.batcher, cfg)
    sched = trainer.schedule
    labels: dict[str, int] = {}
    for e in setup.examples:
        labels[e.label] = labels.get(e.label, 0) + 1
    inc = time.time_ns() & 0x7FFFFFFF  # incarnation: changes whenever the process restarts
    log.write("start", pid=os.getpid(), inc=inc, endpoint=transport.endpoint, neighbours=topo.neighbors(me),
              n_examples=len(setup.examples), labels=labels, n_blocks=len(trainer.blocks),
              block_numel=[sum(dict(inputs.model.named_parameters())[n].numel() for n in b.param_names)
                           for b in trainer.blocks])
    if me == topo.nodes[0]:
        (Path(args.run_dir) / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
        log.write("eval", round=-1, activation=-1, **evaluate(inputs.model, inputs.tokenizer, inputs.eval_examples))
    transport.barrier(inc, cfg.hello_timeout_s)
    log.write("ready", wait_s=0.0)
    named = dict(inputs.model.named_parameters())
    gossip = Gossip(transport, me, topo, sched, [b.param_names for b in trainer.blocks],
                    block_shapes=[[tuple(named[n].shape) for n in b.param_names] for b in trainer.blocks],
                    codec=cfg.codec, inc=inc, timeout_s=cfg.exchange_timeout_s, stop=stop)
    proc = psutil.Process()
    peak_rss = 0
    ckpt_root = peer_dir(args.run_dir, me) / "checkpoint"
    for a, (rnd, blk) in enumerate(sched.activations()):
        trainer.activate(blk)
        gossip.begin_activation(rnd, blk)
        for step in range(cfg.inner_steps):
            stats = trainer.local_step()
            if cfg.comm == "none":
                mixed, extra = [t.clone() for t in trainer.block().values()], {}
            else:
                res = gossip.exchange(rnd, blk, step, trainer.block(), stats)
                mixed = res.mixed
                extra = {"wait_s": res.wait_s, "missing": res.missing, "disagreement": res.disagreement}
            stats.update(trainer.apply_mix(mixed))
            sent, recv = _bytes(transport)
            log.write("step", round=rnd, block=blk, step=step, seq=sched.seq(rnd, blk, step), bytes_sent=sent,
                      bytes_recv=recv, dropped=sum(gossip.dropped.values()), **stats, **extra)
            if stop.is_set():
                break
        peak_rss = max(peak_rss, proc.memory_info().rss)
        end_of_round = (a + 1) % sched.n_blocks == 0
        if stop.is_set() or end_of_round:  # checkpoint first: a stopping peer has a grace period, not forever
            save_atomic(trainer.model, inputs.tokenizer, ckpt_root, tag=f"a{a:05d}",
                        extra_files={"deca_state.json": json.dumps({"activation": a, "round": rnd, "block": blk})})
        if stop.is_set():
            break
        if end_of_round or (cfg.eval_every and (a + 1) % cfg.eval_every == 0):
            log.write("eval", round=rnd, activation=a, **evaluate(trainer.model, inputs.tokenizer, inputs.eval_examples))
    final = evaluate(trainer.model, inputs.tokenizer, inputs.eval_examples)
    gossip.finish(cfg.exchange_timeout_s)  # slower neighbours may still need our last block
    sent, recv = _bytes(transport)
    log.write("final", stopped=stop.is_set(), bytes_sent=sent, bytes_recv=recv, peak_rss_mb=peak_rss / 2**20,
              dropped=dict(gossip.dropped), late=gossip.late, **final)
