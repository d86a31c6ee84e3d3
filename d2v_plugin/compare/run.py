"""Does data2vec beat masked language modelling on my data? (``scripts/compare_text.sh``)

Pretrains each arm on the same binarized corpus for the same number of updates (one
fairseq-hydra-train run each, ``common.log_format=json``), fine-tunes each on the same
downstream tasks with the same recipe and seeds, and writes ``comparison.md`` and
``comparison.png`` from the runs' own logs. Arms:

* ``data2vec2``: ``config/pretraining/text_tiny.yaml`` (data2vec 2.0)
* ``data2vec1``: ``config/pretraining/v1_text_tiny.yaml`` (data2vec 1.0), FFN 256 like the others
* ``roberta``: ``config/compare/roberta_tiny.yaml`` (fairseq's ``roberta`` + ``masked_lm``)

The data2vec arms fine-tune with ``d2v_text_classification`` (``config/finetuning/glue/tiny.yaml``),
the RoBERTa arm with fairseq's ``roberta`` + ``sentence_prediction``
(``config/compare/roberta_classification_tiny.yaml``): the same head and recipe.

Every finished run leaves ``done.json`` in its directory and is reused on a re-run.
"""

import argparse
import concurrent.futures
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from d2v_plugin.prep import classification, text_tasks

from . import logs, report

REPO = Path(__file__).resolve().parents[2]
CONFIG_DIR = REPO / "config"
BIN = Path(sys.executable).parent

ARMS = {
    "data2vec2": {"label": "data2vec 2.0", "config": "pretraining/text_tiny", "overrides": []},
    # v1_text_tiny's FFN is 128; the other arms' is 256 (text_tiny: mlp_ratio 4 x dim 64)
    "data2vec1": {"label": "data2vec 1.0", "config": "pretraining/v1_text_tiny",
                  "overrides": ["model.ffn_embed_dim=256"]},
    "roberta": {"label": "RoBERTa (MLM)", "config": "compare/roberta_tiny", "overrides": []},
}
D2V_FINETUNE = "finetuning/glue/tiny"
ROBERTA_FINETUNE = "compare/roberta_classification_tiny"
# the fields of a roberta checkpoint's model config that fix the encoder's shape
ROBERTA_SHAPE = ("encoder_layers", "encoder_embed_dim", "encoder_ffn_embed_dim",
                 "encoder_attention_heads", "max_positions")
METRIC = "accuracy"


class CompareError(Exception):
    """A problem with the user's input or a failed run, reported without a traceback."""


def say(msg):
    print(f"== {msg}", flush=True)


# ----------------------------------------------------------------------------
# running fairseq


def _env(threads):
    env = dict(os.environ)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("PYTHONWARNINGS", "ignore")
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def hydra_train(run_dir: Path, config: str, overrides, max_update: int, args, what: str):
    """Run fairseq-hydra-train into ``run_dir`` (log: run_dir/train.log) unless it finished.

    Returns the log's path. Prints a progress line about every tenth of the run.
    """
    done = run_dir / "done.json"
    log_path = run_dir / "train.log"
    if done.is_file() and log_path.is_file():
        say(f"{what}: finished before, reusing {run_dir}")
        return log_path
    run_dir.mkdir(parents=True, exist_ok=True)
    cmd = [str(BIN / "fairseq-hydra-train"), "--config-dir", str(CONFIG_DIR), "--config-name", config,
           f"checkpoint.save_dir={run_dir}", f"optimization.max_update={max_update}",
           "common.log_format=json", *overrides]
    if args.gpu:
        cmd += ["common.cpu=false"]
    say(f"{what}: {max_update} updates -> {run_dir}")
    start = time.time()
    step = max(1, max_update // 10)
    next_report = step
    with open(log_path, "a", encoding="utf-8") as log_file:
        log_file.write("# " + " ".join(cmd) + "\n")
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env=_env(args.threads), cwd=run_dir)
        for line in proc.stdout:
            log_file.write(line)
            if "][train_inner][" in line:
                rec = logs.parse_line(line)
                if rec and int(rec.get("num_updates", 0)) >= next_report:
                    n = int(rec["num_updates"])
                    print(f"   {what}: update {n}/{max_update}, loss {rec.get('loss')}, "
                          f"{time.time() - start:.0f} s", flush=True)
                    next_report = (n // step + 1) * step
        rc = proc.wait()
    if rc != 0:
        raise CompareError(f"{what} failed (exit {rc}); see {log_path}")
    done.write_text(json.dumps({"command": cmd, "seconds": time.time() - start}, indent=1))
    return log_path


# ----------------------------------------------------------------------------
# data


def prepare_corpus(args):
    """Binarize the pretraining corpus (``d2v_plugin.prep.text`` skips what it has done)."""
    from d2v_plugin.prep import text

    data = args.out / "data"
    say(f"corpus: {args.corpus or 'the embedded default corpus (Python documentation)'} -> {data}/bin")
    try:
        text.prepare_text(args.corpus, data, vocab_size=args.vocab_size, workers=args.workers)
    except text.PrepError as e:
        raise CompareError(f"corpus preparation: {e}") from e
    return data


def _examples(pairs, where):
    out = []
    for i, (texts, label) in enumerate(pairs):
        texts = (texts,) if isinstance(texts, str) else tuple(texts)
        out.append(classification.Example(texts, str(label), f"{where}:{i + 1}"))
    return out


def parse_task_file(spec):
    """``NAME=TRAIN,VALID[,TEXT_COLUMN[,TEXT2_COLUMN[,LABEL_COLUMN]]]`` -> (name, reader)."""
    if "=" not in spec:
        raise CompareError(f"--task {spec!r}: expected NAME=TRAIN,VALID[,TEXT[,TEXT2[,LABEL]]]")
    name, rest = spec.split("=", 1)
    parts = rest.split(",")
    if not name or len(parts) < 2 or len(parts) > 5:
        raise CompareError(f"--task {spec!r}: expected NAME=TRAIN,VALID[,TEXT[,TEXT2[,LABEL]]]")
    train, valid = parts[:2]
    text = parts[2] if len(parts) > 2 and parts[2] else "text"
    text2 = parts[3] if len(parts) > 3 and parts[3] else None
    label = parts[4] if len(parts) > 4 and parts[4] else "label"
    columns = [text] + ([text2] if text2 else [])

    def read():
        try:
            return {"train": classification.read_table(train, columns, label),
                    "valid": classification.read_table(valid, columns, label)}
        except classification.PrepError as e:
            raise CompareError(f"--task {name}: {e}") from e

    return name, read


def task_readers(args):
    """Task name -> function returning ``{"train": [Example], "valid": [Example]}``."""
    readers = {}
    for name in args.tasks:
        if name not in text_tasks.TASKS:
            raise CompareError(f"--tasks: unknown derived task {name!r} (known: {', '.join(text_tasks.TASKS)})")
        fn = text_tasks.TASKS[name]

        def read(fn=fn, name=name):
            train, valid = fn(args.task_seed)
            return {"train": _examples(train, f"{name}/train"), "valid": _examples(valid, f"{name}/valid")}

        readers[name] = read
    for spec in args.task:
        name, read = parse_task_file(spec)
        if name in readers:
            raise CompareError(f"task {name!r} named twice")
        readers[name] = read
    return readers


def prepare_task(name, read, data, args):
    """Tokenize the task with the pretraining sentencepiece model; returns (dir, num_classes)."""
    out = args.out / "tasks" / name
    summary = out / "summary.json"
    if not summary.is_file():
        say(f"task {name}: tokenizing and binarizing -> {out}")
        tokenizer = classification.make_tokenizer(f"spm:{data / 'spm.model'}", data / "bin" / "dict.txt")
        try:
            classification.write_dataset(read(), out, tokenizer)
        except classification.PrepError as e:
            raise CompareError(f"task {name}: {e}") from e
    info = json.loads(summary.read_text())
    return out, int(info["num_classes"]), info


# ----------------------------------------------------------------------------
# the arms


def roberta_shape(checkpoint):
    """The encoder-shape overrides of a fairseq roberta checkpoint, read from its config."""
    import torch

    ckpt = torch.load(checkpoint, map_location="cpu", weights_only=False)
    model = ckpt["cfg"]["model"]
    return [f"model.{k}={getattr(model, k) if hasattr(model, k) else model[k]}" for k in ROBERTA_SHAPE]


def finetune(arm, checkpoint, task_dir, num_classes, seed, args):
    run_dir = args.out / "finetune" / arm / task_dir.name / f"seed{seed}"
    common = [f"task.data={task_dir}", f"task.num_classes={num_classes}", f"common.seed={seed}",
              "checkpoint.no_save=true", *args.finetune_override]
    if arm == "roberta":
        config = ROBERTA_FINETUNE
        overrides = [f"checkpoint.restore_file={checkpoint}", *roberta_shape(checkpoint), *common]
    else:
        config = D2V_FINETUNE
        overrides = [f"model.model_path={checkpoint}", *common]
    log_path = hydra_train(run_dir, config, overrides, args.finetune_updates, args,
                           f"fine-tune {arm} on {task_dir.name}, seed {seed}")
    return logs.best_validation(log_path, METRIC)["value"], log_path


def run_arm(arm, data, tasks, args):
    """Pretrain ``arm`` and fine-tune it on every task and seed; its entry of results.json."""
    spec = ARMS[arm]
    run_dir = args.out / "pretrain" / arm
    overrides = [f"task.data={data / 'bin'}", f"common.seed={args.pretrain_seed}",
                 *spec["overrides"], *args.pretrain_override]
    log_path = hydra_train(run_dir, spec["config"], overrides, args.updates, args, f"pretrain {arm}")
    checkpoint = run_dir / "checkpoint_last.pt"
    entry = {"label": spec["label"], "log": str(log_path), **logs.pretraining_summary(log_path), "tasks": {}}
    for name, (task_dir, num_classes, _) in tasks.items():
        entry["tasks"][name] = {}
        for seed in args.seeds:
            value, ft_log = finetune(arm, checkpoint, task_dir, num_classes, seed, args)
            entry["tasks"][name][str(seed)] = {"value": value, "log": str(ft_log)}
    return entry


def main(argv=None):
    args = get_parser().parse_args(argv)
    try:
        return _main(args)
    except CompareError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


def _main(args):
    unknown = [a for a in args.arms if a not in ARMS]
    if unknown:
        raise CompareError(f"--arms: unknown arm(s) {', '.join(unknown)} (known: {', '.join(ARMS)})")
    if args.corpus and not Path(args.corpus).exists():
        raise CompareError(f"corpus not found: {args.corpus}")
    if not args.tasks and not args.task:
        args.tasks = list(text_tasks.TASKS)
    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    readers = task_readers(args)

    data = prepare_corpus(args)
    tasks = {name: prepare_task(name, read, data, args) for name, read in readers.items()}
    for name, (_, _, info) in tasks.items():
        say(f"task {name}: {info['examples']}, {info['num_classes']} classes")

    results = {"arms": {}, "tasks": list(tasks), "metric": METRIC, "seeds": args.seeds,
               "pretrain_seed": args.pretrain_seed, "finetune_updates": args.finetune_updates}
    # each arm (pretraining, then its fine-tunings) runs on its own; --jobs of them at a time
    with concurrent.futures.ThreadPoolExecutor(max(1, args.jobs)) as pool:
        entries = list(pool.map(lambda arm: run_arm(arm, data, tasks, args), args.arms))
    results["arms"] = dict(zip(args.arms, entries))

    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    md = report.write_markdown(results, args.out / "comparison.md")
    report.write_plot(results, args.out / "comparison.png")
    print()
    print(md)
    say(f"wrote {args.out / 'comparison.md'} and {args.out / 'comparison.png'}")
    return 0


def _ints(text):
    try:
        return [int(x) for x in text.split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def get_parser():
    p = argparse.ArgumentParser(
        prog="bash scripts/compare_text.sh",
        description="Pretrain data2vec 2.0, data2vec 1.0 and a RoBERTa masked-LM baseline (tiny, same size, "
        "tokenizer, data and updates), fine-tune each on the same tasks with the same recipe and seeds, and "
        "write OUT/comparison.md and OUT/comparison.png from the runs' own fairseq logs. Without arguments: "
        "the embedded corpus (Python's documentation) and two tasks derived from it (topic, next_sentence), "
        "about 15 minutes on 2 CPU cores. Re-running reuses every finished run.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("corpus", nargs="?", type=Path,
                   help="pretraining text: a file (blank lines separate documents), a tar archive or a directory "
                   "of *.txt files (see python -m d2v_plugin.prep.text); default: the embedded corpus")
    p.add_argument("--out", type=Path, default=Path("compare_text"), help="output directory")
    p.add_argument("--arms", type=lambda s: [a for a in s.split(",") if a], default=list(ARMS),
                   help=f"comma-separated arms to run, of {', '.join(ARMS)}")
    p.add_argument("--updates", type=int, default=3000, help="pretraining updates, the same for every arm")
    p.add_argument("--pretrain-seed", type=int, default=1, help="common.seed of every pretraining run")
    p.add_argument("--seeds", type=_ints, default=[1, 2, 3],
                   help="comma-separated fine-tuning seeds (common.seed), the same for every arm and task")
    p.add_argument("--finetune-updates", type=int, default=300, help="updates of every fine-tuning run")
    p.add_argument("--tasks", type=lambda s: [t for t in s.split(",") if t], default=[],
                   help="comma-separated derived tasks of d2v_plugin.prep.text_tasks (topic, next_sentence); "
                   "default: both, unless --task is given")
    p.add_argument("--task", action="append", default=[], metavar="NAME=TRAIN,VALID[,TEXT[,TEXT2[,LABEL]]]",
                   help="a labelled CSV/TSV set (header row; .tsv tab-separated), e.g. GLUE's SST-2 "
                   "sst2=SST-2/train.tsv,SST-2/dev.tsv,sentence or TweetEval emotion exported as text,label; "
                   "columns default to text and label; repeatable")
    p.add_argument("--task-seed", type=int, default=0, help="seed of the derived tasks' train/valid split")
    p.add_argument("--vocab-size", type=int, default=4000, help="sentencepiece vocabulary of the corpus")
    p.add_argument("--workers", type=int, default=2, help="processes for corpus preparation")
    p.add_argument("--threads", type=int, default=0, help="OMP_NUM_THREADS of the training runs (0: unset)")
    p.add_argument("--jobs", type=int, default=1,
                   help="arms trained at the same time (each arm's runs stay in order); on a CPU, at most "
                   "the number of cores, with --threads 1")
    p.add_argument("--gpu", action="store_true", help="train on the GPU (common.cpu=false); default: CPU")
    p.add_argument("--pretrain-override", action="append", default=[], metavar="KEY=VALUE",
                   help="hydra override for every pretraining run (repeatable), e.g. dataset.batch_size=16")
    p.add_argument("--finetune-override", action="append", default=[], metavar="KEY=VALUE",
                   help="hydra override for every fine-tuning run (repeatable), e.g. optimization.lr=[0.0005]")
    return p


if __name__ == "__main__":
    sys.exit(main())
