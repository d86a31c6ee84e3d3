"""d2v-export: slim inference export (safetensors + config.json), ONNX export checked in
onnxruntime, the command line and its errors, on Meta's official-format checkpoints of
``../shared/compat`` (data2vec 2.0 and 1.0; text, speech, images)."""

import json
import os
import subprocess
import sys

import pytest
import torch

from helpers import BIN, compat_dir, env

NAMES = ["v2_text", "v2_audio", "v2_image", "v1_text", "v1_audio", "v1_image"]
ARCH = {"v2": "data2vec_multi", "v1_text": "data2vec_text", "v1_audio": "data2vec_audio", "v1_image": "data2vec_vision"}


def arch_of(name):
    return ARCH.get(name, ARCH.get(name[:2]))


def checkpoint(name):
    return compat_dir() / f"{name}.checkpoint.pt"


def expected(name):
    return torch.load(compat_dir() / f"{name}.expected.pt", weights_only=True)


def keep_mask(out):
    """True at the output positions that carry meaning (not padded)."""
    x = out.last_hidden_state
    return ~out.padding_mask if out.padding_mask is not None else torch.ones(x.shape[:2], dtype=torch.bool)


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """For every model: the export summaries (fp32 and bf16) and the checkpoint's own output."""
    import d2v_plugin
    from d2v_plugin.export.inference import export_inference

    out = {}
    for name in NAMES:
        root = tmp_path_factory.mktemp(name)
        e = expected(name)
        with torch.no_grad():
            ref = d2v_plugin.load_encoder(str(checkpoint(name)))(e["source"], e["padding_mask"])
        out[name] = {
            "fp32": export_inference(str(checkpoint(name)), str(root / "fp32"), "fp32"),
            "bf16": export_inference(str(checkpoint(name)), str(root / "bf16"), "bf16"),
            "ref": ref,
            "input": e,
        }
    return out


# ---- inference export ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_inference_round_trip_is_exact(exports, name):
    import d2v_plugin

    ex = exports[name]
    s = ex["fp32"]
    print(f"{name}: {s['checkpoint_bytes']:,} -> {s['exported_bytes']:,} bytes, {s['size_reduction']:.2f}x smaller (fp32), "
          f"{ex['bf16']['size_reduction']:.2f}x (bf16)")
    assert s["architecture"] == arch_of(name)
    assert s["size_reduction"] > 1
    assert ex["bf16"]["size_reduction"] > 1.8 * s["size_reduction"]  # 2-byte floats: about half the bytes
    d = s["out_dir"]
    config = json.load(open(os.path.join(d, "config.json")))
    assert config["format"] == "d2v_plugin.inference" and config["version"] == 1
    assert config["architecture"] == arch_of(name)
    assert isinstance(config["model"], dict) and config["model"]["_name"] == arch_of(name)
    e, ref = ex["input"], ex["ref"]
    for path in (d, os.path.join(d, "config.json")):
        enc = d2v_plugin.load_encoder(path)
        with torch.no_grad():
            out = enc(e["source"], e["padding_mask"])
        assert torch.equal(out.last_hidden_state, ref.last_hidden_state), path
        if ref.padding_mask is not None:
            assert torch.equal(out.padding_mask, ref.padding_mask)
    # the official output too (what test_*compat checks for the checkpoint itself)
    keep = keep_mask(ref)
    assert torch.allclose(out.last_hidden_state[keep], e["x"][keep], atol=1e-4)


@pytest.mark.parametrize("name", NAMES)
def test_inference_export_holds_only_the_student(exports, name):
    from safetensors import safe_open

    from d2v_plugin.checkpoints import load_student

    student = load_student(str(checkpoint(name))).state_dict()
    raw = torch.load(checkpoint(name), map_location="cpu", weights_only=True)
    assert any(k.split(".")[-1] == "_ema" for k in raw["model"]) and "last_optimizer_state" in raw  # teacher, optimizer
    for dtype, want in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        with safe_open(os.path.join(exports[name][dtype]["out_dir"], "model.safetensors"), "pt") as f:
            keys = set(f.keys())
            assert keys == set(student), dtype
            assert not any("ema" in k or "decoder" in k or "regression_head" in k for k in keys)
            for k in keys:
                t = f.get_tensor(k)
                assert t.shape == student[k].shape, k
                assert t.dtype == (want if student[k].is_floating_point() else student[k].dtype), k
                if dtype == "fp32":
                    assert torch.equal(t, student[k]), k


@pytest.mark.parametrize("name", NAMES)
def test_bf16_export_is_close(exports, name):
    import d2v_plugin

    ex = exports[name]
    e, ref = ex["input"], ex["ref"]
    enc = d2v_plugin.load_encoder(ex["bf16"]["out_dir"])
    with torch.no_grad():
        out = enc(e["source"], e["padding_mask"])
    keep = keep_mask(ref)
    diff = (out.last_hidden_state - ref.last_hidden_state).abs()[keep].max().item()
    scale = ref.last_hidden_state[keep].abs().max().item()
    print(f"{name}: bf16 max |diff| {diff:.3g} (output max {scale:.3g})")
    assert 0 < diff < 0.03 * scale  # rounded weights: close, not identical


def test_text_dictionary_is_copied(exports):
    d = exports["v1_text"]["fp32"]["out_dir"]
    assert open(os.path.join(d, "dict.txt")).read() == open(compat_dir() / "v1_text.dict.txt").read()
    config = json.load(open(os.path.join(d, "config.json")))
    from d2v_plugin.checkpoints import load_student

    student = load_student(str(checkpoint("v1_text")))
    assert config["vocab_size"] == student.encoder.local_encoder.embed_tokens.num_embeddings
    assert "vocab_size" in json.load(open(os.path.join(exports["v2_text"]["fp32"]["out_dir"], "config.json")))
    assert "vocab_size" not in json.load(open(os.path.join(exports["v2_audio"]["fp32"]["out_dir"], "config.json")))


def test_inference_dir_errors(exports, tmp_path):
    import shutil

    import d2v_plugin

    from d2v_plugin.export.inference import export_inference

    src = exports["v2_text"]["fp32"]["out_dir"]
    again = export_inference(src, str(tmp_path / "again"))  # an exported directory exports again, unchanged
    assert again["checkpoint_bytes"] == exports["v2_text"]["fp32"]["exported_bytes"]
    from safetensors.torch import load_file

    a, b = load_file(str(tmp_path / "again" / "model.safetensors")), load_file(os.path.join(src, "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    bad = tmp_path / "bad"
    shutil.copytree(src, bad)
    (bad / "model.safetensors").write_bytes((bad / "model.safetensors").read_bytes()[:1000])
    with pytest.raises(ValueError, match="model.safetensors"):
        d2v_plugin.load_encoder(str(bad))
    (bad / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json"):
        d2v_plugin.load_encoder(str(bad))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        d2v_plugin.load_encoder(str(tmp_path / "empty"))


def test_load_model_needs_a_finetuned_model(exports):
    """load_model predicts with a task head: a pretraining checkpoint or its export is refused, naming load_encoder."""
    import d2v_plugin

    with pytest.raises(ValueError, match="not a fine-tuned model.*load_encoder"):
        d2v_plugin.load_model(str(checkpoint("v1_text")))
    with pytest.raises(ValueError, match="without a task head.*load_encoder"):
        d2v_plugin.load_model(exports["v1_text"]["fp32"]["out_dir"])


# ---- ONNX ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_onnx_matches_pytorch(exports, name, tmp_path):
    import onnxruntime as ort

    from d2v_plugin.export.onnx_export import export_onnx, session_feeds

    s = export_onnx(str(checkpoint(name)), str(tmp_path), "fp32")
    print(f"{name}: ONNX opset {s['opset']}, onnxruntime vs PyTorch max |diff| {s['max_abs_diff']:.3g} "
          f"on an input of shape {s['check_input_shape']}")
    assert s["max_abs_diff"] <= 1e-4
    session = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    e, ref = exports[name]["input"], exports[name]["ref"]
    # the fixture's input: another batch size / length than the export's example
    inputs = [i.name for i in session.get_inputs()]
    assert inputs == s["inputs"]
    assert inputs == (["source"] if name in ("v1_text", "v2_image", "v1_image") else ["source", "padding_mask"])
    got = session.run(None, session_feeds(session, (e["source"], e["padding_mask"])))
    keep = keep_mask(ref)
    x = torch.from_numpy(got[0])
    assert x.shape == ref.last_hidden_state.shape
    diff = (x - ref.last_hidden_state).abs()[keep].max().item()
    print(f"{name}: onnxruntime vs PyTorch on the fixture input {tuple(e['source'].shape)}: {diff:.3g}")
    assert diff <= 1e-4
    if len(got) > 1:  # speech: the output padding mask
        assert torch.equal(torch.from_numpy(got[1]), ref.padding_mask)
    if e["padding_mask"] is not None:  # no padding at all: same graph, same result as PyTorch
        import d2v_plugin

        src = e["source"][:1]
        with torch.no_grad():
            want = d2v_plugin.load_encoder(str(checkpoint(name)))(src, None).last_hidden_state
        got = session.run(None, session_feeds(session, (src, torch.zeros(src.shape, dtype=torch.bool))))
        assert (torch.from_numpy(got[0]) - want).abs().max().item() <= 1e-4


def test_onnx_fp16_and_bf16(tmp_path):
    from d2v_plugin.export.onnx_export import export_onnx

    s = export_onnx(str(checkpoint("v2_text")), str(tmp_path / "fp16"), "fp16")
    print(f"v2_text fp16 ONNX: max |diff| {s['max_abs_diff']:.3g}")
    assert s["dtype"] == "fp16" and 0 < s["max_abs_diff"] <= 1e-2
    with pytest.raises(ValueError, match="bf16 is not supported"):
        export_onnx(str(checkpoint("v2_text")), str(tmp_path / "bf16"), "bf16")


# ---- command line -------------------------------------------------------------------------------


def d2v_export(*args):
    return subprocess.Popen([str(BIN / "d2v-export"), *map(str, args)], env=env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def finish(proc, timeout=120):
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def bad_files(tmp_path, marker):
    """Checkpoints d2v-export must refuse, each with a part of the message it must print."""

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    files = {}
    files["missing"] = (tmp_path / "missing.pt", "does not exist")
    data = (compat_dir() / "v2_text.checkpoint.pt").read_bytes()
    (tmp_path / "truncated.pt").write_bytes(data[: len(data) // 2])
    files["truncated"] = (tmp_path / "truncated.pt", "cannot read checkpoint")
    (tmp_path / "notes.pt").write_text("this is not a checkpoint\n")
    files["not_a_checkpoint"] = (tmp_path / "notes.pt", "cannot read checkpoint")
    torch.save({"cfg": {"model": {"_name": "bert_of_theseus"}}, "model": {}}, tmp_path / "unknown.pt")
    files["unknown_model"] = (tmp_path / "unknown.pt", "'bert_of_theseus' is not supported")
    torch.save({"cfg": {"model": {"_name": "data2vec_multi"}}, "model": Evil()}, tmp_path / "malicious.pt")
    files["malicious"] = (tmp_path / "malicious.pt", "unsupported GLOBAL posix.system")
    assert not marker.exists()
    return files


def check_error(key, rc, err, path, want):
    assert rc == 2, (key, err[-3000:])
    lines = [x for x in err.splitlines() if x.startswith("d2v-export: error:")]
    assert len(lines) == 1, (key, err[-3000:])
    print(f"{key}: {lines[0][:300]}")
    assert str(path) in lines[0], (key, lines[0])
    assert want in err, (key, err[-3000:])
    assert "Traceback" not in err, key


def test_cli_subprocess(tmp_path):
    """The installed d2v-export and scripts/export.sh, as a user runs them (a few processes
    at once: each spends seconds importing torch and fairseq)."""
    marker = tmp_path / "PWNED"
    files = bad_files(tmp_path, marker)
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    good = d2v_export(checkpoint("v1_text"), "--out", tmp_path / "good", "--format", "inference", "--dtype", "fp16")
    bad = {k: d2v_export(files[k][0], "--out", tmp_path / k, "--format", "inference") for k in ("malicious",)}
    # the wrapper script with a stand-in for d2v-export (test_cli_usage_errors checks its --help)
    stub = tmp_path / "fake-d2v-export"
    stub.write_text("#!/bin/sh\nprintf '%s|' \"$@\"\n")
    stub.chmod(0o755)
    helper = subprocess.Popen(["bash", "scripts/export.sh", "--help"], cwd=repo, env={**env(), "D2V_EXPORT": str(stub)},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    passed = subprocess.run(["bash", "scripts/export.sh", "a b.pt", "--out", "o", "--format", "onnx"], cwd=repo,
                            env={**env(), "D2V_EXPORT": str(stub)}, stdout=subprocess.PIPE, text=True, timeout=60)
    assert passed.returncode == 0 and passed.stdout == "a b.pt|--out|o|--format|onnx|", passed.stdout
    rc, out, err = finish(good)
    assert rc == 0, err[-3000:]
    print(out)
    assert "architecture: data2vec_text" in out and "smaller" in out
    assert sorted(os.listdir(tmp_path / "good")) == ["config.json", "dict.txt", "model.safetensors"]
    assert json.load(open(tmp_path / "good" / "config.json"))["dtype"] == "fp16"
    for key, proc in bad.items():
        rc, out, err = finish(proc)
        check_error(key, rc, err, *files[key])
    assert not marker.exists(), "unpickling the malicious checkpoint ran its code"
    rc, out, _ = finish(helper)
    assert rc == 0, out
    for flag in ("Usage: bash scripts/export.sh", "--out", "--format", "--dtype", "inference", "onnx", "hf", "bf16", "fp16"):
        assert flag in out, flag
    assert out.rstrip().endswith("--help|")  # then d2v-export --help


@pytest.mark.parametrize("fmt", ["inference", "onnx"])
def test_cli_errors(tmp_path, capsys, fmt):
    from d2v_plugin.export import cli

    marker = tmp_path / "PWNED"
    for key, (path, want) in bad_files(tmp_path, marker).items():
        rc = cli.main([str(path), "--out", str(tmp_path / key), "--format", fmt])
        check_error(key, rc, capsys.readouterr().err, path, want)
        assert not (tmp_path / key / "model.safetensors").exists()
    assert not marker.exists(), "unpickling the malicious checkpoint ran its code"


def test_cli_usage_errors(capsys):
    from d2v_plugin.export import cli

    for argv in (["x.pt", "--out", "o", "--format", "tflite"], ["x.pt", "--out", "o", "--format", "onnx", "--dtype", "int8"],
                 ["x.pt", "--format", "onnx"]):
        with pytest.raises(SystemExit) as e:
            cli.main(argv)
        assert e.value.code == 2
    assert "invalid choice" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        cli.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--out", "--format", "--dtype", "--json", "safetensors", "onnxruntime", "Hugging Face"):
        assert flag in out, flag


def test_cli_hf_import_failure_is_clear(monkeypatch, capsys, tmp_path):
    import builtins

    from d2v_plugin.export import cli

    real_import = builtins.__import__

    def no_hf(name, globals=None, locals=None, fromlist=(), level=0):
        if name == "hf" and level == 1 or name.endswith("export.hf"):
            raise ImportError("simulated: no hf module")
        return real_import(name, globals, locals, fromlist, level)

    monkeypatch.setattr(builtins, "__import__", no_hf)
    rc = cli.main([str(checkpoint("v2_text")), "--out", str(tmp_path), "--format", "hf"])
    err = capsys.readouterr().err
    assert rc == 2 and "--format hf is not available" in err and "simulated" in err


def test_cli_hf_dispatches_to_export_hf(monkeypatch, capsys, tmp_path):
    import d2v_plugin.export.hf as hf
    from d2v_plugin.export import cli

    calls = []

    def fake(path, out_dir, dtype):
        calls.append((path, out_dir, dtype))
        return {"format": "hf", "checkpoint": path, "out_dir": out_dir, "checkpoint_bytes": 10, "exported_bytes": 5}

    monkeypatch.setattr(hf, "export_hf", fake)
    assert cli.main(["ck.pt", "--out", str(tmp_path), "--format", "hf", "--dtype", "bf16", "--json"]) == 0
    assert calls == [("ck.pt", str(tmp_path), "bf16")]
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["format"] == "hf"


def test_missing_export_extra_is_named(tmp_path, monkeypatch, capsys):
    """Without the optional export extra (safetensors) the CLI says which package and how to install it."""
    from d2v_plugin.export import cli

    monkeypatch.setitem(sys.modules, "safetensors", None)
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)
    assert cli.main([str(compat_dir() / "v1_text.checkpoint.pt"), "--out", str(tmp_path / "o"), "--format", "inference"]) == 2
    err = capsys.readouterr().err
    assert "safetensors" in err and ".[export]" in err
