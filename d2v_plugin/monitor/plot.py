"""``d2v-plot RUN... --out report.png [--html report.html]``: is my data2vec run healthy?

One panel per statistic against the update count: the training loss, ``target_var`` and
``pred_var`` (with the collapse thresholds ``min_target_var`` / ``min_pred_var`` drawn and
every crossing below them marked), ``local_var`` (the modality encoder's output, when the
log has it), ``ema_decay``, the learning rate, ``masked_pct``, the throughput (``wps``: the
task's ntokens per second, or ``ups``: updates/s) and the validation loss. Several runs overlay, one
colour each. RUN is a save directory, a training log (fairseq json or simple format) or a
tensorboard log directory (see :mod:`d2v_plugin.monitor.logs`).
"""

import argparse
import logging
import sys
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

from .logs import Run, RunError, read_run

#: the model configs' defaults (d2v_plugin/models/data2vec2.py and models/v1/base.py), used
#: when a run does not record its own
DEFAULT_THRESHOLDS = {"min_target_var": 0.1, "min_pred_var": 0.01}
DEFAULT_COLLAPSE_CHECK_START = 5000


@dataclass(frozen=True)
class Panel:
    """One subplot: the first of ``keys`` a run logged, else its first key starting with
    ``prefix``, from its ``split`` (train or valid); ``threshold``: the config field whose
    value is a collapse threshold for it."""

    title: str
    keys: Tuple[str, ...]
    split: str = "train"
    threshold: Optional[str] = None
    prefix: Optional[str] = None


PANELS = (
    Panel("loss", ("loss",)),
    Panel("target_var (teacher targets' std)", ("target_var",), threshold="min_target_var"),
    Panel("pred_var (student predictions' std)", ("pred_var",), threshold="min_pred_var"),
    Panel("local_var (modality encoder output's std)", ("local_var",)),
    Panel("ema_decay", ("ema_decay",)),
    # one lr per parameter group (lr_default, lr_<group>) when the model has several
    Panel("learning rate", ("lr", "lr_default"), prefix="lr_"),
    Panel("masked_pct", ("masked_pct",)),
    Panel("throughput", ("wps", "ups")),
    Panel("validation loss", ("loss",), split="valid"),
)

#: fairseq's throughput keys; wps counts the task's ntokens (tokens, audio frames, images) per second
THROUGHPUT_NAMES = {"wps": "wps: ntokens/s", "ups": "ups: updates/s"}


def series(run: Run, panel: Panel) -> Tuple[Optional[str], List[Tuple[int, float]]]:
    """(key, points) of the first of the panel's keys the run logged, else (None, [])."""
    logged = run.train if panel.split == "train" else run.valid
    for key in panel.keys:
        if logged.get(key):
            return key, logged[key]
    for key in sorted(logged):
        if panel.prefix and key.startswith(panel.prefix) and logged[key]:
            return key, logged[key]
    return None, []


def thresholds(run: Run, overrides: Dict[str, Optional[float]]) -> Dict[str, float]:
    """The run's collapse thresholds: a command-line value, else the run's config, else the default."""
    out = {}
    for name, default in DEFAULT_THRESHOLDS.items():
        given = overrides.get(name)
        out[name] = given if given is not None else run.config.get(name, default)
    return out


def crossings(points: Sequence[Tuple[int, float]], limit: float) -> List[Tuple[int, float]]:
    """The points where the series goes below ``limit`` (the first point of each excursion)."""
    out = []
    above = True
    for step, value in points:
        if value < limit and above:
            out.append((step, value))
        above = value >= limit
    return out


def panel_title(panel: Panel, keys: Sequence[str]) -> str:
    if panel.title == "throughput" and keys:
        return f"throughput ({', '.join(THROUGHPUT_NAMES[k] for k in sorted(set(keys), key=panel.keys.index))})"
    return panel.title


def make_figure(runs: Sequence[Run], overrides: Optional[Dict[str, Optional[float]]] = None):
    """The matplotlib figure (Agg backend): one axis per :data:`PANELS` entry, one line per
    run that logged the panel's statistic, dashed red lines at the collapse thresholds and red
    triangles where a run crosses below one."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    overrides = overrides or {}
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    ncols = 3
    nrows = -(-len(PANELS) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(5.2 * ncols, 3.2 * nrows + 0.6), squeeze=False)
    for ax, panel in zip(axes.flat, PANELS):
        keys = []
        for i, run in enumerate(runs):
            key, points = series(run, panel)
            if not points:
                continue
            keys.append(key)
            color = colors[i % len(colors)]
            steps, values = zip(*points)
            ax.plot(steps, values, color=color, label=run.name, marker="." if len(points) < 30 else None)
            if panel.threshold:
                limit = thresholds(run, overrides)[panel.threshold]
                below = crossings(points, limit)
                if below:
                    ax.plot(*zip(*below), linestyle="none", marker="v", markersize=9, color="red",
                            label=f"{run.name}: below {panel.threshold}")
        if panel.threshold and keys:
            by_limit: Dict[float, List[str]] = {}
            for run in runs:
                if series(run, panel)[1]:
                    by_limit.setdefault(thresholds(run, overrides)[panel.threshold], []).append(run.name)
            for limit, names in sorted(by_limit.items()):
                which = f" ({', '.join(names)})" if len(by_limit) > 1 else ""
                off = " (check off)" if limit <= 0 else ""
                ax.axhline(limit, color="red", linestyle="--", linewidth=1, label=f"{panel.threshold} = {limit:g}{off}{which}")
            # the panel's legend names the thresholds and crossings; the figure's names the runs
            lines = [h for h in ax.get_lines() if h.get_label().startswith((panel.threshold, "below"))
                     or ": below " in h.get_label()]
            ax.legend(handles=lines, fontsize=7, loc="best")
        ax.set_title(panel_title(panel, keys), fontsize=11)
        ax.set_xlabel("updates", fontsize=8)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
        if not keys:
            what = "no validation in these runs" if panel.split == "valid" else f"{'/'.join(panel.keys)} not in the log"
            ax.text(0.5, 0.5, what, ha="center", va="center", transform=ax.transAxes, color="gray")
            ax.set_xticks([])
            ax.set_yticks([])
    for ax in list(axes.flat)[len(PANELS):]:
        ax.remove()
    handles = [plt.Line2D([], [], color=colors[i % len(colors)], label=run.name) for i, run in enumerate(runs)]
    fig.legend(handles=handles, loc="upper center", ncol=min(len(runs), 6), frameon=False, fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.5 / fig.get_figheight()))
    return fig


def write_html(runs: Sequence[Run], path: str, overrides: Optional[Dict[str, Optional[float]]] = None) -> None:
    """The same panels as an interactive plotly page (self-contained: works offline)."""
    try:
        import plotly.graph_objects as go
        from plotly.colors import DEFAULT_PLOTLY_COLORS
        from plotly.subplots import make_subplots
    except ImportError:
        raise RunError("--html needs plotly: pip install 'd2v_plugin[monitor]' (or pip install plotly)") from None
    overrides = overrides or {}
    ncols = 3
    nrows = -(-len(PANELS) // ncols)
    titles = [panel_title(p, [k for k in (series(r, p)[0] for r in runs) if k]) for p in PANELS]
    fig = make_subplots(rows=nrows, cols=ncols, subplot_titles=titles)
    for n, panel in enumerate(PANELS):
        row, col = n // ncols + 1, n % ncols + 1
        for i, run in enumerate(runs):
            key, points = series(run, panel)
            if not points:
                continue
            color = DEFAULT_PLOTLY_COLORS[i % len(DEFAULT_PLOTLY_COLORS)]
            steps, values = zip(*points)
            fig.add_trace(go.Scatter(x=steps, y=values, mode="lines", name=run.name, legendgroup=run.name,
                                     showlegend=n == 0, line=dict(color=color)), row=row, col=col)
            if panel.threshold:
                limit = thresholds(run, overrides)[panel.threshold]
                fig.add_hline(y=limit, line=dict(color="red", dash="dash", width=1), row=row, col=col,
                              annotation_text=f"{panel.threshold} = {limit:g}", annotation_font_size=9)
                below = crossings(points, limit)
                if below:
                    fig.add_trace(go.Scatter(x=[s for s, _ in below], y=[v for _, v in below], mode="markers",
                                             name=f"{run.name}: below {panel.threshold}",
                                             marker=dict(symbol="triangle-down", size=11, color="red")),
                                  row=row, col=col)
        fig.update_xaxes(title_text="updates", row=row, col=col)
    fig.update_layout(height=330 * nrows, title_text="data2vec training: " + ", ".join(r.name for r in runs))
    fig.write_html(path, include_plotlyjs=True)


def summary(run: Run, overrides: Dict[str, Optional[float]]) -> str:
    """One paragraph per run: where it was read, how far it got, its last values, collapse warnings."""
    steps = [s for points in run.train.values() for s, _ in points]
    lines = [f"{run.name}: {run.source} ({run.format}), "
             + (f"updates {min(steps)}-{max(steps)}" if steps else "no training intervals")]
    last = [f"{k} {run.train[k][-1][1]:g}" for k in ("loss", "target_var", "pred_var", "local_var", "ema_decay")
            if run.train.get(k)]
    lr_key, lr = series(run, PANELS[5])
    if lr:
        last.append(f"{lr_key} {lr[-1][1]:g}")
    if run.valid.get("loss"):
        last.append(f"valid loss {run.valid['loss'][-1][1]:g}")
    if last:
        lines.append("  last: " + ", ".join(last))
    limits = thresholds(run, overrides)
    start = int(run.config.get("collapse_check_start", DEFAULT_COLLAPSE_CHECK_START))
    for key, name in (("target_var", "min_target_var"), ("pred_var", "min_pred_var")):
        below = crossings(run.train.get(key, []), limits[name])
        early = [s for s, _ in below if s < start]
        late = [s for s, _ in below if s >= start]
        if late:
            lines.append(f"  WARNING: {key} fell below {name} = {limits[name]:g} at update "
                         + ", ".join(map(str, late)) + " (representation collapse?)")
        if early:
            lines.append(f"  note: {key} was below {name} = {limits[name]:g} at update " + ", ".join(map(str, early))
                         + f", before model.collapse_check_start = {start} (the model does not check it yet)")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="d2v-plot", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", metavar="RUN",
                   help="a save directory (its hydra/hydra_train.log), a training log (fairseq json or simple "
                        "format) or a tensorboard log directory; several overlay")
    p.add_argument("--out", required=True, help="the PNG (or any format matplotlib writes: .pdf, .svg) to write")
    p.add_argument("--html", help="also write an interactive page (plotly) to this path")
    p.add_argument("--names", help="comma-separated legend names, one per RUN (default: the save directories' names)")
    p.add_argument("--min-target-var", type=float,
                   help=f"collapse threshold drawn on target_var (default: the run's model.min_target_var, "
                        f"else {DEFAULT_THRESHOLDS['min_target_var']})")
    p.add_argument("--min-pred-var", type=float,
                   help=f"collapse threshold drawn on pred_var (default: the run's model.min_pred_var, "
                        f"else {DEFAULT_THRESHOLDS['min_pred_var']})")
    p.add_argument("--dpi", type=int, default=100, help="resolution of the image (default 100)")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    # importing d2v_plugin (fairseq) may leave the root logger at DEBUG: keep the libraries quiet
    for name in ("matplotlib", "tensorboard", "PIL"):
        logging.getLogger(name).setLevel(logging.WARNING)
    names = args.names.split(",") if args.names else [None] * len(args.runs)
    if len(names) != len(args.runs):
        print(f"d2v-plot: error: --names has {len(names)} names for {len(args.runs)} runs", file=sys.stderr)
        return 2
    overrides = {"min_target_var": args.min_target_var, "min_pred_var": args.min_pred_var}
    try:
        runs = [read_run(path, name) for path, name in zip(args.runs, names)]
        for run in runs:
            print(summary(run, overrides))
        fig = make_figure(runs, overrides)
        fig.savefig(args.out, dpi=args.dpi)
        print(f"wrote {args.out}")
        if args.html:
            write_html(runs, args.html, overrides)
            print(f"wrote {args.html}")
    except (RunError, OSError) as e:
        print(f"d2v-plot: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
