"""How `deca-peer plan` prints a plan (rich tables); the numbers come from deca_p2p/plan.py."""
from __future__ import annotations

from typing import Any


from .plan_arch import CODEC_BYTES


# ------------------------------------------------------------------------------------------------ output

def fmt_bytes(x: float) -> str:
    for unit, k in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(x) >= k:
            return f"{x / k:.3g} {unit}"
    return f"{x:.0f} B"


def fmt_s(x: float) -> str:
    if x >= 86400:
        return f"{x / 86400:.3g} d"
    if x >= 3600:
        return f"{x / 3600:.3g} h"
    if x >= 60:
        return f"{x / 60:.3g} min"
    if x >= 1:
        return f"{x:.3g} s"
    return f"{x * 1e3:.3g} ms"


def _fmt_ids(ids: list[int]) -> str:
    """0-3, 5, 7-9."""
    out, run = [], [ids[0]]
    for i in ids[1:] + [None]:
        if i is not None and i == run[-1] + 1:
            run.append(i)
            continue
        out.append(str(run[0]) if len(run) == 1 else f"{run[0]}-{run[-1]}")
        if i is not None:
            run = [i]
    return ", ".join(out)


def render(plan: dict[str, Any], console=None, max_peers: int = 16) -> None:
    """Rich tables: the model and its blocks, each peer for the chosen method, and the three methods side by side."""
    from rich.console import Console
    from rich.table import Table

    con = console or Console(width=max(140, Console().width))
    m, inp, dev = plan["model"], plan["inputs"], plan["device"]
    con.print(f"[bold]{m['name']}[/]: {m['params'] / 1e9:.3g} B parameters ({m['layers']} layers x "
              f"{m['layer_params'] / 1e6:.4g} M, embeddings {m['embedding_params'] / 1e6:.4g} M, head "
              f"{m['head_params'] / 1e6:.4g} M{', tied' if m['tied'] else ''})"
              + ("" if m["exact_formula"] else f" [yellow](model_type {m['model_type']}: Llama formula, an estimate)[/]"))
    con.print(f"topology {plan['topology']['name']}: {plan['topology']['peers']} peers; codec {inp['codec']}, "
              f"R = {inp['inner_steps']}, T = {inp['rounds']}, batch {inp['batch_size']} x {inp['seq_len']} tokens, "
              f"{inp['dtype']}; compute {dev['flops'] / 1e12:.3g} TFLOP/s, memory {dev['mem_bw'] / 1e9:.3g} GB/s "
              f"({dev['kind']})")
    if inp.get("peers_per_core", 1) > 1:
        con.print(f"{inp['peers_per_core']:g} peers per core: each step's CPU (compute, local overhead, the kernel's "
                  "copies of the messages) is shared, then the exchange")
    blocks = plan["blocks"]
    bt = Table(title=f"blocks ({inp['method']}): {len(blocks)}", show_lines=False)
    for col in ("block", "params", *[f"bytes ({c})" for c in CODEC_BYTES]):
        bt.add_column(col, justify="right" if col != "block" else "left")
    shown = blocks if len(blocks) <= 6 else blocks[:3] + [None] + blocks[-2:]
    for b in shown:
        if b is None:
            bt.add_row("...", *[""] * (1 + len(CODEC_BYTES)))
            continue
        bt.add_row(b["name"], f"{b['params'] / 1e6:.4g} M", *[fmt_bytes(b["bytes"][c]) for c in CODEC_BYTES])
    con.print(bt)
    cost = plan["methods"][inp["method"]]
    pt = Table(title=f"per peer, {inp['method']} (model predictions; 'step' runs compute, then the exchange; "
               "'overlap' is --overlap)")
    for col in ("peers", "deg", "slowest link", "per exch/link", "compute s", "comm s", "local s", "step s",
                "overlap s", "round", "run", "sent", "peak memory"):
        pt.add_column(col, justify="right")
    groups: dict[tuple, list[int]] = {}
    for p in cost["peers"]:  # identical peers (same degree and links) on one row
        key = tuple(round(p[k], 9) if isinstance(p[k], float) else p[k] for k in
                    ("degree", "slowest_link", "bytes_per_exchange_per_link", "comm_s", "local_s", "step_s",
                     "memory_device_bytes"))
        groups.setdefault(key, []).append(p["peer"])
    byid = {p["peer"]: p for p in cost["peers"]}
    for k, (_, ids) in enumerate(groups.items()):
        if k == max_peers:
            pt.add_row(f"(+{len(groups) - max_peers} more)", *[""] * 12)
            break
        p = byid[ids[0]]
        mem = fmt_bytes(p["memory_device_bytes"]) + (f" + host {fmt_bytes(p['memory_host_bytes'])}"
                                                      if p["memory_host_bytes"] else "")
        pt.add_row(_fmt_ids(ids), str(p["degree"]), p["slowest_link"] or "-", fmt_bytes(p["bytes_per_exchange_per_link"]),
                   f"{p['compute_s']:.3g}", f"{p['comm_s']:.3g}", f"{p['local_s']:.3g}", f"{p['step_s']:.3g}",
                   f"{p['step_overlap_s']:.3g}", fmt_s(p["round_s"]), fmt_s(p["run_s"]), fmt_bytes(p["sent_bytes_run"]),
                   mem)
    con.print(pt)
    p = max(cost["peers"], key=lambda q: q["round_s"])
    dev_disk = f"{dev['disk_bw'] / 1e9:.3g} GB/s + {dev['save_s'] * 1e3:.3g} ms a save"
    con.print(f"checkpoints ({inp['method']}): {p['checkpoints_per_round']:.3g} per round, {fmt_bytes(p['checkpoint_bytes'])} "
              f"written each (a process's first: {fmt_bytes(p['first_checkpoint_bytes'])}), {fmt_s(p['checkpoint_s'])} "
              f"each at {dev_disk}; in 'round' and 'run'")
    ct = Table(title=f"methods at the same number of local steps ({cost['steps_per_round']} per round x {inp['rounds']} "
               "rounds); network = slowest peer (synchronous gossip)")
    for col in ("method", "trained params/step", "bytes/exch/link", "step s", "step s overlap", "checkpoint",
                "run", "run overlap", "traffic (all peers)", "peak memory/peer"):
        ct.add_column(col, justify="right" if col != "method" else "left")
    for name, c in plan["methods"].items():
        n = c["network"]
        mem = fmt_bytes(n["max_memory_device_bytes"]) + (f" + host {fmt_bytes(n['max_memory_host_bytes'])}"
                                                         if n["max_memory_host_bytes"] else "")
        ct.add_row(name, f"{c['trainable_params_per_step'] / 1e6:.4g} M",
                   fmt_bytes(max(p["bytes_per_exchange_per_link"] for p in c["peers"])),
                   f"{n['step_s']:.3g}", f"{n['step_overlap_s']:.3g}", fmt_s(max(q["checkpoint_s"] for q in c["peers"])),
                   fmt_s(n["run_s"]), fmt_s(n["run_overlap_s"]),
                   fmt_bytes(n["traffic_bytes_run"]), mem)
    con.print(ct)
