"""Tables and plots of a run: printed at the end of simulate and cluster, rebuilt by `deca-peer report`."""
from __future__ import annotations

import json

from pathlib import Path
from typing import Mapping

from rich.console import Console
from rich.table import Table

from .metrics import METRICS_FILE, peer_dir, read_metrics

AVERAGE_DIR, AVERAGE_EVAL = "average", "eval.json"  # cluster writes the network average and its scores here


class ReportError(ValueError):
    """A run directory whose records the report cannot read; the message is one line naming the file."""


_STEP_NUMBERS = ("loss", "disagreement", "bytes_sent", "bytes_recv", "compute_s", "wait_s")  # what the report reads


def _number(v) -> bool:
    """A JSON number the report can compute with, or null (a diverged run logs NaN as null)."""
    if v is None:
        return True
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return False
    try:
        float(v)  # overflows on a 400-digit integer
    except OverflowError:
        return False
    return True


def _peer_id(x) -> bool:
    return (isinstance(x, int) and not isinstance(x, bool)) or (isinstance(x, str) and x.isascii() and x.isdigit())


def _unreadable(r: dict) -> str | None:
    """What of the fields the report reads has a shape no peer writes, in record ``r``; None if none."""
    ev = r.get("event")
    if ev == "step":
        if "istep" not in r:
            return "step record without istep"
        if not isinstance(r["istep"], int) or isinstance(r["istep"], bool):
            return f"step record with istep {r['istep']!r}"
        bad = [k for k in _STEP_NUMBERS if not _number(r.get(k))]
    elif ev in ("eval", "final"):
        if ev == "eval" and "acc" not in r:
            return "eval record without acc"
        if r.get("activation") is not None and (not isinstance(r["activation"], int) or isinstance(r["activation"], bool)):
            return f"{ev} record with activation {r['activation']!r}"
        bad = [k for k in r if (k in ("eval_loss", "acc", "dp_epsilon") or k.startswith("acc/")) and not _number(r[k])]
        flagged = r.get("flagged") if ev == "final" else None  # robust mixing: {"<neighbour id>": times flagged}
        if flagged is not None and not (isinstance(flagged, (dict, list)) and all(map(_peer_id, flagged))):
            return f"final record with flagged {flagged!r}"
    elif ev == "start":
        labels = r.get("labels")  # training records per label
        if labels is not None and not (isinstance(labels, dict) and all(_number(v) and v is not None
                                                                          for v in labels.values())):
            return f"start record with labels {labels!r}"
        bad = []
    else:
        return None
    return f"{ev} record with {bad[0]} {r[bad[0]]!r}" if bad else None


def check_run(run_dir: str | Path) -> None:
    """ReportError naming the file unless every record has the fields the report reads in the shape peers write
    them: a damaged or hand-edited metrics.jsonl gets one line, not an exception from the middle of a plot."""
    for pid, recs in read_metrics(run_dir).items():
        for r in recs:
            what = _unreadable(r)
            if what is not None:
                what = what if len(what) <= 120 else what[:117] + "..."
                raise ReportError(f"{peer_dir(run_dir, pid) / METRICS_FILE}: a record this version cannot read ({what})")


def _task_keys(rows: Mapping[int, Mapping[str, float]]) -> list[str]:
    keys = {k for r in rows.values() for k in r if k.startswith("acc/")}
    return sorted(keys)


def fmt(v, digits: int) -> str:
    """A number, or "nan" where a diverged run logged null."""
    return f"{v:.{digits}f}" if isinstance(v, (int, float)) else "nan"


def mean_metrics(rows: Mapping[int, Mapping[str, float]]) -> dict[str, float]:
    keys = {k for r in rows.values() for k, v in r.items() if isinstance(v, (int, float))}
    out = {}
    for k in sorted(keys):
        vals = [r.get(k) for r in rows.values()]
        out[k] = sum(vals) / len(vals) if all(isinstance(v, (int, float)) for v in vals) else None
    return out


UNSEEN_SHARE = 0.05  # a task under 5% of a peer's own shard is one its own data barely holds


def unseen_accuracy(labels: Mapping[str, int] | None, metrics: Mapping[str, float],
                    share: float = UNSEEN_SHARE) -> float | None:
    """Mean exact match on the tasks that make up under `share` of a peer's own training records: what only
    collaboration can have taught it. None when the peer's shard holds every task."""
    if not labels:
        return None
    total = sum(labels.values())
    rare = [k for k in metrics if k.startswith("acc/") and labels.get(k[4:], 0) < share * total]
    vals = [metrics[k] for k in rare if isinstance(metrics[k], (int, float))]
    return sum(vals) / len(vals) if vals else None


def eval_table(per_peer: Mapping[int, Mapping[str, float]], *, initial=None, average_model=None, extra=None,
               labels: Mapping[int, Mapping[str, int]] | None = None, title: str = "") -> Table:
    """Per-peer eval loss and accuracy (overall, on the tasks its own shard barely holds, and per task), then the
    network mean and the averaged model. `labels`: each peer's training records per label (for `unseen`)."""
    tasks = _task_keys(per_peer)
    extra = extra or {}
    unseen = {pid: unseen_accuracy((labels or {}).get(pid), r) for pid, r in per_peer.items()}
    show_unseen = any(v is not None for v in unseen.values())
    extra_cols = list(dict.fromkeys(k for r in extra.values() for k in r))
    t = Table(title=title)
    for col in ["peer", "eval loss", "acc", *(["unseen"] if show_unseen else []), *[k[4:] for k in tasks], *extra_cols]:
        t.add_column(col, justify="right")

    def row(name, r, ex=None, pid=None):
        ex = ex or {}
        cells = [name, fmt(r.get("eval_loss"), 4), fmt(r.get("acc"), 3)]
        if show_unseen:
            u = unseen.get(pid) if pid is not None else _mean_present(unseen.values()) if name == "mean" else None
            cells.append(fmt(u, 3) if u is not None else "")
        cells += [fmt(r.get(k), 2) for k in tasks]
        cells += [str(ex.get(c, "")) for c in extra_cols]
        t.add_row(*cells)

    if initial is not None:
        row("start", initial)
    for pid in sorted(per_peer):
        row(str(pid), per_peer[pid], extra.get(pid), pid)
    row("mean", mean_metrics(per_peer))
    if average_model is not None:
        row("avg model", average_model)
    return t


def _mean_present(vals) -> float | None:
    vals = [v for v in vals if v is not None]
    return sum(vals) / len(vals) if vals else None


def print_eval_table(per_peer, **kw) -> None:
    Console().print(eval_table(per_peer, **kw))


def final_evals(run_dir: str | Path) -> dict[int, dict]:
    """The last eval record of every peer ("final" if it finished, else its latest "eval")."""
    out = {}
    for pid, recs in read_metrics(run_dir).items():
        evals = [r for r in recs if r.get("event") in ("eval", "final")]
        if evals:
            out[pid] = evals[-1]
    return out


def epsilon_cell(final: dict) -> str:
    """The ε column of a peer with DP on (its final record): "∞" for clipping without noise (JSON null)."""
    eps = final.get("dp_epsilon")
    return "∞" if eps is None or eps == float("inf") else f"{eps:.3g}"


def traffic_and_time(run_dir: str | Path) -> dict[int, dict]:
    """Per peer: MB sent/received, seconds computing vs waiting on the network, steps done."""
    out = {}
    for pid, recs in read_metrics(run_dir).items():
        steps = [r for r in recs if r.get("event") == "step"]
        last = steps[-1] if steps else {}
        out[pid] = {
            "steps": len(steps),
            "MB sent": f"{(last.get('bytes_sent') or 0) / 1e6:.1f}",
            "MB recv": f"{(last.get('bytes_recv') or 0) / 1e6:.1f}",
            "compute s": f"{sum(r.get('compute_s') or 0 for r in steps):.0f}",
            "wait s": f"{sum(r.get('wait_s') or 0 for r in steps):.0f}",
        }
        final = next((r for r in reversed(recs) if r.get("event") == "final"), {})
        if "dp_releases" in final:  # differential privacy (privacy.py): the ε spent at the run's δ
            out[pid]["ε"] = epsilon_cell(final)
        if final.get("flagged"):  # robust mixing: the neighbours this peer flagged (robust.py)
            out[pid]["flagged"] = ",".join(sorted(final["flagged"], key=int))
    return out


def average_eval(run_dir: str | Path) -> dict | None:
    """The averaged model's scores, when `cluster` wrote them (RUN/average/eval.json)."""
    f = Path(run_dir) / AVERAGE_DIR / AVERAGE_EVAL
    try:
        scores = json.loads(f.read_text()) if f.is_file() else None
    except (OSError, ValueError):  # ValueError: invalid JSON, or not UTF-8
        return None
    return scores if isinstance(scores, dict) else None  # another JSON value: as unreadable as invalid JSON


def run_table(run_dir: str | Path, title: str = "") -> Table | None:
    finals = final_evals(run_dir)
    if not finals:
        return None
    start = next((r for recs in read_metrics(run_dir).values() for r in recs
                  if r.get("event") == "eval" and r.get("activation") == -1), None)
    labels = {pid: next((r["labels"] for r in recs if r.get("event") == "start" and r.get("labels")), None)
              for pid, recs in read_metrics(run_dir).items()}
    return eval_table(finals, initial=start, average_model=average_eval(run_dir), extra=traffic_and_time(run_dir),
                      labels=labels, title=title or str(run_dir))


def make_plots(run_dir: str | Path) -> list[Path]:
    """loss vs step, consensus distance (disagreement with neighbours) vs step, bytes vs step, eval accuracy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = read_metrics(run_dir)
    out_dir = Path(run_dir) / "plots"
    out_dir.mkdir(parents=True, exist_ok=True)
    panels = [("loss", "train loss", "loss.png"), ("disagreement", "consensus distance ‖θ̂_j − θ½_i‖ (w-weighted)",
                                                     "consensus.png"), ("bytes_sent", "MB sent", "bytes.png")]
    paths = []
    for key, label, name in panels:
        fig, ax = plt.subplots(figsize=(7, 4))
        plotted = False
        for pid, recs in sorted(data.items()):
            pts = [(r["istep"], r[key]) for r in recs if r.get("event") == "step" and r.get(key) is not None]
            if pts:
                xs, ys = zip(*pts)
                ys = [y / 1e6 for y in ys] if key == "bytes_sent" else ys
                ax.plot(xs, ys, label=f"peer {pid}", lw=1)
                plotted = True
        if not plotted:
            plt.close(fig)
            continue
        ax.set_xlabel("inner step")
        ax.set_ylabel(label)
        if key == "disagreement":
            ax.set_yscale("log")
        ax.legend(fontsize=7, ncol=2)
        fig.tight_layout()
        fig.savefig(out_dir / name, dpi=110)
        plt.close(fig)
        paths.append(out_dir / name)
    fig, ax = plt.subplots(figsize=(7, 4))
    for pid, recs in sorted(data.items()):
        pts = [(r.get("activation", -1), r["acc"]) for r in recs if r.get("event") == "eval"]
        if pts:
            xs, ys = zip(*pts)
            ax.plot(xs, ys, marker="o", label=f"peer {pid}", lw=1)
    ax.set_xlabel("block activation")
    ax.set_ylabel("eval exact-match accuracy")
    if ax.get_legend_handles_labels()[0]:  # no eval record before the final one: no legend (and no UserWarning)
        ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(out_dir / "eval_acc.png", dpi=110)
    plt.close(fig)
    paths.append(out_dir / "eval_acc.png")
    return paths


def write_report(run_dir: str | Path, title: str = "", plots: bool = True) -> Table | None:
    """Print and save (summary.md) the final table, and draw the plots (unless the caller drew them)."""
    table = run_table(run_dir, title)
    if table is None:
        return None
    console = Console(record=True, width=160)
    console.print(table)
    Path(run_dir, "summary.md").write_text("```\n" + console.export_text() + "```\n")
    if plots:
        make_plots(run_dir)
    return table
