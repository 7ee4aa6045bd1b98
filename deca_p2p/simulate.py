"""The in-process reference network: all n peers in one process, the same maths as the real peers.

Each peer's block goes through the same codec path as on the wire (θ½ itself with the raw codec, deltas against a
public copy with the lossy ones), and is mixed by the same code in the same order, so a real network with the raw codec must reproduce these weights. It is the
oracle for the networked version and a quick tool for algorithm studies.
"""
from __future__ import annotations

import copy
import json
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from . import public_copy, wire
from .config import TrainConfig
from .cpu_parts import CpuParts
from .metrics import MetricsLog
from .attacks import Attack, make_attack
from .optim import overlap_correction
from .robust import RobustMixer, make_mixer
from .checkpoint import save_atomic
from .runtime import average_models, evaluate_run, label_counts, load, make_batcher, network_data, set_threads
from .topology import Topology
from .trainer import PeerTrainer


def exchange_in_memory(topo: Topology, blocks: dict[int, dict[str, torch.Tensor]], copies: dict[int, public_copy.PublicCopy],
                       codec: str, full: bool, *, mixers: dict[int, RobustMixer] | None = None,
                       attacks: dict[int, Attack] | None = None, seq: int | None = None,
                       cpu: dict[int, CpuParts] | None = None) -> dict[int, list[torch.Tensor]]:
    """One gossip exchange: every peer publishes its block through its public copy; each mixes its neighbours'.

    `mixers`: each peer's mixing rule (robust.py; default: the plain mix). `attacks` (a test/benchmark hook):
    what those peers publish instead of their block, computed from the copies as they were before this exchange,
    exactly as a real attacking peer sees them; `full` marks the first exchange of an activation. `cpu`: each peer's
    CPU by part, as a networked peer times it (publishing is its "send", mixing its "mix").
    """
    cpu = cpu or defaultdict(CpuParts)
    published = dict(blocks)
    for i, attack in (attacks or {}).items():  # all before any copy moves: what a real peer knows at sending time
        published[i] = attack(blocks[i], {j: copies[j].tensors for j in topo.neighbors(i)}, seq, full)
    for i, tensors in published.items():
        with cpu[i].part("send"):
            if wire.get_codec(codec).lossless:  # θ½ itself, whole (gossip.py); kept here only as the attacks' view
                copies[i].tensors = public_copy.snapshot(tensors)
            else:
                copies[i].encode_block(tensors, src=i, codec=codec, full=full)
    mixed = {}
    for i, own in blocks.items():
        mixer = (mixers or {}).get(i) or RobustMixer(i, topo.weight_row(i), "none")
        with cpu[i].part("mix"):
            mixed[i] = mixer.mix(list(own.values()), {j: [copies[j].tensors[k] for k in own] for j in topo.neighbors(i)},
                                 seq=seq)
    return mixed


@dataclass
class SimResult:
    per_peer: dict[int, dict[str, float]]
    average_model: dict[str, float]
    initial: dict[str, float]
    wall_s: float
    models: dict[int, torch.nn.Module] = field(repr=False, default_factory=dict)
    labels: dict[int, dict[str, int]] = field(default_factory=dict)  # each peer's training records per label
    flagged: dict[int, dict] = field(default_factory=dict)  # robust mixing: peer -> its final flag counts
    privacy: dict[int, dict] = field(default_factory=dict)  # with --dp-clip: peer -> its final epsilon, releases, ...


def simulate(topo: Topology, cfg: TrainConfig, *, model_path=None, data_path=None, data_dir=None, run_dir=None,
             save: bool = False, progress: Callable[[str], None] | None = None) -> SimResult:
    """Run the network in this process. `save` writes each peer's final checkpoint under run_dir, like `cluster`."""
    set_threads(cfg.threads or 1)
    data = network_data(cfg, topo.nodes, data_path=data_path, data_dir=data_dir)
    lm = load(cfg, model_path)
    t0 = time.perf_counter()
    trainers: dict[int, PeerTrainer] = {}
    logs: dict[int, MetricsLog] = {}
    for i in topo.nodes:
        trainers[i] = PeerTrainer(copy.deepcopy(lm.model), make_batcher(cfg, lm, i, data[i]), cfg, peer_id=i)
        if run_dir is not None:
            logs[i] = MetricsLog(run_dir, i)
            logs[i].write("start", labels=label_counts(data[i].train), train_examples=len(data[i].train), eval_examples=len(data[i].evals),
                          train_source=data[i].source, eval_source=data[i].eval_source, max_len=lm.max_len,
                          truncated=trainers[i].batcher.truncation.as_dict())
        if trainers[i].batcher.truncation.total and progress is not None:
            progress(f"peer {i}: {trainers[i].batcher.truncation.describe(len(data[i].train), lm.max_len)}")

    def ev(model, i):
        return evaluate_run(cfg, model, lm.tokenizer, data[i].evals, lm.max_len)

    common_eval = all(d.evals is data[topo.nodes[0]].evals for d in data.values())
    peer0 = topo.nodes[0]  # any peer's data holds the common eval set
    initial = ev(lm.model, peer0) if common_eval else None
    if run_dir is not None:
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        (Path(run_dir) / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
    copies = {i: public_copy.PublicCopy() for i in topo.nodes}
    schedule = next(iter(trainers.values())).schedule

    def say(i):
        return None if progress is None else (lambda msg: progress(f"peer {i}: {msg}"))

    mixers = {i: make_mixer(cfg, i, topo.weight_row(i), log=say(i)) for i in topo.nodes}
    attacks = {i: a for i in topo.nodes if (a := make_attack(cfg, i, topo.weight_row(i))) is not None}
    evaluated, evaluated_at = {}, -1  # the latest periodic evaluation (with logs) and its activation
    cpu = {i: CpuParts() for i in topo.nodes}  # each peer's CPU by part, timed as a peer process times its own
    for a, (rnd, blk) in enumerate(schedule.activations()):
        sent = blocks = mixed = None  # the previous block's buffers go before the switch trims the heap
        for i, t in trainers.items():
            with cpu[i].part("activate"):
                t.activate(blk)
            copies[i].reset()
            mixers[i].begin_activation()
        first = True  # the first exchange of an activation carries whole blocks
        for step in range(cfg.inner_steps):
            exchanging = cfg.comm != "none" and schedule.is_exchange(step)
            if exchanging and cfg.overlap:  # θ goes out before the step; its mix lands on θ½ (peer.py, the same order)
                sent = {}
                for i, t in trainers.items():
                    with cpu[i].part("send"):  # what a peer's gossip.send(keep=True) snapshots
                        sent[i] = public_copy.snapshot(t.block())
                mixed = exchange_in_memory(topo, sent, copies, cfg.codec, full=first, mixers=mixers,
                                           attacks=attacks, seq=schedule.seq(rnd, blk, step), cpu=cpu)
            stats = {}
            for i, t in trainers.items():
                with cpu[i].part("step"):
                    stats[i] = t.local_step(schedule.step_index(rnd, blk, step))
            blocks = {i: t.block() for i, t in trainers.items()}
            if not exchanging:
                mixed = {i: [x.clone() for x in b.values()] for i, b in blocks.items()}
            elif cfg.overlap:
                for i in trainers:
                    with cpu[i].part("mix"):
                        mixed[i] = overlap_correction(list(blocks[i].values()), mixed[i], list(sent[i].values()))
            else:
                mixed = exchange_in_memory(topo, blocks, copies, cfg.codec, full=first, mixers=mixers,
                                           attacks=attacks, seq=schedule.seq(rnd, blk, step), cpu=cpu)
            if exchanging:
                first = False
                for i in trainers:
                    stats[i].update(mixers[i].record())
            for i, t in trainers.items():
                with cpu[i].part("apply"):
                    stats[i].update(t.apply_mix(mixed[i]))
                if i in logs:
                    with cpu[i].part("log"):
                        logs[i].write("step", round=rnd, block=blk, step=step,
                                      istep=schedule.step_index(rnd, blk, step), seq=schedule.seq(rnd, blk, step),
                                      **stats[i])
        if progress is not None:
            mean_loss = sum(s["loss"] for s in stats.values()) / len(stats)
            progress(f"round {rnd} block {blk}: mean train loss {mean_loss:.4f}")
        last_of_round = (a + 1) % schedule.n_blocks == 0
        if logs and ((last_of_round and not cfg.eval_every) or (cfg.eval_every and (a + 1) % cfg.eval_every == 0)):
            for i, t in trainers.items():
                with cpu[i].part("evaluate"):
                    evaluated[i] = ev(t.model, i)
                logs[i].write("eval", round=rnd, activation=a, **evaluated[i])
            evaluated_at = a
    # as a peer does: an evaluation after the last activation gives the final numbers (the models did not change)
    last = len(schedule.activations()) - 1
    per_peer = {}
    for i, t in trainers.items():
        with cpu[i].part("evaluate"):
            per_peer[i] = evaluated[i] if evaluated_at == last else ev(t.model, i)
    avg = average_models([t.export_model() for t in trainers.values()])  # declora: the mean of the merged models
    # the averaged model is scored on the common eval set, or on the union of the peers' own ones
    avg_eval = ev(avg, peer0) if common_eval else evaluate_run(
        cfg, avg, lm.tokenizer, [e for d in data.values() for e in d.evals], lm.max_len)
    result = SimResult(per_peer, avg_eval, initial, time.perf_counter() - t0, {i: t.model for i, t in trainers.items()},
                       {i: label_counts(d.train) for i, d in data.items()},
                       {i: m.final_record() for i, m in mixers.items()},
                       {i: t.privacy.final_record() for i, t in trainers.items() if t.privacy is not None})
    if save:
        for i, t in trainers.items():
            with cpu[i].part("checkpoint"):
                save_atomic(t.export_model(), lm.tokenizer, Path(run_dir) / f"peer-{i}" / "checkpoint", tag="final",
                            extra_files=t.checkpoint_files())
    for i, log in logs.items():
        log.write("final", **per_peer[i], **mixers[i].final_record(), **result.privacy.get(i, {}),
                  cpu_parts=cpu[i].record())
        log.close()
    return result
