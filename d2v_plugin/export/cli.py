"""``d2v-export CHECKPOINT --out DIR --format inference|hf|onnx [--dtype fp32|bf16|fp16]``.

Exports the student encoder of a data2vec checkpoint (1.0 or 2.0, ours or Meta's; teacher and
decoder dropped), or a fine-tuned text model with its head (classification, SQuAD), and prints a summary (JSON with ``--json``). A missing, truncated
or corrupt checkpoint, or one of an unknown model, ends with exit code 2 and a message that
names the file. Checkpoints are read with ``torch.load(weights_only=True)``: nothing in them
is executed.
"""

import argparse
import json
import sys
from typing import Any, Callable, Dict, List, Optional

FORMATS = ("inference", "hf", "onnx")
DTYPES = ("fp32", "bf16", "fp16")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="d2v-export",
        description="Export the student encoder of a data2vec checkpoint (ours or Meta's), or a fine-tuned "
        "text model with its head, for inference.",
    )
    p.add_argument("checkpoint", metavar="CHECKPOINT",
                   help="a data2vec checkpoint (.pt, fairseq format, 1.0 or 2.0, ours or Meta's)")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="output directory (created if missing; files in it are overwritten)")
    p.add_argument("--format", required=True, choices=FORMATS,
                   help="inference: model.safetensors + config.json (+ dict.txt for text), loadable with "
                        "d2v_plugin.load_encoder(DIR); hf: a Hugging Face transformers directory; "
                        "onnx: model.onnx with dynamic batch/length axes, checked in onnxruntime")
    p.add_argument("--dtype", default="fp32", choices=DTYPES,
                   help="dtype of the exported floating-point weights (default: fp32)")
    p.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    return p


def _exporter(fmt: str) -> Callable[[str, str, str], Dict[str, Any]]:
    if fmt == "inference":
        from .inference import export_inference

        return export_inference
    if fmt == "onnx":
        from .onnx_export import export_onnx

        return export_onnx
    try:
        from .hf import export_hf
    except ImportError as e:
        raise RuntimeError(f"--format hf is not available: cannot import d2v_plugin.export.hf.export_hf ({e})") from e
    return export_hf


def _print_summary(summary: Dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(summary, sort_keys=True, default=str))
        return
    print(f"exported {summary.get('checkpoint')} -> {summary.get('out_dir')} ({summary.get('format')})")
    for key, value in summary.items():
        if key in ("checkpoint", "out_dir", "format"):
            continue
        if isinstance(value, float):
            value = f"{value:.4g}"
        print(f"  {key}: {value}")
    ckpt, out = summary.get("checkpoint_bytes"), summary.get("exported_bytes")
    if ckpt and out:
        print(f"  size: {ckpt:,} -> {out:,} bytes ({ckpt / out:.2f}x smaller)")


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        export = _exporter(args.format)
        summary = export(args.checkpoint, args.out, args.dtype)
    except (FileNotFoundError, ValueError, KeyError, RuntimeError) as e:
        msg = str(e)
        if args.checkpoint not in msg:
            msg = f"{args.checkpoint}: {msg}"
        print(f"d2v-export: error: {msg}", file=sys.stderr)
        return 2
    except ImportError as e:  # the optional export extra is not installed
        print(f"d2v-export: error: --format {args.format} needs the Python package {e.name!r}: "
              "pip install 'd2v_plugin[export]' (from a checkout: pip install -e '.[export]')", file=sys.stderr)
        return 2
    _print_summary(summary, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
