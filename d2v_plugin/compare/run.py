"""Does data2vec beat masked language modelling on my data? (``scripts/compare_text.sh``)

Pretrains each arm on the same binarized corpus for the same number of updates, once per
pretraining seed (one fairseq-hydra-train run each, ``common.log_format=json``), fine-tunes
every pretrained model on the same downstream tasks (:mod:`.tasks`) with the same recipe and
fine-tuning seeds, and writes ``comparison.md`` and ``comparison.png`` from the runs' own logs.
Arms:

* ``data2vec2``: ``config/pretraining/text_tiny.yaml`` (data2vec 2.0)
* ``data2vec1``: ``config/pretraining/v1_text_tiny.yaml`` (data2vec 1.0), FFN 256 like the others
* ``roberta``: ``config/compare/roberta_tiny.yaml`` (fairseq's ``roberta`` + ``masked_lm``)

Classification: the data2vec arms fine-tune with ``d2v_text_classification``
(``config/finetuning/glue/tiny.yaml``), the RoBERTa arm with fairseq's ``roberta`` +
``sentence_prediction`` (``config/compare/roberta_classification_tiny.yaml``): the same head,
recipe and criterion (``d2v_sentence_prediction``, which logs accuracy and macro-F1 over the
whole valid set). SQuAD: the data2vec arms with ``config/finetuning/squad/tiny.yaml``; fairseq's
roberta has no span-prediction head, so the RoBERTa arm's cell says so.

Runs go through a pool of ``--jobs`` workers: every pretraining first (the slowest arm
first), each model's fine-tunings as soon as it is pretrained. Every finished run leaves
``done.json`` in its directory and is reused on a re-run.
"""

import argparse
import concurrent.futures
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

from . import logs, report, tasks as tasklib

REPO = Path(__file__).resolve().parents[2]
CONFIG_DIR = REPO / "config"
BIN = Path(sys.executable).parent

ROBERTA_NO_SPAN_HEAD = "n/a: fairseq's roberta has no span head"
ARMS = {
    "data2vec2": {"label": "data2vec 2.0", "config": "pretraining/text_tiny", "overrides": []},
    # v1_text_tiny's FFN is 128; the other arms' is 256 (text_tiny: mlp_ratio 4 x dim 64)
    "data2vec1": {"label": "data2vec 1.0", "config": "pretraining/v1_text_tiny",
                  "overrides": ["model.ffn_embed_dim=256"]},
    "roberta": {"label": "RoBERTa (MLM)", "config": "compare/roberta_tiny", "overrides": [],
                "unsupported": {"squad": ROBERTA_NO_SPAN_HEAD}},
}
D2V_FINETUNE = {"classification": "finetuning/glue/tiny", "squad": "finetuning/squad/tiny"}
ROBERTA_FINETUNE = "compare/roberta_classification_tiny"
# the fields of a roberta checkpoint's model config that fix the encoder's shape
ROBERTA_SHAPE = ("encoder_layers", "encoder_embed_dim", "encoder_ffn_embed_dim",
                 "encoder_attention_heads", "max_positions")


class CompareError(Exception):
    """A problem with the user's input or a failed run, reported without a traceback."""


class Progress:
    """Progress lines with the time since the start and the count of finished runs."""

    def __init__(self, total_runs=0):
        self.start = time.time()
        self.total = total_runs
        self.finished = 0
        self._lock = threading.Lock()

    def elapsed(self):
        s = int(time.time() - self.start)
        return f"{s // 60}m{s % 60:02d}s"

    def say(self, msg):
        print(f"== [{self.elapsed()}] {msg}", flush=True)

    def note(self, msg):
        print(f"   [{self.elapsed()}] {msg}", flush=True)

    def run_done(self, what, seconds):
        with self._lock:
            self.finished += 1
            n = self.finished
        self.say(f"{what}: done in {seconds:.0f} s (run {n}/{self.total})")


PROGRESS = Progress()


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
        PROGRESS.say(f"{what}: finished before, reusing {run_dir}")
        return log_path
    run_dir.mkdir(parents=True, exist_ok=True)
    cmd = [str(BIN / "fairseq-hydra-train"), "--config-dir", str(CONFIG_DIR), "--config-name", config,
           f"checkpoint.save_dir={run_dir}", f"optimization.max_update={max_update}",
           "common.log_format=json", *overrides]
    if args.gpu:
        cmd += ["common.cpu=false"]
    PROGRESS.say(f"{what}: {max_update} updates -> {run_dir}")
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
                    PROGRESS.note(f"{what}: update {n}/{max_update}, loss {rec.get('loss')}, "
                                  f"{time.time() - start:.0f} s")
                    next_report = (n // step + 1) * step
        rc = proc.wait()
    if rc != 0:
        raise CompareError(f"{what} failed (exit {rc}); see {log_path}")
    seconds = time.time() - start
    done.write_text(json.dumps({"command": cmd, "seconds": seconds}, indent=1))
    PROGRESS.run_done(what, seconds)
    return log_path


# ----------------------------------------------------------------------------
# data


def prepare_corpus(args):
    """Binarize the pretraining corpus (``d2v_plugin.prep.text`` skips what it has done)."""
    from d2v_plugin.prep import text

    data = args.out / "data"
    PROGRESS.say(f"corpus: {args.corpus or 'the embedded default corpus (Python documentation)'} -> {data}/bin")
    try:
        text.prepare_text(args.corpus, data, vocab_size=args.vocab_size, workers=args.workers)
    except text.PrepError as e:
        raise CompareError(f"corpus preparation: {e}") from e
    return data


# ----------------------------------------------------------------------------
# the runs


def roberta_shape(checkpoint):
    """The encoder-shape overrides of a fairseq roberta checkpoint, read from its config."""
    import torch

    ckpt = torch.load(checkpoint, map_location="cpu", weights_only=False)
    model = ckpt["cfg"]["model"]
    return [f"model.{k}={getattr(model, k) if hasattr(model, k) else model[k]}" for k in ROBERTA_SHAPE]


def pretrain(arm, pretrain_seed, data, args):
    """One pretraining run; its summary (cost, curve) and checkpoint."""
    spec = ARMS[arm]
    run_dir = args.out / "pretrain" / arm / f"seed{pretrain_seed}"
    overrides = [f"task.data={data / 'bin'}", f"common.seed={pretrain_seed}",
                 *spec["overrides"], *args.pretrain_override]
    log_path = hydra_train(run_dir, spec["config"], overrides, args.updates, args,
                           f"pretrain {arm}, seed {pretrain_seed}")
    return {"seed": pretrain_seed, "log": str(log_path), "checkpoint": str(run_dir / "checkpoint_last.pt"),
            **logs.pretraining_summary(log_path)}


def finetune_command(arm, checkpoint, task, data):
    """(config, overrides) of fine-tuning ``arm``'s ``checkpoint`` on ``task``."""
    select = [f"checkpoint.best_checkpoint_metric={task.metrics[0]}"]
    if task.kind == "squad":
        return D2V_FINETUNE["squad"], [
            f"model.model_path={checkpoint}", f"task.data={task.dir}", f"task.train_file={task.info['train_file']}",
            f"task.valid_file={task.info['valid_file']}",
            f"task.version_2_with_negative={str(task.info['version'] == '2.0').lower()}",
            f"task.dict_path={data / 'bin' / 'dict.txt'}", "task.bpe=sentencepiece",
            f"task.sentencepiece_model={data / 'spm.model'}", *select]
    common = [f"task.data={task.dir}", f"task.num_classes={task.info['num_classes']}",
              "criterion.report=macro_f1", *select]
    if arm == "roberta":
        return ROBERTA_FINETUNE, [f"checkpoint.restore_file={checkpoint}", *roberta_shape(checkpoint), *common]
    return D2V_FINETUNE["classification"], [f"model.model_path={checkpoint}", *common]


def finetune(arm, pretrained, task, seed, data, args):
    """One fine-tuning run; every metric of ``task`` at its best validation (by the first metric)."""
    ps = pretrained["seed"]
    run_dir = args.out / "finetune" / arm / f"pretrain{ps}" / task.name / f"seed{seed}"
    config, overrides = finetune_command(arm, pretrained["checkpoint"], task, data)
    overrides += [f"common.seed={seed}", "checkpoint.no_save=true", *args.finetune_override]
    log_path = hydra_train(run_dir, config, overrides, args.finetune_updates, args,
                           f"fine-tune {arm} (pretraining seed {ps}) on {task.name}, seed {seed}")
    best = logs.best_validation(log_path, task.metrics[0], task.metrics[1:])
    return {"pretrain_seed": ps, "seed": seed, "values": best["values"], "num_updates": best["num_updates"],
            "log": str(log_path)}


def run_all(tasks, data, args):
    """Every pretraining and fine-tuning run, ``args.jobs`` at a time; results.json's ``arms``."""
    arms = {arm: {"label": ARMS[arm]["label"], "pretrain": [], "tasks": {}} for arm in args.arms}
    todo_finetune = []
    for arm in args.arms:
        unsupported = ARMS[arm].get("unsupported", {})
        for t in tasks:
            na = unsupported.get(t.kind)
            arms[arm]["tasks"][t.name] = {"na": na, "runs": []}
            if not na:
                todo_finetune.append((arm, t))
    PROGRESS.total = len(args.arms) * len(args.pretrain_seeds) + (
        len(todo_finetune) * len(args.pretrain_seeds) * len(args.seeds))
    PROGRESS.say(f"{PROGRESS.total} runs, {args.jobs} at a time ({args.threads or 'default'} threads each)")

    pool = concurrent.futures.ThreadPoolExecutor(max(1, args.jobs))
    pending = {}
    try:
        # the slowest pretraining first (data2vec 2.0, then 1.0, then RoBERTa: the order of ARMS)
        for arm in sorted(args.arms, key=list(ARMS).index):
            for ps in args.pretrain_seeds:
                pending[pool.submit(pretrain, arm, ps, data, args)] = ("pretrain", arm, None)
        while pending:
            finished, _ = concurrent.futures.wait(pending, return_when=concurrent.futures.FIRST_COMPLETED)
            for fut in finished:
                kind, arm, task = pending.pop(fut)
                result = fut.result()
                if kind == "pretrain":
                    arms[arm]["pretrain"].append(result)
                    for a, t in todo_finetune:
                        if a == arm:
                            for seed in args.seeds:
                                pending[pool.submit(finetune, arm, result, t, seed, data, args)] = ("finetune", arm, t)
                else:
                    arms[arm]["tasks"][task.name]["runs"].append(result)
    except BaseException:
        for fut in pending:
            fut.cancel()
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    for entry in arms.values():  # a fixed order, whatever order the runs finished in
        entry["pretrain"].sort(key=lambda r: r["seed"])
        for cell in entry["tasks"].values():
            cell["runs"].sort(key=lambda r: (r["pretrain_seed"], r["seed"]))
    return arms


def main(argv=None):
    args = get_parser().parse_args(argv)
    try:
        return _main(args)
    except (CompareError, tasklib.TaskError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


def _main(args):
    global PROGRESS
    PROGRESS = Progress()
    unknown = [a for a in args.arms if a not in ARMS]
    if unknown:
        raise CompareError(f"--arms: unknown arm(s) {', '.join(unknown)} (known: {', '.join(ARMS)})")
    if args.corpus and not Path(args.corpus).exists():
        raise CompareError(f"corpus not found: {args.corpus}")
    for name in ("seeds", "pretrain_seeds"):
        if not getattr(args, name):
            raise CompareError(f"--{name.replace('_', '-')}: give at least one seed")
    if not args.tasks and not args.task and not args.squad:
        args.tasks = ["topic"]
    if not args.threads:
        args.threads = max(1, (os.cpu_count() or 1) // max(1, args.jobs)) if not args.gpu else 0
    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    tasks = tasklib.build_tasks(args)

    data = prepare_corpus(args)
    tasks = [tasklib.prepare(t, data, args.out) for t in tasks]
    for t in tasks:
        PROGRESS.say(f"task {t.name}: {t.describe()}; reports {', '.join(tasklib.LABELS[m] for m in t.metrics)}")

    arms = run_all(tasks, data, args)
    results = {"arms": arms,
               "tasks": [{"name": t.name, "kind": t.kind, "metrics": list(t.metrics)} for t in tasks],
               "seeds": args.seeds, "pretrain_seeds": args.pretrain_seeds,
               "finetune_updates": args.finetune_updates, "elapsed_s": round(time.time() - PROGRESS.start, 1)}
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    md = report.write_markdown(results, args.out / "comparison.md")
    report.write_plot(results, args.out / "comparison.png")
    print()
    print(md)
    PROGRESS.say(f"wrote {args.out / 'comparison.md'} and {args.out / 'comparison.png'}")
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
        "the embedded corpus (Python's documentation) and the topic task derived from it, about 11 minutes on 2 "
        "quiet CPU cores (--jobs 2). Re-running reuses every finished run.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("corpus", nargs="?", type=Path,
                   help="pretraining text: a file (blank lines separate documents), a tar archive or a directory "
                   "of *.txt files (see python -m d2v_plugin.prep.text); default: the embedded corpus")
    p.add_argument("--out", type=Path, default=Path("compare_text"), help="output directory")
    p.add_argument("--arms", type=lambda s: [a for a in s.split(",") if a], default=list(ARMS),
                   help=f"comma-separated arms to run, of {', '.join(ARMS)}")
    p.add_argument("--updates", type=int, default=3000, help="pretraining updates, the same for every arm")
    p.add_argument("--pretrain-seeds", type=_ints, default=[1],
                   help="comma-separated pretraining seeds (common.seed): each arm is pretrained once per seed, "
                   "and every pretrained model is fine-tuned with every --seeds seed")
    p.add_argument("--seeds", type=_ints, default=[1, 2, 3],
                   help="comma-separated fine-tuning seeds (common.seed), the same for every arm and task")
    p.add_argument("--finetune-updates", type=int, default=300, help="updates of every fine-tuning run")
    p.add_argument("--tasks", type=lambda s: [t for t in s.split(",") if t], default=[],
                   help="comma-separated derived tasks of d2v_plugin.prep.text_tasks (topic, next_sentence); "
                   "default: topic (next_sentence stays at chance at this size and takes longer), unless --task or "
                   "--squad is given")
    p.add_argument("--task", action="append", default=[], metavar="NAME=TRAIN,VALID[,TEXT[,TEXT2[,LABEL]]]",
                   help="a labelled CSV/TSV set (header row; .tsv tab-separated), e.g. GLUE's SST-2 "
                   "sst2=SST-2/train.tsv,SST-2/dev.tsv,sentence or TweetEval emotion exported as text,label; "
                   "columns default to text and label; reports accuracy and macro-F1; repeatable")
    p.add_argument("--squad", action="append", default=[], metavar="[NAME=]DIR[,TRAIN_FILE,VALID_FILE]",
                   help="a SQuAD-format task: DIR holds train.json/dev.json or datasets/squad/prepare.sh's "
                   "train-v1.1.json/dev-v1.1.json or train-v2.0.json/dev-v2.0.json (the version is the dev file's "
                   "'version' field); name defaults to squad; reports SQuAD F1 and exact match (the data2vec "
                   "arms; fairseq's roberta has no span head); repeatable")
    p.add_argument("--metric", action="append", default=[], metavar="NAME=METRIC",
                   help="the metric that selects the counted validation of task NAME's fine-tunings (every metric "
                   "is read at that validation): accuracy or macro_f1 (classification, default accuracy), f1 or "
                   "exact (SQuAD, default f1); repeatable")
    p.add_argument("--task-seed", type=int, default=0, help="seed of the derived tasks' train/valid split")
    p.add_argument("--vocab-size", type=int, default=4000, help="sentencepiece vocabulary of the corpus")
    p.add_argument("--workers", type=int, default=2, help="processes for corpus preparation")
    p.add_argument("--jobs", type=int, default=2,
                   help="training runs at the same time (pretrainings, then each model's fine-tunings as soon as it "
                   "is pretrained); on a CPU, at most the number of cores")
    p.add_argument("--threads", type=int, default=0,
                   help="OMP_NUM_THREADS of each training run (0: the CPU cores divided by --jobs; with --gpu: unset)")
    p.add_argument("--gpu", action="store_true", help="train on the GPU (common.cpu=false); default: CPU")
    p.add_argument("--pretrain-override", action="append", default=[], metavar="KEY=VALUE",
                   help="hydra override for every pretraining run (repeatable), e.g. dataset.batch_size=16")
    p.add_argument("--finetune-override", action="append", default=[], metavar="KEY=VALUE",
                   help="hydra override for every fine-tuning run (repeatable), e.g. optimization.lr=[0.0005]")
    return p


if __name__ == "__main__":
    sys.exit(main())
