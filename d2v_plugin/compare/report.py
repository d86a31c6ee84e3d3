"""``comparison.md`` and ``comparison.png`` from the results :mod:`.run` gathered from the logs."""

import statistics

from .tasks import LABELS


def spread(values):
    """``(mean, sample standard deviation (0 for one value), n)``."""
    values = [float(v) for v in values]
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return statistics.fmean(values), std, len(values)


def _fmt_spread(values, digits=1):
    mean, std, n = spread(values)
    return f"{mean:.{digits}f} ± {std:.{digits}f} (n={n})"


def task_values(cell, metric):
    """The values of ``metric`` over a task cell's runs (every pretraining x fine-tuning seed)."""
    return [r["values"][metric] for r in cell["runs"]]


def _cost(entry):
    """The pretraining columns: one run's numbers, or means (the final loss with its spread) over seeds."""
    runs = entry["pretrain"]
    updates = sorted({r["updates"] for r in runs})
    losses = [r["curve"][-1][1] for r in runs if r["curve"]]
    if len(runs) == 1:
        loss = f"{losses[0]:.3f}" if losses else "-"
    else:
        loss = _fmt_spread(losses, 3) if losses else "-"
    return ["/".join(map(str, updates)), f"{statistics.fmean(r['wall_s'] for r in runs):.0f}",
            f"{round(statistics.fmean(r['tokens'] for r in runs)):,}", loss]


def columns(results):
    """(task name, metric) of every task column, in order."""
    return [(t["name"], m) for t in results["tasks"] for m in t["metrics"]]


def table(results):
    """The markdown table: one row per arm."""
    head = ["arm", "pretraining updates", "wall time (s)", "tokens seen", "final train loss"]
    head += [f"{name} {LABELS[m]} (%)" for name, m in columns(results)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for entry in results["arms"].values():
        row = [entry["label"], *_cost(entry)]
        for name, m in columns(results):
            cell = entry["tasks"][name]
            row.append(cell["na"] if cell["na"] else _fmt_spread(task_values(cell, m)))
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def _seeds(seeds):
    return ", ".join(map(str, seeds))


def write_markdown(results, path):
    p, f = results["pretrain_seeds"], results["seeds"]
    selection = "; ".join(f"{t['name']}: {LABELS[t['metrics'][0]]}" for t in results["tasks"])
    text = "\n".join([
        "# data2vec against masked language modelling",
        "",
        table(results),
        "",
        f"Downstream: each fine-tuning run ({results['finetune_updates']} updates) counts its validation "
        f"with the best selection metric ({selection}; ties: the earliest), and every metric of the task "
        "is read at that validation (on the whole valid set: accuracy and macro-F1, or the official SQuAD "
        "F1 and exact match). Each cell is the mean ± sample standard deviation over "
        f"n = {len(p)} pretraining seed(s) ({_seeds(p)}) x {len(f)} fine-tuning seed(s) ({_seeds(f)}). "
        f"Pretraining: one run per arm and seed{'; wall time and tokens are means over the seeds' if len(p) > 1 else ''}; "
        "wall time is fairseq's own clock; tokens seen = the sum over epochs of tokens per batch x updates. "
        "The losses are different objectives (data2vec: regression to teacher features; RoBERTa: "
        "cross-entropy in bits) and are not comparable across arms.",
        "",
        "Pretraining logs: " + ", ".join(f"{e['label']}: {', '.join(r['log'] for r in e['pretrain'])}"
                                         for e in results["arms"].values()),
        "",
    ])
    path.write_text(text, encoding="utf-8")
    return text


def write_plot(results, path):
    """Left: pretraining loss / first logged loss against updates. Right: each task's first metric."""
    import logging

    import matplotlib

    logging.getLogger("matplotlib").setLevel(logging.WARNING)  # fairseq's import leaves DEBUG on
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    arms = list(results["arms"].values())
    tasks = results["tasks"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for i, entry in enumerate(arms):
        color = f"C{i}"
        for j, run in enumerate(entry["pretrain"]):
            if run["curve"]:
                x, y = zip(*run["curve"])
                left.plot(x, np.asarray(y) / y[0], color=color, alpha=1.0 if j == 0 else 0.5,
                          label=entry["label"] if j == 0 else None)
    left.set_xlabel("update")
    left.set_ylabel("training loss / first logged loss")
    left.set_title("pretraining (each arm's own objective; one line per seed)")
    left.legend()

    width = 0.8 / max(1, len(arms))
    xs = np.arange(len(tasks))
    for i, entry in enumerate(arms):
        means, stds = [], []
        for t in tasks:
            cell = entry["tasks"][t["name"]]
            mean, std, _ = spread(task_values(cell, t["metrics"][0])) if cell["runs"] else (np.nan, 0.0, 0)
            means.append(mean)
            stds.append(std)
        right.bar(xs + i * width, means, width, yerr=stds, capsize=3, label=entry["label"], color=f"C{i}")
    right.set_xticks(xs + width * (len(arms) - 1) / 2)
    right.set_xticklabels([f"{t['name']}\n{LABELS[t['metrics'][0]]}" for t in tasks])
    right.set_ylabel("validation score (%), mean ± std over seeds")
    right.set_title("fine-tuned (missing bar: not applicable to the arm)")
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
