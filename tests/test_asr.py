"""Speech recognition: CTC fine-tuning (d2v_ctc) through the real fairseq-hydra-train on speech
synthesized with espeak-ng, d2v-transcribe, KenLM beam search, Meta's checkpoints, bad input."""

import random
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from helpers import BIN, REPO, compat_dir, hydra_train, run

WORDS = ["ONE", "TWO", "THREE", "FOUR", "FIVE", "SIX", "SEVEN", "EIGHT", "NINE", "ZERO"]


def synthesize(text: str, voice: str, rate: int) -> np.ndarray:
    """espeak-ng speech of ``text`` as 16 kHz float32."""
    from scipy.signal import resample_poly

    with tempfile.NamedTemporaryFile(suffix=".wav") as t:
        subprocess.run(["espeak-ng", "-v", voice, "-s", str(rate), "-w", t.name, text.lower()], check=True)
        wav, sr = sf.read(t.name, dtype="float32")
    g = np.gcd(sr, 16000)
    return resample_poly(wav, 16000 // g, sr // g).astype(np.float32)


def letters(text: str) -> str:
    return " ".join(text.replace(" ", "|")) + " |"


def write_split(root: Path, split: str, items) -> None:
    rows, ltr = [], []
    for n, (text, voice, rate) in enumerate(items):
        name = f"wav/{split}_{n:03d}.wav"
        wav = synthesize(text, voice, rate)
        sf.write(root / name, wav, 16000, subtype="PCM_16")
        rows.append(f"{name}\t{len(wav)}")
        ltr.append(letters(text))
    (root / f"{split}.tsv").write_text(f"{root}\n" + "".join(r + "\n" for r in rows))
    (root / f"{split}.ltr").write_text("".join(line + "\n" for line in ltr))


@pytest.fixture(scope="session")
def digits(tmp_path_factory):
    """Three-word digit phrases: train in two voices, valid = unseen phrases in a third rate."""
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed (apt-get install espeak-ng); it synthesizes the test speech")
    root = tmp_path_factory.mktemp("digits")
    (root / "wav").mkdir()
    rng = random.Random(0)
    phrases = [" ".join(rng.choice(WORDS) for _ in range(3)) for _ in range(32)]
    write_split(root, "train", [(p, v, r) for p in phrases[:24] for v, r in (("en", 170), ("en-us", 150))])
    write_split(root, "valid", [(p, "en", 160) for p in phrases[24:]])
    symbols = sorted({c for w in WORDS for c in w} | {"|"})
    (root / "dict.ltr.txt").write_text("".join(f"{c} 1\n" for c in symbols))
    return root


@pytest.fixture(scope="session")
def pretrained(digits, tmp_path_factory):
    """Our own tiny data2vec 2.0 speech checkpoint (a few pretraining updates)."""
    out = tmp_path_factory.mktemp("asr_pretrain")
    hydra_train("pretraining/audio_tiny", f"task.data={digits}", "optimization.max_update=3", f"checkpoint.save_dir={out}")
    return out / "checkpoint_last.pt"


@pytest.fixture(scope="session")
def finetuned(digits, pretrained, tmp_path_factory):
    """(save_dir, validation log rows) of a tiny CTC fine-tune, validated every 30 updates."""
    out = tmp_path_factory.mktemp("asr_finetune")
    proc = hydra_train(
        "finetuning/asr/tiny", f"task.data={digits}", f"model.model_path={pretrained}", f"checkpoint.save_dir={out}",
        "optimization.max_update=60", "dataset.validate_interval_updates=30", "checkpoint.save_interval_updates=30",
        "model.mask_prob=0", "model.mask_channel_prob=0",
    )
    valid = [dict((k, float(v)) for k, v in re.findall(r"\| (\w+) ([-+0-9.eE]+)\b", line))
             for line in proc.stdout.splitlines() if "[valid]" in line and "| wer " in line]
    assert len(valid) == 2, proc.stdout[-3000:]
    return out, valid


def test_finetune_beats_untrained(digits, pretrained, finetuned):
    from d2v_plugin.asr.baseline import untrained_recognizer
    from d2v_plugin.asr.transcribe import manifest_inputs
    from d2v_plugin.checkpoints import read_checkpoint
    from d2v_plugin.criteria.ctc import error_counts

    paths, refs = manifest_inputs(str(digits / "valid.tsv"))
    w, wn, c, cn = error_counts(refs, untrained_recognizer(str(pretrained), str(digits)).transcribe(paths))
    untrained_cer = 100.0 * c / cn
    out, valid = finetuned
    best_uer = min(r["uer"] for r in valid)
    assert untrained_cer >= 90, untrained_cer
    assert best_uer < 0.8 * untrained_cer and best_uer < 85, (best_uer, untrained_cer)
    # what a fine-tuned checkpoint records: the encoder, its normalisation (ours: task.normalize=true), the letters
    model_cfg = read_checkpoint(str(out / "checkpoint_best.pt"))["cfg"]["model"]
    assert model_cfg["normalize"] is True
    assert list(model_cfg["target_symbols"])[4:] == (digits / "dict.ltr.txt").read_text().split()[::2]
    assert model_cfg["pretrained_model_args"]["_name"] == "data2vec_multi"


def test_transcribe_matches_validation(digits, finetuned):
    out, valid = finetuned
    best = min(valid, key=lambda r: r["wer"])
    hyp = out / "hyp.tsv"
    proc = run([BIN / "d2v-transcribe", out / "checkpoint_best.pt", "--manifest", digits / "valid.tsv", "--out", hyp])
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("WER ")][-1]
    wer, cer = float(line.split()[1]), float(line.split("CER ")[1].split()[0])
    assert wer == pytest.approx(best["wer"], abs=1e-3) and cer == pytest.approx(best["uer"], abs=1e-3), (line, best)
    rows = hyp.read_text().splitlines()
    assert len(rows) == 8 and all(r.split("\t")[0].endswith(".wav") for r in rows)
    # load_encoder reads the fine-tuned checkpoint's encoder (its head dropped)
    import d2v_plugin

    enc = d2v_plugin.load_encoder(str(out / "checkpoint_best.pt"))
    assert enc.embed_dim == 64


ARPA = """\\data\\
ngram 1=6
ngram 2=2

\\1-grams:
-0.5\t<s>\t-0.3
-0.5\t</s>
-0.7\tCAT\t-0.3
-0.7\tDOG\t-0.3
-3.0\tCAX\t-0.3
-9.0\t<unk>

\\2-grams:
-0.1\t<s> CAT
-0.1\tCAT DOG

\\end\\
"""


def emissions(spelling, symbols, confusions=None):
    """(1, T, V) log-probs: each letter of ``spelling`` for one frame then a blank frame;
    ``confusions`` {frame: letter} puts 60% on another letter at that frame."""
    index = {s: i for i, s in enumerate(symbols)}
    frames = []
    for ch in spelling:
        frames += [ch, "<s>"]
    lp = torch.full((len(frames), len(symbols)), 1e-4)
    for t, ch in enumerate(frames):
        lp[t, index[ch]] = 1.0
    for t, other in (confusions or {}).items():
        lp[t] = 1e-4
        lp[t, index[other]], lp[t, index[frames[t]]] = 0.6, 0.4
    return torch.log(lp / lp.sum(-1, keepdim=True)).unsqueeze(0)


def test_lm_decoding(tmp_path):
    pytest.importorskip("flashlight.lib.text.decoder.kenlm", reason="flashlight-text (the asr extra) is not installed")
    from d2v_plugin.asr.decoding import BeamSearchDecoder, greedy_decode

    lm = tmp_path / "lm.arpa"
    lm.write_text(ARPA)
    symbols = ["<s>", "<pad>", "</s>", "<unk>", "|", "A", "C", "D", "G", "O", "T", "X"]
    # "CAT|DOG|" with the T heard more as an X: greedy says CAX; both are words of the LM,
    # which makes CAT far likelier: beam search with the LM says CAT, without it (weight 0) CAX
    e = emissions("CAT|DOG|", symbols, confusions={4: "X"})
    n = torch.tensor([e.size(1)])
    assert greedy_decode(e, n, symbols) == ["CAX DOG"]
    assert BeamSearchDecoder(symbols, str(lm), beam=10).decode(e, n) == ["CAT DOG"]
    assert BeamSearchDecoder(symbols, str(lm), beam=10, lm_weight=0.0, word_score=0.0).decode(e, n) == ["CAX DOG"]


def test_lm_decoding_of_finetuned_model(tmp_path, finetuned, digits):
    """On the fine-tuned model every word comes from the LM's vocabulary."""
    pytest.importorskip("flashlight.lib.text.decoder.kenlm", reason="flashlight-text (the asr extra) is not installed")
    from d2v_plugin.asr import SpeechRecognizer

    digits_lm = tmp_path / "digits.arpa"
    digits_lm.write_text("\\data\\\nngram 1=%d\nngram 2=1\n\n\\1-grams:\n-1.0\t<s>\t0\n-1.0\t</s>\n-1.0\t<unk>\n%s\n"
                         "\\2-grams:\n-0.5\tONE TWO\n\n\\end\\\n"
                         % (len(WORDS) + 3, "".join(f"-1.0\t{w}\t0\n" for w in WORDS)))
    out, _ = finetuned
    rec = SpeechRecognizer.from_checkpoint(str(out / "checkpoint_best.pt"), lm=str(digits_lm), beam=20)
    paths = [str(digits / "wav" / f"valid_{i:03d}.wav") for i in range(3)]
    texts = rec.transcribe(paths)
    assert len(texts) == 3 and all(w in WORDS for t in texts for w in t.split()), texts


@pytest.mark.parametrize("name", ["v2_audio", "v1_audio"])
def test_finetune_from_meta_checkpoint(name, digits, tmp_path):
    from d2v_plugin.asr import SpeechRecognizer
    from d2v_plugin.checkpoints import read_checkpoint

    ckpt = compat_dir() / f"{name}.checkpoint.pt"
    hydra_train("finetuning/asr/tiny", f"task.data={digits}", f"model.model_path={ckpt}", f"checkpoint.save_dir={tmp_path}",
                "optimization.max_update=2", "dataset.disable_validation=true")
    saved = read_checkpoint(str(tmp_path / "checkpoint_last.pt"))["cfg"]["model"]
    meta = read_checkpoint(str(ckpt))
    meta_task = meta["cfg"]["task"] if meta.get("cfg") else vars(meta["args"])
    assert saved["normalize"] == bool(meta_task["normalize"]) and saved["normalize"] is True
    assert saved["pretrained_model_args"]["_name"] == {"v2_audio": "data2vec_multi", "v1_audio": "data2vec_audio"}[name]
    texts = SpeechRecognizer.from_checkpoint(str(tmp_path / "checkpoint_last.pt")).transcribe([np.zeros(16000, np.float32)])
    assert len(texts) == 1 and isinstance(texts[0], str)
    _check_hf_export(name, tmp_path / "checkpoint_last.pt", digits, tmp_path / "hf")


def _check_hf_export(name, ckpt, digits, out):
    """1.0: Data2VecAudioForCTC + Wav2Vec2Processor give our logits and transcripts; 2.0 is refused."""
    from d2v_plugin.asr import SpeechRecognizer
    from d2v_plugin.export.hf import export_hf

    if name == "v2_audio":
        with pytest.raises(ValueError, match="transformers has no data2vec 2.0 architecture"):
            export_hf(str(ckpt), str(out))
        return
    from transformers import AutoProcessor, Data2VecAudioForCTC

    export_hf(str(ckpt), str(out))
    rec = SpeechRecognizer.from_checkpoint(str(ckpt))
    wav = SpeechRecognizer.load_audio(str(digits / "wav" / "valid_000.wav"))
    processor = AutoProcessor.from_pretrained(out)
    hf = Data2VecAudioForCTC.from_pretrained(out).eval()
    inputs = processor(wav.numpy(), sampling_rate=16000, return_tensors="pt")
    with torch.no_grad():
        ours = rec.model(source=wav[None], padding_mask=None)["logits"]
        theirs = hf(**inputs).logits
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=1e-4)
    # the best path decoded by transformers' tokenizer (blank = its pad token) and by our greedy decoder
    assert processor.batch_decode(theirs.argmax(-1))[0] == rec.transcribe([wav])[0]


def _build(digits, model_path):
    from omegaconf import OmegaConf

    from d2v_plugin.models.finetuning.ctc import D2vCtcConfig, D2vCtcModel
    from d2v_plugin.tasks.audio_finetuning import D2vAudioFinetuningConfig, D2vAudioFinetuningTask

    task = D2vAudioFinetuningTask.setup_task(D2vAudioFinetuningConfig(data=str(digits)))
    return D2vCtcModel.build_model(OmegaConf.structured(D2vCtcConfig(model_path=str(model_path))), task), task


@pytest.mark.parametrize("name,modality", [("v2_text", "TEXT"), ("v2_image", "IMAGE")])
def test_non_speech_checkpoint_is_refused(digits, name, modality):
    with pytest.raises(ValueError, match=f"is a {modality} model; this task needs a AUDIO checkpoint"):
        _build(digits, compat_dir() / f"{name}.checkpoint.pt")


def test_bad_labels_and_manifest(digits, tmp_path):
    from d2v_plugin.data.labelled_audio import LabelError
    from d2v_plugin.tasks.audio_finetuning import D2vAudioFinetuningConfig, D2vAudioFinetuningTask

    data = tmp_path / "data"
    data.mkdir()
    for f in ("dict.ltr.txt", "valid.tsv"):
        shutil.copy(digits / f, data / f)
    task = D2vAudioFinetuningTask.setup_task(D2vAudioFinetuningConfig(data=str(data)))
    lines = (digits / "valid.ltr").read_text().splitlines()
    (data / "valid.ltr").write_text("\n".join(lines[:2] + ["Q U A C K |"] + lines[3:]) + "\n")
    with pytest.raises(LabelError, match=r"valid.ltr: 4 symbol\(s\) missing from .*dict.ltr.txt: 'Q' \(first on line 3\), 'A'"):
        task.load_dataset("valid")
    (data / "valid.ltr").write_text("\n".join(lines) + "\n")
    task.load_dataset("valid")  # the intact copy loads
    rows = (data / "valid.tsv").read_text().splitlines()
    path, n = rows[4].split("\t")
    rows[4] = f"{path}\t{int(n) + 160}"
    (data / "valid.tsv").write_text("\n".join(rows) + "\n")
    with pytest.raises(LabelError, match=rf"valid.tsv line 5: {path} has {n} samples but the manifest says {int(n) + 160}"):
        task.load_dataset("valid")


def test_normalize_and_error_counts():
    import jiwer
    import torch.nn.functional as F

    from d2v_plugin.criteria.ctc import error_counts
    from d2v_plugin.models.finetuning.ctc import normalize_waveforms

    wavs = [torch.randn(700) * 3 + 1, torch.randn(400) * 0.1 - 2]
    source = torch.zeros(2, 700)
    pad = torch.ones(2, 700, dtype=torch.bool)
    for i, w in enumerate(wavs):
        source[i, : len(w)], pad[i, : len(w)] = w, False
    out = normalize_waveforms(source, pad)
    for i, w in enumerate(wavs):  # what Meta's datasets do to each unpadded file
        torch.testing.assert_close(out[i, : len(w)], F.layer_norm(w, w.shape), atol=1e-4, rtol=1e-4)
    assert out[1, 400:].abs().max() == 0
    refs, hyps = ["ONE TWO THREE", "FOUR FIVE"], ["ONE TOO THREE SIX", "FIVE"]
    w, wn, c, cn = error_counts(refs, hyps)
    assert w / wn == pytest.approx(jiwer.wer(refs, hyps)) and c / cn == pytest.approx(jiwer.cer(refs, hyps))


def test_recipe_mechanics(digits):
    """Frozen feature extractor, encoder frozen for freeze_finetune_updates, masking only in training."""
    from omegaconf import OmegaConf

    from d2v_plugin.models.finetuning.ctc import D2vCtcConfig, D2vCtcModel
    from d2v_plugin.tasks.audio_finetuning import D2vAudioFinetuningConfig, D2vAudioFinetuningTask

    task = D2vAudioFinetuningTask.setup_task(D2vAudioFinetuningConfig(data=str(digits)))
    cfg = OmegaConf.structured(D2vCtcConfig(model_path=str(compat_dir() / "v2_audio.checkpoint.pt"), freeze_finetune_updates=5,
                                            mask_prob=0.5, mask_channel_prob=0.0, layerdrop=0.0))
    model = D2vCtcModel.build_model(cfg, task)
    assert model.cfg.normalize is True
    source = torch.randn(2, 16000)

    def grads(update):
        model.zero_grad(set_to_none=True)
        model.set_num_updates(update)
        model(source)["logits"].sum().backward()
        return {n: p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters()}

    model.train()
    g = grads(0)
    assert g["head.weight"] and not any(v for n, v in g.items() if n.startswith("encoder."))
    g = grads(5)
    assert g["encoder.blocks.0.mlp.fc1.weight"] and not any(g[n] for n in g if ".local_encoder." in n)
    model.eval()
    a, b = model(source)["logits"], model(source)["logits"]
    torch.testing.assert_close(a, b)
    model.train()
    for m in model.modules():  # no dropout: only the masking differs between train and eval
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    assert not torch.allclose(model(source)["logits"], a, atol=1e-3)  # masked in training


def test_load_model_and_inference_export(digits, finetuned, tmp_path):
    """d2v_plugin.load_model transcribes as SpeechRecognizer does, from the checkpoint and from
    its inference export (encoder + CTC head in safetensors, the letters in config.json)."""
    import d2v_plugin
    from d2v_plugin.asr import SpeechRecognizer
    from d2v_plugin.asr.transcribe import manifest_inputs

    out, _ = finetuned
    ckpt = out / "checkpoint_best.pt"
    paths, _ = manifest_inputs(str(digits / "valid.tsv"))
    want = SpeechRecognizer.from_checkpoint(str(ckpt)).transcribe(paths)
    asr = d2v_plugin.load_model(str(ckpt))
    assert isinstance(asr, SpeechRecognizer) and asr.transcribe(paths) == want
    export = tmp_path / "export"
    printed = run([BIN / "d2v-export", ckpt, "--out", export, "--format", "inference"]).stdout
    assert "head: d2v_ctc" in printed
    again = d2v_plugin.load_model(str(export))
    assert again.transcribe(paths) == want
    wav = torch.from_numpy(np.random.default_rng(0).standard_normal(16000).astype(np.float32))
    with torch.no_grad():
        a = asr.model(source=wav[None], padding_mask=None)
        b = again.model(source=wav[None], padding_mask=None)
    torch.testing.assert_close(a["logits"], b["logits"])

    import onnxruntime as ort

    onnx_dir = tmp_path / "onnx"
    assert "head: d2v_ctc" in run([BIN / "d2v-export", ckpt, "--out", onnx_dir, "--format", "onnx"]).stdout
    session = ort.InferenceSession(str(onnx_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    got = session.run(None, {"source": wav[None].numpy(), "padding_mask": np.zeros((1, len(wav)), dtype=bool)})
    torch.testing.assert_close(torch.from_numpy(got[0]), a["logits"], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", ["v2_audio", "v1_audio"])
def test_recipe_dropouts_reach_the_encoder(name, tmp_path):
    """The *_base recipes' dropout / attention_dropout / activation_dropout (Meta's 0, 0, 0.1)
    replace the pretrained encoder's in every block; left null, the pretrained ones stay."""
    from omegaconf import OmegaConf

    from d2v_plugin.models.blocks import Block
    from d2v_plugin.models.finetuning.ctc import D2vCtcConfig, D2vCtcModel
    from d2v_plugin.tasks.audio_finetuning import D2vAudioFinetuningConfig, D2vAudioFinetuningTask

    (tmp_path / "dict.ltr.txt").write_text("".join(f"{c} 1\n" for c in "|ABC"))
    task = D2vAudioFinetuningTask.setup_task(D2vAudioFinetuningConfig(data=str(tmp_path)))
    for split in ("10m", "1h", "10h", "100h", "960h"):
        recipe = OmegaConf.load(REPO / "config" / "finetuning" / "asr" / f"{split}_base.yaml").model
        assert (recipe.dropout, recipe.attention_dropout, recipe.activation_dropout) == (0.0, 0.0, 0.1), split

    def dropouts(**fields):
        cfg = OmegaConf.merge(OmegaConf.structured(D2vCtcConfig), fields, {"model_path": str(compat_dir() / f"{name}.checkpoint.pt")})
        blocks = [m for m in D2vCtcModel.build_model(cfg, task).encoder.modules() if isinstance(m, Block)]
        assert blocks
        return {(b.attn.proj_drop.p, b.post_mlp_dropout.p, b.attn.attn_drop, b.mlp.drop1.p,
                 getattr(b.mlp.drop2, "p", None)) for b in blocks}

    fc2_drop = {"v2_audio": 0.1, "v1_audio": None}[name]  # 1.0 speech blocks have no dropout after fc2
    assert dropouts(**{k: recipe[k] for k in ("dropout", "attention_dropout", "activation_dropout")}) == {(0.0, 0.0, 0.0, 0.1, fc2_drop)}
    pretrained = dropouts()
    assert len(pretrained) == 1 and next(iter(pretrained))[3] != 0.1  # the checkpoints were pretrained with other values
