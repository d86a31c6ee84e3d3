#!/usr/bin/env python3
"""Training throughput (words/s) and peak memory of a fairseq-hydra-train config.

Runs the real trainer, ``fairseq-hydra-train --config-dir DIR --config-name NAME
task.data=DATA ...``, in a child process with JSON progress logging, reads its
``train_inner`` lines, drops the warm-up updates and reports:

- words/s (fairseq's ``wps``: input tokens per second, the same number the training log
  shows): median, mean and best over the log intervals, and overall (measured tokens /
  measured time);
- updates/s, median; CPU time per update (user + system of the trainer's process tree,
  less disturbed than wall time by other jobs on a shared machine);
- peak resident memory of the trainer process (``ru_maxrss`` from ``wait4``), and of its
  whole process tree sampled from /proc (data-loader workers included), in total and
  anonymous only (heap and tensors, without the mapped library files);
- on GPU, the peak of ``torch.cuda.max_memory_allocated`` over the run.

Example (text, our parity config, 2 threads, synthetic data)::

    python benchmarks/throughput.py --config-dir benchmarks/configs --config-name text_parity \\
        --make-data /tmp/d2v_bench_text --threads 2 --updates 600 --warmup 100

Hydra overrides for the trainer go after ``--``. See benchmarks/README.md.
"""

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from typing import Dict, List, Optional

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from child import child_code  # noqa: E402
import flops  # noqa: E402
from synthetic import DEFAULT_SIZES, MAKERS  # noqa: E402

# Runs inside the child: pins torch's thread count, records the CUDA peak memory across
# fairseq's per-update resets of the peak counter, then starts fairseq-hydra-train.
CHILD = child_code("D2V_BENCH_THREADS", r"""
import atexit
print("D2V_BENCH torch_threads", torch.get_num_threads(), flush=True)
if torch.cuda.is_available():
    print("D2V_BENCH device", torch.cuda.get_device_name().replace(" ", "_"), flush=True)
    _peak = [0]
    _reset = torch.cuda.reset_peak_memory_stats
    def _reset_keeping_peak(device=None):
        _peak[0] = max(_peak[0], torch.cuda.max_memory_allocated(device))
        _reset(device)
    torch.cuda.reset_peak_memory_stats = _reset_keeping_peak
    def _report():
        if torch.cuda.is_initialized():
            _peak[0] = max(_peak[0], torch.cuda.max_memory_allocated())
            print("D2V_BENCH cuda_peak_bytes", _peak[0], flush=True)
    atexit.register(_report)
""")

# fairseq's own log format ("| train_inner | {...}") and hydra's ("[train_inner][INFO] - {...}")
TRAIN_INNER = re.compile(r"[|\[]\s*train_inner\s*[|\]].*?(\{.*\})\s*$")
MARKER = re.compile(r"^D2V_BENCH (\w+) (\S+)\s*$")
TEXT_MARKERS = ("device",)


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Everything after `--` is passed to fairseq-hydra-train as hydra overrides, "
        "e.g. `-- dataset.batch_size=8 model.depth=4`.",
    )
    p.add_argument("--config-dir", required=True, help="hydra config directory (fairseq-hydra-train --config-dir)")
    p.add_argument("--config-name", required=True, help="config name inside --config-dir, without .yaml (e.g. text_parity or pretraining/text_tiny)")
    data = p.add_mutually_exclusive_group(required=True)
    data.add_argument("--data", help="existing training data, passed as task.data")
    data.add_argument(
        "--make-data", metavar="DIR",
        help="generate a reproducible synthetic dataset in DIR (reused if already there with the same settings) and train on it",
    )
    p.add_argument("--modality", choices=sorted(MAKERS), default="text", help="kind of synthetic data --make-data writes (default: text)")
    p.add_argument(
        "--data-size", type=int,
        help="size of the synthetic training split: text tokens, audio clips or images "
        f"(default {', '.join(f'{m} {n}' for m, n in DEFAULT_SIZES.items())})",
    )
    p.add_argument("--data-seed", type=int, default=1, help="seed of the synthetic data (default 1)")
    p.add_argument("--updates", type=int, default=600, help="updates to train (optimization.max_update; default 600)")
    p.add_argument("--warmup", type=int, default=100, help="updates at the start that are not measured (default 100)")
    p.add_argument("--log-interval", type=int, default=20, help="updates per measured interval (common.log_interval; default 20)")
    p.add_argument(
        "--threads", type=int, default=0,
        help="CPU threads of the trainer: sets OMP_NUM_THREADS/MKL_NUM_THREADS and torch.set_num_threads (0 = leave as is)",
    )
    p.add_argument("--user-dir", help="fairseq user dir to load instead of the config's common.user_dir (e.g. another data2vec implementation)")
    p.add_argument("--python", default=sys.executable, help="Python interpreter whose fairseq runs the training (default: this one)")
    p.add_argument(
        "--env", action="append", default=[], metavar="KEY=VALUE",
        help="extra environment variable for the trainer (repeatable), e.g. PYTHONPATH=/path",
    )
    p.add_argument(
        "--words-per-update", type=float,
        help="count this many words per update instead of the logged ntokens: words/s becomes updates/s x N. "
        "For trainers whose criterion logs ntokens differently (Meta's `model` criterion logs the number of "
        "predicted steps, not input tokens); batch_size x tokens_per_sample for full text blocks",
    )
    p.add_argument(
        "--flops-config", metavar="YAML",
        help="data2vec_multi config whose model FLOPs per update give the MFU (default: the run's own config file, "
        "with the run's model./task./dataset. overrides); for another implementation pass the equivalent config of this plugin",
    )
    p.add_argument("--peak-tflops", type=float, help="peak TFLOP/s of the hardware, for the MFU (model FLOPs utilisation)")
    p.add_argument(
        "--gpu", choices=sorted(flops.PEAK_TFLOPS),
        help="take --peak-tflops from this table of dense bf16 peaks (on CUDA the device's name is looked up by default)",
    )
    p.add_argument("--repeat", type=int, default=1, help="run the benchmark this many times; the summary takes the median across runs")
    p.add_argument("--json-out", help="write all measurements (per interval, per run, summary, command) to this JSON file")
    p.add_argument("--work-dir", help="where the run writes its log and hydra output (default: a temporary directory, deleted afterwards)")
    p.add_argument("--quiet", action="store_true", help="do not echo the interval measurements while training")
    args, overrides = p.parse_known_args(argv)
    if overrides and overrides[0] == "--":
        overrides = overrides[1:]
    unknown = [o for o in overrides if o.startswith("--")]
    if unknown:
        p.error(f"unrecognized arguments: {' '.join(unknown)} (hydra overrides go after `--`)")
    args.overrides = overrides
    if args.updates <= args.warmup + args.log_interval:
        p.error(f"--updates ({args.updates}) must exceed --warmup + --log-interval ({args.warmup + args.log_interval})")
    for kv in args.env:
        if "=" not in kv:
            p.error(f"--env expects KEY=VALUE, got {kv!r}")
    return args


def trainer_command(args, data: str, run_dir: str) -> List[str]:
    cmd = [
        args.python, "-c", CHILD,
        "--config-dir", os.path.abspath(args.config_dir),
        "--config-name", args.config_name,
        f"task.data={data}",
        "common.log_format=json",
        f"common.log_interval={args.log_interval}",
        f"optimization.max_update={args.updates}",
        "checkpoint.no_save=true",
        f"checkpoint.save_dir={os.path.join(run_dir, 'checkpoints')}",
        f"hydra.run.dir={os.path.join(run_dir, 'hydra')}",
    ]
    if args.user_dir:
        cmd.append(f"common.user_dir={os.path.abspath(args.user_dir)}")
    return cmd + list(args.overrides)


def trainer_env(args) -> Dict[str, str]:
    env = dict(os.environ)
    if args.threads > 0:
        for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
            env[k] = str(args.threads)
        env["D2V_BENCH_THREADS"] = str(args.threads)
    for kv in args.env:
        k, v = kv.split("=", 1)
        env[k] = v
    env["PYTHONUNBUFFERED"] = "1"
    return env


class ProcessTreeSampler(threading.Thread):
    """Samples the memory and CPU time of a process and its descendants from /proc.

    Keeps the peak of the summed RSS and of the summed anonymous RSS (``RssAnon``: heap,
    tensors; without the pages of mapped library files, which depend on the page cache
    and on where the environment lives rather than on the code being measured).
    """

    def __init__(self, pid: int, period: float = 0.2):
        super().__init__(daemon=True)
        self.pid, self.period = pid, period
        self.peak_kb = 0
        self.peak_anon_kb = 0
        self.stop = threading.Event()

    @staticmethod
    def _tree(pid: int) -> List[int]:
        pids, todo = [], [pid]
        while todo:
            p = todo.pop()
            pids.append(p)
            try:
                for tid in os.listdir(f"/proc/{p}/task"):
                    with open(f"/proc/{p}/task/{tid}/children") as f:
                        todo.extend(int(c) for c in f.read().split())
            except OSError:
                pass
        return pids

    @staticmethod
    def _memory_kb(pid: int):
        rss = anon = 0
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        rss = int(line.split()[1])
                    elif line.startswith("RssAnon:"):
                        anon = int(line.split()[1])
        except OSError:
            pass
        return rss, anon

    @classmethod
    def cpu_seconds(cls, pid: int) -> Optional[float]:
        """User + system CPU time used so far by the process tree (None where /proc is missing)."""
        total, found = 0, False
        for p in cls._tree(pid):
            try:
                with open(f"/proc/{p}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                total += int(fields[11]) + int(fields[12])  # utime, stime
                found = True
            except (OSError, IndexError, ValueError):
                pass
        return total / os.sysconf("SC_CLK_TCK") if found else None

    def run(self):
        if not os.path.isdir(f"/proc/{self.pid}"):
            return
        while not self.stop.is_set():
            mem = [self._memory_kb(p) for p in self._tree(self.pid)]
            self.peak_kb = max(self.peak_kb, sum(m[0] for m in mem))
            self.peak_anon_kb = max(self.peak_anon_kb, sum(m[1] for m in mem))
            self.stop.wait(self.period)


def run_once(args, data: str, run_dir: str, index: int) -> dict:
    os.makedirs(run_dir, exist_ok=True)
    cmd = trainer_command(args, data, run_dir)
    log_path = os.path.join(run_dir, "train.log")
    intervals, markers = [], {}
    load_before = os.getloadavg()
    start = time.time()
    proc = subprocess.Popen(
        cmd, env=trainer_env(args), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, bufsize=1, start_new_session=True,
    )
    sampler = ProcessTreeSampler(proc.pid)
    sampler.start()
    try:
        with open(log_path, "w") as log:
            for line in proc.stdout:
                log.write(line)
                m = TRAIN_INNER.search(line)
                if m:
                    stats = json.loads(m.group(1))
                    intervals.append({k: _number(v) for k, v in stats.items()})
                    intervals[-1]["cpu_s"] = sampler.cpu_seconds(proc.pid)
                    if not args.quiet:
                        s = intervals[-1]
                        print(
                            f"  [run {index}] update {int(s['num_updates']):>6}  wps {s.get('wps', 0):>9.1f}  "
                            f"ups {s.get('ups', 0):>6.2f}  loss {s.get('loss', float('nan')):.3f}",
                            flush=True,
                        )
                    continue
                m = MARKER.match(line)
                if m and m.group(1) in TEXT_MARKERS:
                    markers[m.group(1)] = m.group(2).replace("_", " ")
                elif m:  # one per process (several with distributed training): keep the largest
                    markers[m.group(1)] = max(markers.get(m.group(1), 0), _number(m.group(2)))
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    except BaseException:
        os.killpg(proc.pid, 9)
        raise
    finally:
        sampler.stop.set()
        sampler.join()
    elapsed = time.time() - start
    if proc.returncode != 0:
        with open(log_path) as f:
            tail = f.readlines()[-40:]
        sys.stderr.write("".join(tail))
        raise SystemExit(f"training failed (exit code {proc.returncode}); full log: {log_path}\ncommand: {_shell(cmd)}")
    result = summarize(intervals, args.warmup, args.words_per_update)
    result.update(
        {
            "peak_rss_mb": usage.ru_maxrss / 1024,
            "peak_rss_tree_mb": sampler.peak_kb / 1024,
            "peak_anon_rss_tree_mb": sampler.peak_anon_kb / 1024,
            "cuda_peak_mb": markers["cuda_peak_bytes"] / 2**20 if "cuda_peak_bytes" in markers else None,
            "torch_threads": markers.get("torch_threads"),
            "device": markers.get("device", "cpu"),
            "elapsed_s": elapsed,
            "loadavg_before": load_before,
            "loadavg_after": os.getloadavg(),
            "intervals": intervals,
        }
    )
    return result


def summarize(intervals: List[dict], warmup: int, words_per_update: Optional[float] = None) -> dict:
    """Statistics over the intervals that start at or after update ``warmup``.

    An interval's time is its logged words / wps; with ``words_per_update`` its words/s
    is recomputed as wps x words_per_update / wpb (= updates/s x words_per_update).
    """
    measured, prev, cpu_start = [], 0, None
    for s in intervals:
        n = int(s["num_updates"])
        if prev < warmup:  # the last unmeasured interval ends where measuring starts
            cpu_start = s.get("cpu_s")
        if prev >= warmup and n > prev and s.get("wps"):
            seconds = s["wpb"] * (n - prev) / s["wps"]
            wpb = words_per_update or s["wpb"]
            tokens = wpb * (n - prev)
            measured.append({**s, "updates": n - prev, "tokens": tokens, "seconds": seconds, "wps": tokens / seconds, "wpb": wpb})
        prev = n
    if not measured:
        raise SystemExit(f"no train_inner interval after the {warmup} warm-up updates; raise --updates")
    wps = [m["wps"] for m in measured]
    cpu_end = measured[-1].get("cpu_s")
    updates = sum(m["updates"] for m in measured)
    return {
        "measured_intervals": len(measured),
        "measured_updates": updates,
        "wps_median": statistics.median(wps),
        "wps_mean": statistics.fmean(wps),
        "wps_overall": sum(m["tokens"] for m in measured) / sum(m["seconds"] for m in measured),
        "wps_stdev": statistics.stdev(wps) if len(wps) > 1 else 0.0,
        "wps_best": max(wps),
        "ups_median": statistics.median(m["updates"] / m["seconds"] for m in measured),
        "words_per_update": statistics.median(m["wpb"] for m in measured),
        # CPU time is less sensitive than wall time to other jobs on the machine
        "cpu_ms_per_update": 1000 * (cpu_end - cpu_start) / updates if cpu_start is not None and cpu_end is not None else None,
        "final_loss": measured[-1].get("loss"),
    }


def model_flops(args, data: str, runs: List[dict], summary: dict) -> dict:
    """Model FLOPs per update (benchmarks/flops.py) of the run's config, TFLOP/s achieved and MFU."""
    path = args.flops_config or os.path.join(args.config_dir, args.config_name + ".yaml")
    overrides = [o for o in args.overrides if o.split("=")[0].split(".")[0] in ("model", "task", "dataset")]
    try:
        cfg, raw = flops.model_config(path, overrides)
        modality = flops.config_modality(raw)
        masked = statistics.median(s["masked_pct"] for r in runs for s in r["intervals"] if isinstance(s.get("masked_pct"), float)) \
            if any(isinstance(s.get("masked_pct"), float) for r in runs for s in r["intervals"]) else None
        if modality == "audio":
            clip = mean_clip_samples(data)
            batch = summary["words_per_update"] / clip if args.words_per_update is None else None
            if batch is None:
                raise ValueError("speech with --words-per-update: samples per update unknown")
            parts = flops.update_flops(cfg, modality, batch, int(clip), masked)
        else:
            parts = flops.config_flops(path, overrides, masked_fraction=masked)
    except Exception as e:  # a config of another implementation, or without data2vec_multi
        return {"flops_error": f"{path}: {e}"}
    out = {"flops_per_update": parts["total"], "model_tflops": parts["total"] * summary["ups_median"] / 1e12}
    peak = args.peak_tflops or (flops.PEAK_TFLOPS[args.gpu] if args.gpu else None)
    if peak is None and summary.get("device", "cpu") != "cpu":
        peak = flops.peak_tflops_for(summary["device"])
    if peak:
        out.update({"peak_tflops": peak, "mfu": out["model_tflops"] / peak})
    return out


def mean_clip_samples(data: str) -> float:
    """Mean length (samples) of the clips of DATA/train.tsv (a wav2vec-style manifest)."""
    with open(os.path.join(data, "train.tsv")) as f:
        lengths = [int(line.split("\t")[1]) for line in f.read().splitlines()[1:] if "\t" in line]
    return statistics.fmean(lengths)


def _number(v):
    """fairseq's JSON log writes numbers as strings."""
    try:
        return float(v)
    except (TypeError, ValueError):
        return v


def _shell(cmd: List[str]) -> str:
    import shlex

    return " ".join(shlex.quote(c) if "\n" not in c else "'<child wrapper>'" for c in cmd)


def main(argv=None):
    args = parse_args(argv)
    if args.make_data:
        size = args.data_size or DEFAULT_SIZES[args.modality]
        data = MAKERS[args.modality](os.path.abspath(args.make_data), size, args.data_seed, args.python)
    else:
        data = os.path.abspath(args.data)
    work = args.work_dir or tempfile.mkdtemp(prefix="d2v_bench_")
    print(f"config {args.config_dir}/{args.config_name}, data {data}, threads {args.threads or 'default'}, "
          f"{args.updates} updates ({args.warmup} warm-up), log every {args.log_interval}", flush=True)
    print("trainer: " + _shell(trainer_command(args, data, os.path.join(work, "run0"))), flush=True)
    runs = []
    for i in range(args.repeat):
        runs.append(run_once(args, data, os.path.join(work, f"run{i}"), i))  # a failed run keeps its log
    if not args.work_dir:
        shutil.rmtree(work, ignore_errors=True)

    keys = ["wps_median", "wps_mean", "wps_overall", "wps_best", "ups_median", "cpu_ms_per_update", "peak_rss_mb", "peak_rss_tree_mb", "peak_anon_rss_tree_mb", "cuda_peak_mb"]
    summary = {}
    for k in keys:
        vals = [r[k] for r in runs if r[k] is not None]
        summary[k] = statistics.median(vals) if vals else None
    summary["words_per_update"] = runs[0]["words_per_update"]
    summary["measured_updates_per_run"] = runs[0]["measured_updates"]
    summary["device"] = runs[0]["device"]
    summary.update(model_flops(args, data, runs, summary))

    print()
    for i, r in enumerate(runs):
        print(f"run {i}: wps median {r['wps_median']:.1f} mean {r['wps_mean']:.1f} overall {r['wps_overall']:.1f} "
              f"best {r['wps_best']:.1f} (stdev {r['wps_stdev']:.1f}, {r['measured_intervals']} intervals), ups {r['ups_median']:.2f}, "
              f"peak RSS {r['peak_rss_mb']:.0f} MB (tree {r['peak_rss_tree_mb']:.0f} MB, anonymous {r['peak_anon_rss_tree_mb']:.0f} MB), "
              f"load avg {r['loadavg_before'][0]:.1f} -> {r['loadavg_after'][0]:.1f}")
    print(f"words/s (median): {summary['wps_median']:.1f}")
    print(f"words/s (mean / overall / best interval): {summary['wps_mean']:.1f} / {summary['wps_overall']:.1f} / {summary['wps_best']:.1f}")
    print(f"updates/s (median): {summary['ups_median']:.2f}  ({summary['words_per_update']:.0f} words per update)")
    if summary["cpu_ms_per_update"] is not None:
        print(f"CPU time per update: {summary['cpu_ms_per_update']:.1f} ms (user + system, all threads)")
    print(f"peak RSS: {summary['peak_rss_mb']:.0f} MB trainer, {summary['peak_rss_tree_mb']:.0f} MB with child processes (sampled)")
    print(f"peak anonymous RSS (heap and tensors, no mapped library files): {summary['peak_anon_rss_tree_mb']:.0f} MB (sampled)")
    if summary["cuda_peak_mb"] is not None:
        print(f"peak CUDA memory allocated: {summary['cuda_peak_mb']:.1f} MB")
    if summary.get("flops_per_update"):
        line = f"model FLOPs per update: {summary['flops_per_update'] / 1e9:.2f} GFLOP -> {summary['model_tflops']:.3f} TFLOP/s"
        if summary.get("mfu") is not None:
            line += f", MFU {100 * summary['mfu']:.1f}% of {summary['peak_tflops']:g} TFLOP/s ({summary['device']})"
        print(line)
    elif summary.get("flops_error"):
        print(f"model FLOPs not counted: {summary['flops_error']}")

    if args.json_out:
        out = {
            "config_dir": os.path.abspath(args.config_dir),
            "config_name": args.config_name,
            "data": data,
            "threads": args.threads,
            "updates": args.updates,
            "warmup": args.warmup,
            "log_interval": args.log_interval,
            "words_per_update": args.words_per_update,
            "user_dir": args.user_dir,
            "python": args.python,
            "overrides": args.overrides,
            "command": sys.argv,
            "cpu_count": os.cpu_count(),
            "summary": summary,
            "runs": runs,
        }
        with open(args.json_out, "w") as f:
            json.dump(out, f, indent=1)
        print(f"wrote {args.json_out}")
    return summary


if __name__ == "__main__":
    main()
