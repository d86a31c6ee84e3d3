"""``comparison.md`` and ``comparison.png`` from the results :mod:`.run` gathered from the logs."""

import statistics


def spread(values):
    """``(mean, sample standard deviation (0 for one value), n)``."""
    values = [float(v) for v in values]
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return statistics.fmean(values), std, len(values)


def _fmt_spread(values):
    mean, std, n = spread(values)
    return f"{mean:.1f} ± {std:.1f} (n={n})"


def table(results):
    """The markdown table: one row per arm."""
    tasks = results["tasks"]
    metric = results["metric"]
    head = ["arm", "pretraining updates", "wall time (s)", "tokens seen", "final train loss"]
    head += [f"{t} {metric} (%)" for t in tasks]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for entry in results["arms"].values():
        curve = entry["curve"]
        row = [entry["label"], str(entry["updates"]), f"{entry['wall_s']:.0f}", f"{entry['tokens']:,}",
               f"{curve[-1][1]:.3f}" if curve else "-"]
        row += [_fmt_spread([r["value"] for r in entry["tasks"][t].values()]) for t in tasks]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def write_markdown(results, path):
    text = "\n".join([
        "# data2vec against masked language modelling",
        "",
        table(results),
        "",
        f"Downstream: the best validation {results['metric']} of each fine-tuning run "
        f"({results['finetune_updates']} updates, seeds {', '.join(map(str, results['seeds']))}), "
        "mean ± sample standard deviation over the seeds. Pretraining: one run per arm "
        f"(seed {results['pretrain_seed']}); wall time is fairseq's own clock; tokens seen = the sum over "
        "epochs of tokens per batch x updates. The losses are different objectives (data2vec: regression "
        "to teacher features; RoBERTa: cross-entropy in bits) and are not comparable across arms.",
        "",
        "Logs: " + ", ".join(f"{e['label']}: {e['log']}" for e in results["arms"].values()),
        "",
    ])
    path.write_text(text, encoding="utf-8")
    return text


def write_plot(results, path):
    """Left: pretraining loss / first logged loss against updates. Right: task scores."""
    import logging

    import matplotlib

    logging.getLogger("matplotlib").setLevel(logging.WARNING)  # fairseq's import leaves DEBUG on
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    arms = list(results["arms"].values())
    tasks = results["tasks"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for entry in arms:
        if entry["curve"]:
            x, y = zip(*entry["curve"])
            left.plot(x, np.asarray(y) / y[0], label=entry["label"])
    left.set_xlabel("update")
    left.set_ylabel("training loss / first logged loss")
    left.set_title("pretraining (each arm's own objective)")
    left.legend()

    width = 0.8 / max(1, len(arms))
    xs = np.arange(len(tasks))
    for i, entry in enumerate(arms):
        stats = [spread([r["value"] for r in entry["tasks"][t].values()]) for t in tasks]
        right.bar(xs + i * width, [s[0] for s in stats], width, yerr=[s[1] for s in stats],
                  capsize=3, label=entry["label"])
    right.set_xticks(xs + width * (len(arms) - 1) / 2)
    right.set_xticklabels(tasks)
    right.set_ylabel(f"validation {results['metric']} (%), mean ± std over seeds")
    right.set_title("fine-tuned")
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
