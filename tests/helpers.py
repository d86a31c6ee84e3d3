"""Shared test utilities: run the real fairseq entry points and read their logs."""

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Dict, List

import pytest

REPO = Path(__file__).resolve().parents[1]
CONFIG_DIR = REPO / "config"
SHARED_COMPAT = REPO.parent / "shared" / "compat"
BIN = Path(sys.executable).parent


def env() -> Dict[str, str]:
    """Environment for subprocesses: the venv's bin first on PATH, quiet warnings, 1 thread each,
    and the quick starts' closing plot + probe off (tests/test_image.py runs them once)."""
    e = dict(os.environ)
    e["PATH"] = f"{BIN}{os.pathsep}{e.get('PATH', '')}"
    e.setdefault("PYTHONWARNINGS", "ignore")
    e.setdefault("OMP_NUM_THREADS", "1")
    e.setdefault("D2V_QUICK_START_CHECKS", "0")
    return e


def run(cmd: List[str], cwd=None, timeout: int = 600, check: bool = True) -> subprocess.CompletedProcess:
    """Run a command; on unexpected failure, fail the test showing the end of its output."""
    proc = subprocess.run(
        [str(c) for c in cmd], cwd=cwd, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout
    )
    if check and proc.returncode != 0:
        pytest.fail(f"command failed ({proc.returncode}): {' '.join(map(str, cmd))}\n{proc.stdout[-6000:]}")
    return proc


def hydra_train(config_name: str, *overrides: str, cwd=None, timeout: int = 600, check: bool = True) -> subprocess.CompletedProcess:
    """``fairseq-hydra-train --config-dir config --config-name NAME overrides...``."""
    return run(
        [BIN / "fairseq-hydra-train", "--config-dir", CONFIG_DIR, "--config-name", config_name, *overrides],
        cwd=cwd,
        timeout=timeout,
        check=check,
    )


_KV = re.compile(r"(\w+)=([-+0-9.eE]+|nan|inf)")


def train_log(output: str, tag: str = "train_inner") -> List[Dict[str, float]]:
    """Parse fairseq 'simple' log lines into dicts: ``[train_inner] ... key=value, ...``
    (fairseq-hydra-train) or ``| train_inner | ... key=value`` (fairseq-train)."""
    rows = []
    for line in output.splitlines():
        if f"[{tag}]" in line or f"| {tag} |" in line:
            rows.append({k: float(v) for k, v in _KV.findall(line)})
    return rows


def compat_dir() -> Path:
    if not SHARED_COMPAT.is_dir():
        pytest.skip(f"official-format checkpoints not found at {SHARED_COMPAT} (../shared/compat beside the checkout)")
    return SHARED_COMPAT


def write_tiny_gpt2(d: Path) -> Path:
    """Byte-level GPT-2 BPE files with three merges, in fairseq's file formats, written into
    the directory ``d`` (created): encoder.json, vocab.bpe and dict.txt. Returns ``d``."""
    import json

    from fairseq.data.encoders.gpt2_bpe_utils import bytes_to_unicode

    d.mkdir(parents=True, exist_ok=True)
    merges = [("Ġ", "t"), ("h", "e"), ("Ġt", "he")]
    symbols = list(bytes_to_unicode().values()) + ["".join(m) for m in merges]
    (d / "encoder.json").write_text(json.dumps({s: i for i, s in enumerate(symbols)}))
    (d / "vocab.bpe").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges),
                                 encoding="utf-8")
    # fairseq's dict.txt lists BPE ids by frequency, not in id order
    (d / "dict.txt").write_text("".join(f"{i} {i + 1}\n" for i in reversed(range(len(symbols)))))
    return d


def assert_same_student_and_teacher(resumed, reference, atol: float = 1e-5, rtol: float = 1e-5) -> None:
    """Every student tensor and every EMA teacher tensor (``_ema``) of ``reference`` (a model
    state dict) equals ``resumed``'s within the tolerances."""
    import torch

    for name, value in reference.items():
        if name == "_ema":
            for k, v in value.items():
                torch.testing.assert_close(resumed["_ema"][k], v, atol=atol, rtol=rtol, msg=f"teacher {k}")
        else:
            torch.testing.assert_close(resumed[name], value, atol=atol, rtol=rtol, msg=f"student {name}")
