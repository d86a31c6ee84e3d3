"""Tests of datasets/openwebtext/prepare.sh against real HTTP servers on 127.0.0.1.

The served archive is laid out like Zenodo's openwebtext.tar.xz: an xz-compressed tar
holding openwebtext/urlsf_subsetNN-M_data.xz files, each an xz-compressed tar of .txt
documents. The GPT-2 BPE files are tiny handmade ones in fairseq's formats.
"""

import functools
import hashlib
import http.server
import io
import os
import re
import socket
import subprocess
import sys
import tarfile
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from helpers import write_tiny_gpt2

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "datasets" / "openwebtext" / "prepare.sh"
SHARDS = {"urlsf_subset00-1_data.xz": 4, "urlsf_subset00-2_data.xz": 3, "urlsf_subset01-1_data.xz": 3}
N_DOCS = sum(SHARDS.values())


# ----------------------------------------------------------------------------
# test data


def tar_xz(members):
    """Bytes of an xz-compressed tar of {name: bytes}."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:xz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def document(i):
    words = "the quick brown fox jumps over lazy dogs then sleeps there".split()
    paras = [" ".join(words[(i + k + j) % len(words)] for j in range(6 + k)) + "." for k in range(3)]
    return "\n\n".join(paras) + "\n"


def owt_archive():
    i, members = 0, {}
    for shard, n in SHARDS.items():
        docs = {}
        for _ in range(n):
            text = document(i).encode()
            docs[f"{i:07d}-{hashlib.md5(text).hexdigest()}.txt"] = text
            i += 1
        members[f"openwebtext/{shard}"] = tar_xz(docs)
    return tar_xz(members)


@pytest.fixture(scope="module")
def mirror(tmp_path_factory):
    """Mirror trees: good/, corrupt/ (bytes flipped), truncated/, wronglayout/."""
    root = tmp_path_factory.mktemp("mirror")
    good = owt_archive()
    corrupt = bytearray(good)
    for k in range(len(good) // 2, len(good) // 2 + 16):
        corrupt[k] ^= 0xFF
    archives = {
        "good": good,
        "corrupt": bytes(corrupt),
        "truncated": good[: len(good) * 2 // 3],
        "wronglayout": tar_xz({"something/else.txt": b"not openwebtext\n"}),
    }
    for name, data in archives.items():
        (root / name).mkdir()
        (root / name / "openwebtext.tar.xz").write_bytes(data)
        write_tiny_gpt2(root / name / "gpt2_bpe")
    return root, hashlib.sha256(good).hexdigest()


# ----------------------------------------------------------------------------
# servers


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def plain_server(mirror):
    """``python -m http.server`` (which ignores Range requests)."""
    root, _ = mirror
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1",
                             "--directory", str(root)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(100):
        try:
            urllib.request.urlopen(url + "/good/gpt2_bpe/dict.txt", timeout=1).read()
            break
        except OSError:
            time.sleep(0.1)
    else:
        proc.kill()
        pytest.fail("http.server did not start")
    yield url
    proc.terminate()
    proc.wait(timeout=10)


class RangeHandler(http.server.SimpleHTTPRequestHandler):
    """SimpleHTTPRequestHandler plus single-range ``bytes=N-`` requests; records them."""

    ranges = []

    def send_head(self):
        path = self.translate_path(self.path)
        match = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range", ""))
        if not match or not os.path.isfile(path):
            return super().send_head()
        self.ranges.append(self.headers["Range"])
        start, size = int(match.group(1)), os.path.getsize(path)
        if start >= size:
            self.send_response(416)
            self.send_header("Content-Range", f"bytes */{size}")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return None
        f = open(path, "rb")
        f.seek(start)
        self.send_response(206)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Range", f"bytes {start}-{size - 1}/{size}")
        self.send_header("Content-Length", str(size - start))
        self.end_headers()
        return f

    def log_message(self, *args):
        pass


@pytest.fixture
def range_server(mirror):
    root, _ = mirror
    RangeHandler.ranges = []
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(RangeHandler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", RangeHandler.ranges
    server.shutdown()
    server.server_close()


# ----------------------------------------------------------------------------
# helpers


def run_script(*args):
    env = dict(os.environ, PYTHON=sys.executable)
    result = subprocess.run(["bash", str(SCRIPT), *map(str, args)], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=300)
    result.output = result.stdout + result.stderr
    return result


def doc_count(path):
    return sum(1 for block in path.read_text().split("\n\n") if block.strip())


# ----------------------------------------------------------------------------
# tests


def test_help_explains_mirror_layout():
    result = run_script("--help")
    assert result.returncode == 0
    for text in ("--out", "--mirror", "--workers", "--tokenizer", "--sha256", "URL/openwebtext.tar.xz",
                 "URL/gpt2_bpe/encoder.json", "URL/gpt2_bpe/vocab.bpe", "URL/gpt2_bpe/dict.txt"):
        assert text in result.stdout


def test_full_run_then_rerun_skips(mirror, plain_server, tmp_path):
    from fairseq.data import Dictionary, data_utils
    from fairseq.data.encoders.gpt2_bpe_utils import get_encoder

    root, sha = mirror
    out = tmp_path / "owt"
    args = ("--out", out, "--mirror", f"{plain_server}/good", "--workers", 2,
            "--valid-fraction", 0.3, "--sha256", sha)
    result = run_script(*args)
    assert result.returncode == 0, result.output

    assert (out / "download" / "openwebtext.tar.xz").read_bytes() == (root / "good" / "openwebtext.tar.xz").read_bytes()
    assert sorted(p.name for p in (out / "raw" / "openwebtext").iterdir()) == sorted(SHARDS)
    for step in ("download", "gpt2-files", "extract", "split.json", "tokenize.json", "binarize.json"):
        assert (out / ".done" / step).is_file(), step
    assert doc_count(out / "train.txt") == 7 and doc_count(out / "valid.txt") == 3

    bpe = get_encoder(str(out / "gpt2_bpe" / "encoder.json"), str(out / "gpt2_bpe" / "vocab.bpe"))
    dictionary = Dictionary.load(str(out / "bin" / "dict.txt"))
    for split in ("train", "valid"):
        dataset = data_utils.load_indexed_dataset(str(out / "bin" / split), dictionary)
        raw = (out / f"{split}.txt").read_text().splitlines()
        assert len(dataset) == len(raw)
        decoded = [bpe.decode([int(t) for t in dictionary.string(item).split()]) for item in dataset]
        assert decoded == raw
        # each document ends with a lone EOS, fairseq's document separator
        assert sum(len(item) == 1 for item in dataset) == doc_count(out / f"{split}.txt")

    before = (out / "bin" / "train.bin").stat().st_mtime_ns
    again = run_script(*args)
    assert again.returncode == 0, again.output
    for step in ("download", "gpt2-files", "extract", "split", "tokenize", "binarize"):
        assert f"step {step}: already done" in again.output, step
    assert "downloading" not in again.output
    assert (out / "bin" / "train.bin").stat().st_mtime_ns == before


@pytest.mark.parametrize("fraction", [0.5, 1.0])
def test_resumes_partial_download(mirror, range_server, tmp_path, fraction):
    root, sha = mirror
    url, ranges = range_server
    data = (root / "good" / "openwebtext.tar.xz").read_bytes()
    have = int(len(data) * fraction)
    part = tmp_path / "owt" / "download" / "openwebtext.tar.xz.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(data[:have])
    result = run_script("--out", tmp_path / "owt", "--mirror", f"{url}/good", "--sha256", sha,
                        "--download-only")
    assert result.returncode == 0, result.output
    assert ranges == [f"bytes={have}-"]  # it asked only for the missing bytes
    assert (tmp_path / "owt" / "download" / "openwebtext.tar.xz").read_bytes() == data
    assert not part.exists()
    assert (tmp_path / "owt" / ".done" / "download").is_file()
    assert not (tmp_path / "owt" / ".done" / "extract").exists()


def test_restarts_download_when_server_cannot_resume(mirror, plain_server, tmp_path):
    root, sha = mirror
    data = (root / "good" / "openwebtext.tar.xz").read_bytes()
    part = tmp_path / "owt" / "download" / "openwebtext.tar.xz.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(b"junk" * 10)
    result = run_script("--out", tmp_path / "owt", "--mirror", f"{plain_server}/good",
                        "--sha256", sha, "--download-only")
    assert result.returncode == 0, result.output
    assert "cannot resume" in result.output
    assert (tmp_path / "owt" / "download" / "openwebtext.tar.xz").read_bytes() == data


@pytest.mark.parametrize("tree, checksum, reason", [
    ("corrupt", "good", "SHA-256 is"),
    ("corrupt", "none", "xz integrity test failed"),
    ("truncated", "none", "xz integrity test failed"),
    ("truncated", "default", "expected 12880027468"),
])
def test_corrupt_archive_fails_cleanly(mirror, plain_server, tmp_path, tree, checksum, reason):
    _, sha = mirror
    sha256 = {"good": ["--sha256", sha], "none": ["--sha256", "none"], "default": []}[checksum]
    out = tmp_path / "owt"
    result = run_script("--out", out, "--mirror", f"{plain_server}/{tree}", *sha256)
    assert result.returncode != 0
    part = out / "download" / "openwebtext.tar.xz.part"
    assert f"archive {part} is corrupt" in result.stderr
    assert reason in result.stderr
    assert (out / "download" / "openwebtext.tar.xz.part.bad").is_file()
    assert not (out / "download" / "openwebtext.tar.xz").exists()
    assert not (out / "raw").exists()
    assert not any((out / ".done").iterdir())


def test_wrong_archive_layout_leaves_nothing_extracted(plain_server, tmp_path):
    out = tmp_path / "owt"
    result = run_script("--out", out, "--mirror", f"{plain_server}/wronglayout", "--sha256", "none",
                        "--tokenizer", "sentencepiece")
    assert result.returncode != 0
    assert "does not hold openwebtext/urlsf_subset*_data.xz" in result.stderr
    assert (out / ".done" / "download").is_file()
    assert not (out / ".done" / "extract").exists()
    assert not (out / "raw").exists() and not (out / "raw.tmp").exists()


def test_bad_arguments():
    assert "--out DIR is required" in run_script().stderr
    result = run_script("--out", "/tmp/x", "--tokenizer", "bert")
    assert result.returncode != 0 and "--tokenizer must be gpt2 or sentencepiece" in result.stderr
