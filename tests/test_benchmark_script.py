"""The throughput benchmark runs end to end and reports what it promises (no speed asserted)."""

import json
import sys

from helpers import REPO, run


def test_throughput_script_reports_speed_and_memory(tmp_path):
    out = tmp_path / "result.json"
    proc = run([
        sys.executable, REPO / "benchmarks" / "throughput.py",
        "--config-dir", REPO / "benchmarks" / "configs", "--config-name", "text_parity",
        "--make-data", tmp_path / "data", "--data-size", "20000",
        "--updates", "40", "--warmup", "10", "--log-interval", "10", "--threads", "1",
        "--json-out", out,
    ], cwd=tmp_path)
    assert "words/s (median):" in proc.stdout
    summary = json.loads(out.read_text())["summary"]
    assert summary["measured_updates_per_run"] == 30
    assert summary["words_per_update"] == 4 * 64  # batch_size x tokens_per_sample of text_parity
    for key in ("wps_median", "ups_median", "cpu_ms_per_update", "peak_rss_mb", "peak_anon_rss_tree_mb"):
        assert summary[key] > 0, key
    assert (tmp_path / "data" / "bin" / "dict.txt").is_file()
