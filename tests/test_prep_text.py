"""Tests of ``python -m d2v_plugin.prep.text``: raw text -> fairseq-binarized corpus."""

import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from d2v_plugin.prep import text as prep
from helpers import write_tiny_gpt2

REPO = Path(__file__).resolve().parents[1]
WORDS = ("alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron "
         "pi rho sigma tau upsilon phi chi psi omega the a of and to in").split()


def sentence(i, j):
    return " ".join(WORDS[(i * 7 + j * 3 + k * k) % len(WORDS)] for k in range(5 + (i + j) % 7)) + "."


def write_corpus(path, n_docs=30, n_lines=3):
    """A fairseq-format text file: one paragraph per line, blank line between documents."""
    docs = [[sentence(i, j) for j in range(n_lines)] for i in range(n_docs)]
    path.write_text("\n\n".join("\n".join(d) for d in docs) + "\n")
    return docs


def run_cli(*args):
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "d2v_plugin.prep.text", *map(str, args)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def load_bin(bin_dir, split):
    from fairseq.data import Dictionary, data_utils

    dictionary = Dictionary.load(str(bin_dir / "dict.txt"))
    dataset = data_utils.load_indexed_dataset(str(bin_dir / split), dictionary)
    assert dataset is not None, f"no {split} dataset in {bin_dir}"
    return dictionary, dataset


def check_matches_tok(bin_dir, out, split):
    """Every binarized line equals its line in SPLIT.tok (then EOS), with no <unk>."""
    dictionary, dataset = load_bin(bin_dir, split)
    lines = (out / f"{split}.tok").read_text(encoding="utf-8").splitlines()
    assert len(dataset) == len(lines)
    for item, line in zip(dataset, lines):
        assert item[-1].item() == dictionary.eos()
        assert dictionary.unk() not in item.tolist()
        assert dictionary.string(item) == line
    return dictionary, dataset


@pytest.fixture(scope="module")
def spm_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("spm")
    docs = write_corpus(tmp / "corpus.txt")
    out = tmp / "out"
    result = run_cli("--corpus", tmp / "corpus.txt", "--out", out, "--vocab-size", 60,
                     "--valid-fraction", 0.1, "--workers", 2)
    assert result.returncode == 0, result.stdout + result.stderr
    return docs, out, result


def test_sentencepiece_text_file(spm_run):
    import sentencepiece as spm

    docs, out, _ = spm_run
    bin_dir = out / "bin"
    for name in ("train.bin", "train.idx", "valid.bin", "valid.idx", "dict.txt"):
        assert (bin_dir / name).is_file(), name
    # every 10th document went to valid; documents end with a blank line
    valid_docs = [docs[i] for i in (9, 19, 29)]
    train_docs = [d for i, d in enumerate(docs) if i not in (9, 19, 29)]
    assert (out / "valid.txt").read_text() == "".join("\n".join(d) + "\n\n" for d in valid_docs)
    assert (out / "train.txt").read_text() == "".join("\n".join(d) + "\n\n" for d in train_docs)

    sp = spm.SentencePieceProcessor(model_file=str(out / "spm.model"))
    for split in ("train", "valid"):
        dictionary, dataset = check_matches_tok(bin_dir, out, split)
        raw = (out / f"{split}.txt").read_text().splitlines()
        for item, line in zip(dataset, raw):
            # a blank line (document end) binarizes to a lone EOS
            pieces = dictionary.string(item).split()
            assert sp.decode(pieces) == line
    # the dictionary holds every (non-control) sentencepiece piece
    dictionary, _ = load_bin(bin_dir, "train")
    pieces = [sp.id_to_piece(i) for i in range(sp.get_piece_size())
              if not (sp.is_control(i) or sp.is_unknown(i))]
    assert all(p in dictionary for p in pieces)
    assert len(dictionary) == dictionary.nspecial + len(pieces)


def test_rerun_skips_finished_steps(spm_run):
    _, out, _ = spm_run
    before = (out / "bin" / "train.bin").stat().st_mtime_ns
    result = run_cli("--corpus", out.parent / "corpus.txt", "--out", out, "--vocab-size", 60,
                     "--valid-fraction", 0.1, "--workers", 2)
    assert result.returncode == 0, result.stderr
    for step in ("split", "tokenize", "binarize"):
        assert f"step {step}: already done" in result.stdout
    assert "fairseq_cli.preprocess" not in result.stdout
    assert (out / "bin" / "train.bin").stat().st_mtime_ns == before


def test_reuse_spm_model(spm_run, tmp_path):
    _, out, _ = spm_run
    result = run_cli("--corpus", out.parent / "corpus.txt", "--out", tmp_path / "out",
                     "--spm-model", out / "spm.model", "--valid-fraction", 0.1)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "trained sentencepiece" not in result.stdout
    for name in ("train.tok", "valid.tok", "dict.txt", "spm.model"):
        assert (tmp_path / "out" / name).read_bytes() == (out / name).read_bytes(), name
    check_matches_tok(tmp_path / "out" / "bin", tmp_path / "out", "train")


def test_gpt2_route(tmp_path):
    from fairseq.data.encoders.gpt2_bpe_utils import get_encoder

    gpt2 = write_tiny_gpt2(tmp_path / "gpt2")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the theory of the thing\nthen there\n\nÜnïcode text, the end\nlast one\n")
    out = tmp_path / "out"
    result = run_cli("--corpus", corpus, "--out", out, "--tokenizer", "gpt2", "--gpt2-dir", gpt2,
                     "--valid-fraction", 0.5)
    assert result.returncode == 0, result.stdout + result.stderr
    assert (out / "bin" / "dict.txt").read_text() == (gpt2 / "dict.txt").read_text()
    bpe = get_encoder(str(gpt2 / "encoder.json"), str(gpt2 / "vocab.bpe"))
    assert {"257", "258"} <= set((out / "train.tok").read_text().split())  # "he", " the" merged
    for split in ("train", "valid"):
        dictionary, dataset = check_matches_tok(out / "bin", out, split)
        raw = (out / f"{split}.txt").read_text().splitlines()
        decoded = [bpe.decode([int(t) for t in dictionary.string(item).split()]) for item in dataset]
        assert decoded == raw
    assert (out / "valid.txt").read_text() == "Ünïcode text, the end\nlast one\n\n"


def test_default_corpus_and_vocab_clamp(tmp_path):
    out = tmp_path / "out"
    result = run_cli("--default-corpus", "--out", out, "--vocab-size", 100000, "--workers", 2)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "corpus too small for --vocab-size 100000" in result.stdout
    text = (out / "default_corpus.txt").read_text()
    assert "assert" in text and text.count("\n\n") >= 50  # many documents
    dictionary, dataset = load_bin(out / "bin", "train")
    assert 1000 < len(dictionary) < 100000
    assert len(dataset) == len((out / "train.txt").read_text().splitlines())
    tokens = [t for item in dataset for t in item.tolist()]
    assert tokens.count(dictionary.unk()) < 0.01 * len(tokens)  # only rare characters
    _, valid = load_bin(out / "bin", "valid")
    assert len(valid) == len((out / "valid.txt").read_text().splitlines()) > 0


def test_directory_corpus_reads_txt_and_tar_archives(tmp_path):
    root = tmp_path / "corpus"
    (root / "b").mkdir(parents=True)
    (root / "b" / "2.txt").write_text("second doc\n\nstill second\n")
    (root / "a.txt").write_text("first   doc\twith\u2028odd spaces\n")
    (root / "notes.md").write_text("ignored\n")
    member_dir = tmp_path / "members"
    member_dir.mkdir()
    (member_dir / "x.txt").write_text("archived one\n")
    (member_dir / "y.txt").write_text("archived two\n")
    with tarfile.open(root / "c_data.xz", "w:xz") as tar:
        for name in ("x.txt", "y.txt"):
            tar.add(member_dir / name, arcname=name)
    docs = list(prep.iter_documents(root, workers=2))
    assert docs == [["first doc with odd spaces"], ["second doc", "still second"],
                    ["archived one"], ["archived two"]]


def test_single_document_is_split_by_lines(tmp_path):
    train, valid = tmp_path / "train.txt", tmp_path / "valid.txt"
    assert prep.split_corpus(iter([["l1", "l2", "l3"]]), train, valid, 0.01) == (1, 1)
    assert train.read_text() == "l1\nl2\n\n" and valid.read_text() == "l3\n\n"


def test_interrupted_step_leaves_no_marker(tmp_path, monkeypatch):
    write_corpus(tmp_path / "corpus.txt", n_docs=5)

    def boom(out, workers):
        (out / "bin.tmp").mkdir()
        raise KeyboardInterrupt

    monkeypatch.setattr(prep, "binarize", boom)
    with pytest.raises(KeyboardInterrupt):
        prep.prepare_text(tmp_path / "corpus.txt", tmp_path / "out", vocab_size=40)
    done = tmp_path / "out" / ".done"
    assert (done / "tokenize.json").is_file()
    assert not (done / "binarize.json").exists()
    assert not (tmp_path / "out" / "bin").exists()


@pytest.mark.parametrize("setup, args, message", [
    ("missing", ["--corpus", "{tmp}/nope.txt"], "corpus not found: {tmp}/nope.txt"),
    ("blank", ["--corpus", "{tmp}/blank.txt"], "corpus is empty"),
    ("emptydir", ["--corpus", "{tmp}/emptydir"], "holds no *.txt files"),
    ("oneline", ["--corpus", "{tmp}/one.txt"], "single line"),
    ("gpt2", ["--corpus", "{tmp}/one.txt", "--tokenizer", "gpt2", "--gpt2-dir", "{tmp}/gpt2"],
     "--gpt2-dir {tmp}/gpt2 lacks vocab.bpe"),
    ("gpt2", ["--corpus", "{tmp}/one.txt", "--tokenizer", "gpt2"], "needs --gpt2-dir"),
    ("badtar", ["--corpus", "{tmp}/bad.tar.xz"], "cannot read archive {tmp}/bad.tar.xz"),
    ("badshard", ["--corpus", "{tmp}/shards", "--workers", "2"],
     "cannot read archive {tmp}/shards/s_data.xz: Corrupt input data"),
])
def test_bad_input_gives_clear_error(tmp_path, capsys, setup, args, message):
    (tmp_path / "blank.txt").write_text("\n   \n\t\n")
    (tmp_path / "emptydir").mkdir()
    (tmp_path / "one.txt").write_text("only one line\n")
    (tmp_path / "bad.tar.xz").write_bytes(b"\xfd7zXZ\x00garbage")
    if setup == "badshard":  # a shard whose xz stream breaks in the middle
        (tmp_path / "shards").mkdir()
        (tmp_path / "shards" / "ok.txt").write_text("fine\n")
        with tarfile.open(tmp_path / "shards" / "s_data.xz", "w:xz") as tar:
            for i in range(8):
                (tmp_path / f"{i}.txt").write_text(os.urandom(8000).hex())
                tar.add(tmp_path / f"{i}.txt", arcname=f"{i}.txt")
        data = bytearray((tmp_path / "shards" / "s_data.xz").read_bytes())
        for k in range(len(data) * 3 // 4, len(data) * 3 // 4 + 8):
            data[k] ^= 0xFF
        (tmp_path / "shards" / "s_data.xz").write_bytes(bytes(data))
    (tmp_path / "gpt2").mkdir()
    (tmp_path / "gpt2" / "encoder.json").write_text("{}")
    (tmp_path / "gpt2" / "dict.txt").write_text("")
    fmt = lambda s: s.format(tmp=tmp_path)  # noqa: E731
    rc = prep.main([fmt(a) for a in args] + ["--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 1
    assert fmt(message) in err
    assert "Traceback" not in err
    assert not (tmp_path / "out" / ".done" / "split.json").exists()


def test_help_documents_every_flag():
    help_text = prep.get_parser().format_help()
    for flag in ("--corpus", "--default-corpus", "--out", "--tokenizer", "--vocab-size",
                 "--spm-model", "--gpt2-dir", "--valid-fraction", "--workers"):
        assert flag in help_text
    for action in prep.get_parser()._actions:
        assert action.help, action.dest
