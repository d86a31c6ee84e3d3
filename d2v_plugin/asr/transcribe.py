"""``d2v-transcribe``: transcribe speech with a CTC fine-tuned data2vec checkpoint.

    d2v-transcribe CHECKPOINT a.wav b.flac            # one "path<TAB>transcript" line each
    d2v-transcribe CHECKPOINT --manifest DATA/valid.tsv [--lm LM.arpa] [--out hyp.tsv]

With ``--manifest`` the references beside it (``valid.ltr``, else ``valid.wrd``) are scored:
WER and CER (jiwer; the edit counts summed over all files, as the validation of fine-tuning
logs them) are printed at the end.
"""

import argparse
import os
import sys

import torch
from tqdm import tqdm

from ..data.audio_dataset import read_manifest
from .decoding import ltr_to_text

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="d2v-transcribe", description="Transcribe 16 kHz speech with a d2v_ctc checkpoint.")
    p.add_argument("checkpoint", help="fine-tuned checkpoint (checkpoint_best.pt of a d2v_ctc run)")
    p.add_argument("audio", nargs="*", help="audio files (mono; resampled to 16 kHz if needed)")
    p.add_argument("--manifest", help="a manifest (SPLIT.tsv) to transcribe instead of AUDIO; SPLIT.ltr / SPLIT.wrd beside it are the references")
    p.add_argument("--lm", help="ARPA n-gram language model for beam search (needs flashlight-text: pip install flashlight-text)")
    p.add_argument("--beam", type=int, default=50, help="beam size with --lm (default 50)")
    p.add_argument("--lm-weight", type=float, default=2.0, help="language model weight with --lm (default 2.0)")
    p.add_argument("--word-score", type=float, default=-1.0, help="score added per word with --lm (default -1.0)")
    p.add_argument("--out", help="write 'path<TAB>transcript' lines here instead of stdout")
    p.add_argument("--batch-size", type=int, default=8, help="files per forward pass (default 8)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device (default: cuda if available)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="model precision (default float32)")
    args = p.parse_args(argv)
    if bool(args.audio) == bool(args.manifest):
        p.error("give either audio files or --manifest TSV")
    if args.batch_size < 1:
        p.error("--batch-size must be positive")
    return args


def manifest_inputs(manifest: str):
    """(paths, references or None) of a manifest; references from SPLIT.ltr, else SPLIT.wrd."""
    root, rows = read_manifest(manifest)
    paths = [os.path.join(root, r.path) for r in rows]
    stem = os.path.splitext(manifest)[0]
    for ext, convert in ((".ltr", ltr_to_text), (".wrd", lambda s: " ".join(s.split()))):
        if os.path.isfile(stem + ext):
            with open(stem + ext, encoding="utf-8") as f:
                refs = [convert(line) for line in f]
            if len(refs) != len(paths):
                raise ValueError(f"{stem + ext} has {len(refs)} lines but {manifest} lists {len(paths)} files")
            return paths, refs
    return paths, None


def main(argv=None):
    args = parse_args(argv)
    from ..criteria.ctc import error_counts
    from .recognizer import SpeechRecognizer

    try:
        if args.manifest:
            paths, refs = manifest_inputs(args.manifest)
        else:
            paths, refs = list(args.audio), None
        beam = dict(beam=args.beam, lm_weight=args.lm_weight, word_score=args.word_score) if args.lm else {}
        rec = SpeechRecognizer.from_checkpoint(args.checkpoint, device=args.device, dtype=DTYPES[args.dtype], lm=args.lm,
                                               batch_size=args.batch_size, **beam)
        with tqdm(total=len(paths), unit="file", desc="transcribing", file=sys.stderr) as bar:
            hyps = rec.transcribe(paths, progress=bar.update)
    except (ValueError, FileNotFoundError, ImportError, OSError) as e:
        print(f"d2v-transcribe: error: {e}", file=sys.stderr)
        return 1
    out = open(args.out, "w", encoding="utf-8") if args.out else sys.stdout
    try:
        for path, text in zip(paths, hyps):
            out.write(f"{path}\t{text}\n")
    finally:
        if args.out:
            out.close()
    if refs is not None:
        w_err, w_total, c_err, c_total = error_counts(refs, hyps)
        print(f"WER {100.0 * w_err / max(w_total, 1):.3f} ({w_err} errors / {w_total} words)  "
              f"CER {100.0 * c_err / max(c_total, 1):.3f} ({c_err} / {c_total} characters)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
