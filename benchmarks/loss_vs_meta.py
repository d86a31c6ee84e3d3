#!/usr/bin/env python3
"""Training loss of this plugin and of Meta's data2vec code on the same config, over seeds.

Trains ``config/pretraining/text_tiny.yaml`` (or another config) for several seeds with
the real ``fairseq-hydra-train``, in child processes, and, given ``--meta-src``, the same
model with Meta's fairseq ``examples/data2vec`` (``benchmarks/configs/meta_text_tiny``),
alternating the two implementations seed by seed. It reads the ``train_inner`` lines of
every run (JSON progress log) and prints, at the chosen updates, the loss as mean ± std
over seeds [min, max], with ``target_var`` and ``pred_var``; ``--json-out`` keeps every
logged interval of every run.

A logged value at update U is fairseq's average over the log interval that ends at U
(``--log-interval``, default 10 updates). Both criteria log ``loss`` per predicted (masked)
token: the summed regression loss divided by ``sample_size``.

Ours only::

    python benchmarks/loss_vs_meta.py --quickstart-corpus /tmp/d2v_loss/data --seeds 1 2 3 4

With Meta's side (a folder holding Meta's ``examples/`` that imports with this fairseq;
nothing here fetches or patches it)::

    python benchmarks/loss_vs_meta.py --quickstart-corpus /tmp/d2v_loss/data --seeds 1 2 3 4 \\
        --meta-src /tmp/meta_src --meta-env PYTHONPATH=/tmp/meta_deps --json-out loss.json

Hydra overrides after ``--`` go to both implementations. See benchmarks/LOSS.md.
"""

import argparse
import datetime
import json
import math
import os
import re
import shlex
import statistics
import subprocess
import sys
import time
from typing import Dict, List, Optional

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from child import child_code  # noqa: E402

# Runs inside the child: pins torch's thread count, then starts fairseq-hydra-train.
CHILD = child_code("D2V_LOSS_THREADS")

# fairseq's own log format ("| train_inner | {...}") and hydra's ("[train_inner][INFO] - {...}")
TRAIN_INNER = re.compile(r"[|\[]\s*train_inner\s*[|\]].*?(\{.*\})\s*$")
KEYS = ("loss", "target_var", "pred_var", "ema_decay", "masked_pct")
IMPLS = ("ours", "meta")


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Everything after `--` is passed to both implementations as hydra overrides, e.g. `-- dataset.batch_size=4`.",
    )
    data = p.add_mutually_exclusive_group(required=True)
    data.add_argument("--data", help="binarized text data (dict.txt, train.bin/.idx), passed as task.data to both implementations")
    data.add_argument(
        "--quickstart-corpus", metavar="DIR",
        help="build the quick-start corpus of scripts/train_text.sh in DIR (python -m d2v_plugin.prep.text --default-corpus "
        "--out DIR --vocab-size 4000 --workers 2; skipped when DIR/bin/dict.txt exists) and train on DIR/bin",
    )
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3, 4], help="common.seed of the runs, one run per seed and implementation (default: 1 2 3 4)")
    p.add_argument("--max-update", type=int, default=2000, help="updates per run (optimization.max_update; default 2000)")
    p.add_argument(
        "--ema-anneal-end-step", type=int,
        help="model.ema_anneal_end_step, passed explicitly to both implementations (default: --max-update, which is what "
        "text_tiny's ${optimization.max_update} gives)",
    )
    p.add_argument("--at", type=int, nargs="+", default=[200, 2000], help="updates reported in the table (each must be a multiple of --log-interval; default: 200 2000)")
    p.add_argument("--curve-every", type=int, default=200, help="also print the mean loss of each implementation every N updates (0 = no such table; default 200)")
    p.add_argument("--log-interval", type=int, default=10, help="common.log_interval: the logged values average this many updates (default 10)")
    p.add_argument("--threads", type=int, default=1, help="CPU threads per trainer: OMP_NUM_THREADS/MKL_NUM_THREADS and torch.set_num_threads (0 = leave as is; default 1)")
    p.add_argument("--config-dir", default=os.path.join(REPO, "config"), help="our hydra config directory (default: the repository's config/)")
    p.add_argument("--config-name", default="pretraining/text_tiny", help="our config name inside --config-dir (default: pretraining/text_tiny)")
    p.add_argument("--python", default=sys.executable, help="interpreter whose fairseq runs our side, with d2v_plugin installed (default: this one)")
    p.add_argument(
        "--user-dir",
        help="our plugin folder to load instead of the installed one (common.user_dir), e.g. a fixed commit: "
        "git archive HEAD d2v_plugin | tar -x -C /tmp/snap, then --user-dir /tmp/snap/d2v_plugin",
    )
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="extra environment variable for our trainer (repeatable)")
    p.add_argument(
        "--meta-src", metavar="DIR",
        help="folder holding Meta's examples/data2vec, already made importable with --meta-python's fairseq; it goes on "
        "PYTHONPATH and DIR/examples/data2vec becomes common.user_dir. Without it only our side runs",
    )
    p.add_argument(
        "--meta-config-dir", default=os.path.join(REPO, "benchmarks", "configs", "meta_text_tiny"),
        help="hydra config directory of Meta's side (default: benchmarks/configs/meta_text_tiny, text_tiny key by key)",
    )
    p.add_argument("--meta-config-name", default="text_tiny", help="config name inside --meta-config-dir (default: text_tiny)")
    p.add_argument("--meta-python", help="interpreter for Meta's side (default: --python)")
    p.add_argument(
        "--meta-env", action="append", default=[], metavar="KEY=VALUE",
        help="extra environment variable for Meta's trainer (repeatable); a PYTHONPATH given here is appended after --meta-src",
    )
    p.add_argument("--work-dir", default="/tmp/d2v_loss/runs", help="where each run writes train.log and its hydra output (default: /tmp/d2v_loss/runs)")
    p.add_argument("--reuse-logs", action="store_true", help="parse an existing train.log that reached --max-update instead of training that run again")
    p.add_argument("--json-out", help="write the summary, every run's logged intervals, the commands and the settings to this JSON file")
    p.add_argument("--quiet", action="store_true", help="do not echo the loss of every run while it trains")
    args, overrides = p.parse_known_args(argv)
    if overrides and overrides[0] == "--":
        overrides = overrides[1:]
    unknown = [o for o in overrides if o.startswith("--")]
    if unknown:
        p.error(f"unrecognized arguments: {' '.join(unknown)} (hydra overrides go after `--`)")
    args.overrides = overrides
    for kv in args.env + args.meta_env:
        if "=" not in kv:
            p.error(f"--env/--meta-env expect KEY=VALUE, got {kv!r}")
    for u in args.at:
        if u % args.log_interval or u > args.max_update or u <= 0:
            p.error(f"--at {u}: must be a positive multiple of --log-interval ({args.log_interval}) and at most --max-update ({args.max_update})")
    if args.curve_every and args.curve_every % args.log_interval:
        p.error(f"--curve-every ({args.curve_every}) must be a multiple of --log-interval ({args.log_interval})")
    if args.ema_anneal_end_step is None:
        args.ema_anneal_end_step = args.max_update
    args.meta_python = args.meta_python or args.python
    if args.meta_src and not os.path.isdir(os.path.join(args.meta_src, "examples", "data2vec")):
        p.error(f"--meta-src {args.meta_src}: no examples/data2vec inside")
    return args


def prepare_quickstart(args) -> str:
    """The quick start's corpus, built by the same command as scripts/train_text.sh."""
    out = os.path.abspath(args.quickstart_corpus)
    data = os.path.join(out, "bin")
    if not os.path.isfile(os.path.join(data, "dict.txt")):
        cmd = [args.python, "-m", "d2v_plugin.prep.text", "--default-corpus", "--out", out, "--vocab-size", "4000", "--workers", "2"]
        print("building the quick-start corpus: " + shlex.join(cmd), flush=True)
        subprocess.run(cmd, check=True)
    return data


def trainer_command(args, impl: str, data: str, seed: int, run_dir: str) -> List[str]:
    meta = impl == "meta"
    cmd = [
        args.meta_python if meta else args.python, "-c", CHILD,
        "--config-dir", os.path.abspath(args.meta_config_dir if meta else args.config_dir),
        "--config-name", args.meta_config_name if meta else args.config_name,
        f"task.data={data}",
        f"common.seed={seed}",
        "common.log_format=json",
        f"common.log_interval={args.log_interval}",
        f"optimization.max_update={args.max_update}",
        f"model.ema_anneal_end_step={args.ema_anneal_end_step}",
        "checkpoint.no_save=true",
        f"checkpoint.save_dir={os.path.join(run_dir, 'checkpoints')}",
        f"hydra.run.dir={os.path.join(run_dir, 'hydra')}",
    ]
    if meta:
        cmd.append(f"common.user_dir={meta_user_dir(args)}")
    elif args.user_dir:
        cmd.append(f"common.user_dir={os.path.abspath(args.user_dir)}")
    return cmd + list(args.overrides)


def meta_user_dir(args) -> str:
    return os.path.join(os.path.abspath(args.meta_src), "examples", "data2vec")


def trainer_env(args, impl: str) -> Dict[str, str]:
    env = dict(os.environ)
    if args.threads > 0:
        for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
            env[k] = str(args.threads)
        env["D2V_LOSS_THREADS"] = str(args.threads)
    extra = args.meta_env if impl == "meta" else args.env
    pythonpath = []
    if impl == "meta":
        pythonpath.append(os.path.abspath(args.meta_src))
        env["META_DATA2VEC_DIR"] = meta_user_dir(args)
    for kv in extra:
        k, v = kv.split("=", 1)
        if k == "PYTHONPATH":
            pythonpath.append(v)
        else:
            env[k] = v
    if pythonpath:
        env["PYTHONPATH"] = os.pathsep.join(pythonpath + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env["PYTHONUNBUFFERED"] = "1"
    return env


def parse_log(path: str, impl: str) -> List[dict]:
    """The train_inner records of a fairseq JSON log, numbers as floats.

    Meta's data2vec_multi logs ema_decay x 1000; it is divided back here.
    """
    records = []
    with open(path, errors="replace") as f:
        for line in f:
            m = TRAIN_INNER.search(line)
            if not m:
                continue
            stats = {k: _number(v) for k, v in json.loads(m.group(1)).items()}
            if impl == "meta" and isinstance(stats.get("ema_decay"), float):
                stats["ema_decay"] /= 1000
            records.append(stats)
    return records


def run_one(args, impl: str, data: str, seed: int) -> dict:
    run_dir = os.path.join(os.path.abspath(args.work_dir), f"{impl}_seed{seed}")
    log_path = os.path.join(run_dir, "train.log")
    cmd = trainer_command(args, impl, data, seed, run_dir)
    if args.reuse_logs and os.path.isfile(log_path):
        records = parse_log(log_path, impl)
        if records and int(records[-1]["num_updates"]) >= args.max_update:
            print(f"[{impl} seed {seed}] reusing {log_path}", flush=True)
            return {"impl": impl, "seed": seed, "ok": True, "reused": True, "log": log_path, "command": _shell(cmd), "intervals": records}
    os.makedirs(run_dir, exist_ok=True)
    print(f"[{impl} seed {seed}] {_shell(cmd)}", flush=True)
    start = time.time()
    proc = subprocess.Popen(cmd, env=trainer_env(args, impl), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1, start_new_session=True)
    records = []
    try:
        with open(log_path, "w") as log:
            for line in proc.stdout:
                log.write(line)
                m = TRAIN_INNER.search(line)
                if m and not args.quiet:
                    s = json.loads(m.group(1))
                    n = int(float(s["num_updates"]))
                    if n % 100 == 0:
                        print(f"  [{impl} seed {seed}] update {n:>5}  loss {float(s['loss']):8.3f}  target_var {_fmt(s.get('target_var'))}  "
                              f"pred_var {_fmt(s.get('pred_var'))}", flush=True)
        proc.wait()
    except BaseException:
        os.killpg(proc.pid, 9)
        raise
    elapsed = time.time() - start
    records = parse_log(log_path, impl)
    ok = proc.returncode == 0
    if not ok:
        with open(log_path, errors="replace") as f:
            sys.stderr.write("".join(f.readlines()[-30:]))
        print(f"[{impl} seed {seed}] FAILED (exit code {proc.returncode}); log: {log_path}", flush=True)
    else:
        print(f"[{impl} seed {seed}] done in {elapsed:.0f} s", flush=True)
    return {"impl": impl, "seed": seed, "ok": ok, "returncode": proc.returncode, "elapsed_s": elapsed, "log": log_path, "command": _shell(cmd), "intervals": records}


def value_at(run: dict, update: int, key: str) -> Optional[float]:
    for s in run["intervals"]:
        if int(s["num_updates"]) == update:
            v = s.get(key)
            return v if isinstance(v, float) and math.isfinite(v) else None
    return None


def stats(values: List[float]) -> Optional[dict]:
    if not values:
        return None
    return {
        "n": len(values),
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,  # sample std (n - 1)
        "min": min(values),
        "max": max(values),
        "values": values,
    }


def summarize(runs: List[dict], updates: List[int]) -> Dict[str, Dict[int, Dict[str, Optional[dict]]]]:
    out = {}
    for impl in IMPLS:
        mine = [r for r in runs if r["impl"] == impl]
        if not mine:
            continue
        out[impl] = {}
        for u in updates:
            out[impl][u] = {}
            for k in KEYS:
                vals = [value_at(r, u, k) for r in mine]
                out[impl][u][k] = stats([v for v in vals if v is not None])
            out[impl][u]["seeds"] = [r["seed"] for r in mine if value_at(r, u, "loss") is not None]
    return out


def markdown_table(summary, updates: List[int]) -> str:
    lines = [
        "| implementation | update | loss: mean ± std [min, max] | target_var: mean ± std | pred_var: mean ± std | seeds |",
        "| --- | ---: | --- | --- | --- | --- |",
    ]
    for u in updates:
        for impl in IMPLS:
            if impl not in summary:
                continue
            row = summary[impl][u]
            loss = row["loss"]
            if loss is None:
                lines.append(f"| {impl} | {u} | (not logged) | | | |")
                continue
            lines.append(
                f"| {impl} | {u} | {loss['mean']:.2f} ± {loss['std']:.2f} [{loss['min']:.2f}, {loss['max']:.2f}] | "
                f"{_ms(row['target_var'])} | {_ms(row['pred_var'])} | {' '.join(map(str, row['seeds']))} |"
            )
    return "\n".join(lines)


def curve_table(runs: List[dict], every: int, max_update: int) -> str:
    impls = [i for i in IMPLS if any(r["impl"] == i for r in runs)]
    head = "| update | " + " | ".join(f"{i}: loss mean ± std [min, max]" for i in impls) + " |"
    lines = [head, "| ---: |" + " --- |" * len(impls)]
    for u in range(every, max_update + 1, every):
        cells = []
        for impl in impls:
            s = stats([v for v in (value_at(r, u, "loss") for r in runs if r["impl"] == impl) if v is not None])
            cells.append(f"{s['mean']:.2f} ± {s['std']:.2f} [{s['min']:.2f}, {s['max']:.2f}]" if s else "")
        lines.append(f"| {u} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _ms(s: Optional[dict]) -> str:
    return f"{s['mean']:.3f} ± {s['std']:.3f}" if s else ""


def _fmt(v) -> str:
    try:
        return f"{float(v):.3f}"
    except (TypeError, ValueError):
        return "-"


def _number(v):
    """fairseq's JSON log writes numbers as strings."""
    try:
        return float(v)
    except (TypeError, ValueError):
        return v


def _git_head() -> Optional[str]:
    try:
        return subprocess.run(["git", "-C", REPO, "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def _shell(cmd: List[str]) -> str:
    return " ".join("'<child wrapper: fairseq-hydra-train>'" if "\n" in c else shlex.quote(c) for c in cmd)


def main(argv=None):
    args = parse_args(argv)
    data = prepare_quickstart(args) if args.quickstart_corpus else os.path.abspath(args.data)
    impls = ["ours"] + (["meta"] if args.meta_src else [])
    if args.user_dir:
        print(f"our plugin: {os.path.abspath(args.user_dir)}", flush=True)
    print(f"data {data}; seeds {args.seeds}; {args.max_update} updates; ema_anneal_end_step {args.ema_anneal_end_step}; "
          f"threads {args.threads or 'default'}; implementations {', '.join(impls)} (alternating)", flush=True)
    started = datetime.datetime.now().astimezone()
    head = _git_head()  # at the start: the checkout may move while the runs go on
    runs = []
    for seed in args.seeds:
        for impl in impls:
            runs.append(run_one(args, impl, data, seed))

    updates = sorted(set(args.at))
    summary = summarize([r for r in runs if r["ok"]], updates)
    print()
    print(markdown_table(summary, updates))
    if args.curve_every:
        print()
        print(curve_table([r for r in runs if r["ok"]], args.curve_every, args.max_update))
    failed = [f"{r['impl']} seed {r['seed']}" for r in runs if not r["ok"]]
    if failed:
        print(f"\nfailed runs (left out of the tables): {', '.join(failed)}")

    if args.json_out:
        out = {
            "date": started.isoformat(timespec="seconds"),
            "command": [sys.executable] + sys.argv,
            "data": data,
            "seeds": args.seeds,
            "max_update": args.max_update,
            "ema_anneal_end_step": args.ema_anneal_end_step,
            "log_interval": args.log_interval,
            "threads": args.threads,
            "config": {"ours": [os.path.abspath(args.config_dir), args.config_name],
                       "meta": [os.path.abspath(args.meta_config_dir), args.meta_config_name] if args.meta_src else None},
            "user_dir": os.path.abspath(args.user_dir) if args.user_dir else None,
            "repo_commit_at_start": head,  # what --config-dir came from; --user-dir may hold another commit
            "meta_src": os.path.abspath(args.meta_src) if args.meta_src else None,
            "overrides": args.overrides,
            "summary": {impl: {str(u): v for u, v in per.items()} for impl, per in summary.items()},
            "runs": runs,
        }
        with open(args.json_out, "w") as f:
            json.dump(out, f, indent=1)
        print(f"wrote {args.json_out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
