"""d2v-plot on real logs of two tiny runs (fairseq-hydra-train, a few updates each): text in
fairseq's json format, also logging to tensorboard and validating, and images in the simple
format with its own collapse threshold (the run tests/test_probe.py probes). What is parsed must equal what the log holds, the
tensorboard event files must hold our statistics, and the figure must show each run, the
thresholds and the crossings below them."""

import json
import re

import pytest

from helpers import BIN, hydra_train, run, train_log
from test_probe import IMAGE_RUN_UPDATES, image_run

UPDATES = IMAGE_RUN_UPDATES
OUR_KEYS = ("loss", "target_var", "pred_var", "ema_decay", "masked_pct", "local_var")


@pytest.fixture(scope="session")
def runs(text_bin, tmp_path_factory):
    """Save dirs of the json + tensorboard text run and of the simple-format image run."""
    json_dir = tmp_path_factory.mktemp("plot_runs") / "json_run"
    hydra_train("pretraining/text_tiny", f"task.data={text_bin}", f"optimization.max_update={UPDATES}",
                "common.log_interval=1", "checkpoint.no_save=true", f"checkpoint.save_dir={json_dir}",
                "common.log_format=json", f"common.tensorboard_logdir={json_dir / 'tb'}",
                "dataset.disable_validation=false", "dataset.validate_interval_updates=3", "+dataset.max_valid_steps=1")
    # shared with tests/test_probe.py (trained once per session)
    return json_dir, image_run(tmp_path_factory)[1]


def _log_lines(log_path, tag):
    pattern = re.compile(rf"\]\[{tag}\]\[INFO\] - (\{{.*\}})$")
    return [json.loads(m.group(1)) for m in map(pattern.search, log_path.read_text().splitlines()) if m]


def test_simple_log_parsed_as_logged(runs):
    from d2v_plugin.monitor.logs import read_run

    _, simple_dir = runs
    parsed = read_run(str(simple_dir))
    assert parsed.format == "simple" and parsed.name == "image_run"
    assert parsed.config == {"min_target_var": 2.0, "min_pred_var": 0.0, "collapse_check_start": 5000}  # image_tiny + override
    logged = train_log((simple_dir / "hydra" / "hydra_train.log").read_text())
    assert [int(r["num_updates"]) for r in logged] == list(range(1, UPDATES + 1))
    for key in OUR_KEYS + ("lr_default", "wps", "ups"):
        assert parsed.train[key] == [(int(r["num_updates"]), r[key]) for r in logged if key in r], key
    assert parsed.valid == {}


def test_json_log_parsed_as_logged(runs):
    from d2v_plugin.monitor.logs import read_run

    json_dir, _ = runs
    log = json_dir / "hydra" / "hydra_train.log"
    parsed = read_run(str(log))
    assert parsed.format == "json" and parsed.name == "json_run"
    rows = _log_lines(log, "train_inner")
    assert len(rows) == UPDATES
    for key in OUR_KEYS + ("lr_default", "wps"):
        assert parsed.train[key] == [(int(r["num_updates"]), float(r[key])) for r in rows if key in r], key
    valid = _log_lines(log, "valid")
    assert [int(r["valid_num_updates"]) for r in valid] == [3, 6]
    assert parsed.valid["loss"] == [(int(r["valid_num_updates"]), float(r["valid_loss"])) for r in valid]


def test_tensorboard_holds_our_statistics(runs):
    """fairseq's own common.tensorboard_logdir writes our keys; d2v-plot reads the same values."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from d2v_plugin.monitor.logs import read_run

    json_dir, _ = runs
    acc = EventAccumulator(str(json_dir / "tb" / "train_inner"))
    acc.Reload()
    assert set(OUR_KEYS) <= set(acc.Tags()["scalars"])
    assert [e.step for e in acc.Scalars("target_var")] == list(range(1, UPDATES + 1))
    from_tb = read_run(str(json_dir / "tb"))
    from_json = read_run(str(json_dir))
    assert from_tb.format == "tensorboard"
    for key in OUR_KEYS:
        tb, js = from_tb.train[key], from_json.train[key]
        assert [s for s, _ in tb] == [s for s, _ in js], key
        # the json log rounds to 4 decimals (6 significant digits for ema_decay)
        assert all(v == pytest.approx(w, rel=1e-4, abs=1e-4) for (_, v), (_, w) in zip(tb, js)), key
    assert [s for s, _ in from_tb.valid["loss"]] == [3, 6]


def _lines(ax):
    return {line.get_label(): line for line in ax.get_lines()}


def test_figure_panels_lines_thresholds(runs):
    from d2v_plugin.monitor.logs import read_run
    from d2v_plugin.monitor.plot import make_figure

    json_dir, simple_dir = runs
    a, b = read_run(str(json_dir), "a"), read_run(str(simple_dir), "b")
    fig = make_figure([a, b])
    axes = {ax.get_title(): ax for ax in fig.axes}
    assert list(axes) == [
        "loss", "target_var (teacher targets' std)", "pred_var (student predictions' std)",
        "local_var (modality encoder output's std)", "ema_decay", "learning rate", "masked_pct",
        "throughput (wps: ntokens/s)", "validation loss",
    ]
    for title in ("loss", "ema_decay", "learning rate", "masked_pct", "local_var (modality encoder output's std)"):
        lines = _lines(axes[title])
        assert set(lines) == {"a", "b"}, title
        assert list(lines["a"].get_xdata()) == list(range(1, UPDATES + 1))
    assert list(_lines(axes["loss"])["b"].get_ydata()) == [v for _, v in b.train["loss"]]
    assert set(_lines(axes["validation loss"])) == {"a"}  # b did not validate

    target = _lines(axes["target_var (teacher targets' std)"])
    # each run's own threshold: a the default 0.1, b its config's 2.0; b's target_var is below from the start
    assert list(target["min_target_var = 0.1 (a)"].get_ydata()) == [0.1, 0.1]
    assert list(target["min_target_var = 2 (b)"].get_ydata()) == [2.0, 2.0]
    assert list(target["b: below min_target_var"].get_xdata()) == [1]
    assert "a: below min_target_var" not in target
    pred = _lines(axes["pred_var (student predictions' std)"])
    below = [s for s, v in a.train["pred_var"] if v < 0.01]
    assert (f"a: below min_pred_var" in pred) == bool(below)

    # --min-target-var overrides every run's threshold
    fig = make_figure([a, b], {"min_target_var": 0.0, "min_pred_var": None})
    target = _lines({ax.get_title(): ax for ax in fig.axes}["target_var (teacher targets' std)"])
    assert [k for k in target if k.startswith("min_")] == ["min_target_var = 0 (check off)"]
    assert not [k for k in target if "below" in k]


def test_crossings_mark_each_excursion():
    from d2v_plugin.monitor.plot import crossings

    points = [(1, 0.5), (2, 0.05), (3, 0.04), (4, 0.3), (5, 0.01), (6, 0.2)]
    assert crossings(points, 0.1) == [(2, 0.05), (5, 0.01)]
    assert crossings(points, 0.0) == []


def test_cli_png_html_and_summary(runs, tmp_path):
    from PIL import Image

    json_dir, simple_dir = runs
    out, html = tmp_path / "report.png", tmp_path / "report.html"
    proc = run([BIN / "d2v-plot", json_dir, simple_dir / "hydra" / "hydra_train.log", "--out", out, "--html", html])
    assert f"wrote {out}" in proc.stdout and f"wrote {html}" in proc.stdout
    assert ("note: target_var was below min_target_var = 2 at update 1, before model.collapse_check_start = 5000"
            in proc.stdout)
    with Image.open(out) as img:
        assert img.format == "PNG" and img.size == (1560, 1020)
    page = html.read_text()
    assert "plotly" in page and '"name":"json_run"' in page and '"name":"image_run"' in page


def test_clear_errors(tmp_path, capsys):
    from d2v_plugin.monitor.plot import main

    empty = tmp_path / "empty_save_dir"
    empty.mkdir()
    other = tmp_path / "notes.log"
    other.write_text("just some text\nloss=3\n")
    for path, message in ((tmp_path / "missing", "no such file or directory"),
                          (empty, "no training log found"),
                          (other, "no fairseq training statistics found")):
        assert main([str(path), "--out", str(tmp_path / "x.png")]) == 1
        err = capsys.readouterr().err
        assert str(path) in err and message in err, err
    assert not (tmp_path / "x.png").exists()


def test_default_thresholds_are_the_models():
    from dataclasses import fields

    from d2v_plugin.models.data2vec2 import Data2VecMultiConfig
    from d2v_plugin.models.v1.base import Data2VecV1CommonConfig
    from d2v_plugin.monitor.plot import DEFAULT_COLLAPSE_CHECK_START, DEFAULT_THRESHOLDS

    for config in (Data2VecMultiConfig, Data2VecV1CommonConfig):
        defaults = {f.name: f.default for f in fields(config)}
        assert {k: defaults[k] for k in DEFAULT_THRESHOLDS} == DEFAULT_THRESHOLDS
        assert defaults["collapse_check_start"] == DEFAULT_COLLAPSE_CHECK_START
