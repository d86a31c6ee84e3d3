"""``d2v-extract CHECKPOINT INPUTS... --out DIR``: encoder features of text lines, audio files
or images, written as one ``.npy`` per input (or one ``.safetensors``).

The modality comes from the checkpoint (any that ``d2v_plugin.load_encoder`` reads: 1.0 or
2.0, ours or Meta's, fine-tuned, or an exported inference directory):

- text: each INPUT is a text file, one example per non-blank line (``NAME_00000.npy``, ...);
  lines are encoded with ``--spm`` (a sentencepiece model) or taken as space-separated
  tokens of the dictionary (``--dict``, default: ``dict.txt`` beside the checkpoint), then
  wrapped in ``<s> ... </s>`` as the pretraining task does;
- speech: each INPUT is a 16 kHz mono audio file (soundfile), normalised to zero mean and
  unit variance unless ``--no-normalize``; only files of the same length share a batch, since
  data2vec speech models (Meta's and ours alike) give a padded file other features than the
  file alone (their convolutions see the padding);
- images: each INPUT is an image file, resized and centre-cropped to the model's input size
  and normalised with the ImageNet statistics (the evaluation transform of our image task).

``--layer last`` (default) writes the encoder output (T, C); ``--layer N`` block N's output
(0 = the first block); ``--layer all`` every block's output stacked (L, T, C). Padded steps
are removed; speech features are at frame rate (50 per second).
"""

import argparse
import os
import sys
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np
import torch

LAYERS_HELP = "last (the encoder output, default), N (block N's output, 0 = first) or all (every block, stacked)"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="d2v-extract", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="data2vec checkpoint (ours or Meta's, 1.0 or 2.0) or a d2v-export inference directory")
    p.add_argument("inputs", nargs="+", help="text files (one example per line), audio files or image files, by modality")
    p.add_argument("--out", required=True, help="output directory (created)")
    p.add_argument("--layer", default="last", help=LAYERS_HELP)
    p.add_argument("--format", choices=("npy", "safetensors"), default="npy",
                   help="npy: one NAME.npy per input; safetensors: one features.safetensors keyed by NAME")
    p.add_argument("--batch-size", type=int, default=8, help="inputs per forward pass")
    p.add_argument("--dict", help="text: the fairseq dict.txt of the model (default: dict.txt beside the checkpoint)")
    p.add_argument("--spm", help="text: sentencepiece model to encode the lines with (default: lines are space-separated tokens)")
    p.add_argument("--no-normalize", action="store_true", help="speech: feed the waveforms as they are (default: zero mean, unit variance per file)")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cuda")
    return p


class ExtractError(ValueError):
    """A bad input or setting; the message names it."""


def _text_items(args, encoder) -> List[Tuple[str, torch.Tensor]]:
    from ..tasks._common import load_text_dictionary

    dict_path = args.dict or _beside(args.checkpoint, "dict.txt")
    if dict_path is None or not os.path.isfile(dict_path):
        raise ExtractError(f"text needs the model's dictionary: pass --dict (no dict.txt beside {args.checkpoint})")
    dictionary = load_text_dictionary(dict_path)
    encode = str.split
    if args.spm:
        import sentencepiece as spm

        sp = spm.SentencePieceProcessor(model_file=args.spm)
        encode = lambda line: sp.encode(line, out_type=str)  # noqa: E731
    limit = encoder.model.max_positions()
    items = []
    for path in args.inputs:
        _check_file(path)
        try:
            lines = Path(path).read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError:
            raise ExtractError(f"{path}: not a UTF-8 text file (this checkpoint is a text model)") from None
        for i, line in enumerate(l for l in lines if l.strip()):
            ids = [dictionary.bos()] + [dictionary.index(t) for t in encode(line.strip())] + [dictionary.eos()]
            if limit is not None and len(ids) > limit:
                raise ExtractError(f"{path}: line {i + 1} has {len(ids)} tokens with <s> and </s>; the model knows {limit} positions")
            items.append((f"{Path(path).stem}_{i:05d}", torch.tensor(ids)))
    return items


def _audio_items(args) -> List[Tuple[str, torch.Tensor]]:
    from ..data.audio_dataset import AudioFileError, read_audio

    items = []
    for path in args.inputs:
        _check_file(path)
        try:
            wav = torch.from_numpy(read_audio(path, 16000))
        except AudioFileError as e:
            raise ExtractError(f"{e} (this checkpoint is a speech model: 16 kHz mono audio files)") from None
        if not args.no_normalize:
            wav = (wav - wav.mean()) / torch.sqrt(wav.var(unbiased=False) + 1e-5)
        items.append((Path(path).stem, wav))
    return items


def _image_items(args, encoder) -> List[Tuple[str, torch.Tensor]]:
    from ..data.image_dataset import ImageDataError, eval_transform, load_rgb

    cfg = encoder.cfg
    size = cfg.image_size if hasattr(cfg, "image_size") else cfg.modalities.image.input_size
    transform = eval_transform(size)
    items = []
    for path in args.inputs:
        _check_file(path)
        try:
            items.append((Path(path).stem, transform(load_rgb(path))))
        except ImageDataError as e:
            raise ExtractError(f"{e} (this checkpoint is an image model)") from None
    return items


def _check_file(path: str) -> None:
    if not os.path.isfile(path):
        raise ExtractError(f"{path}: no such file")


def _beside(checkpoint: str, name: str):
    folder = checkpoint if os.path.isdir(checkpoint) else os.path.dirname(os.path.abspath(checkpoint))
    path = os.path.join(folder, name)
    return path if os.path.isfile(path) else None


def pad_batch(tensors: List[torch.Tensor], modality: str, pad) -> Tuple[torch.Tensor, "torch.Tensor | None"]:
    """Encoder inputs as one batch: images stacked; token ids / waveforms right-padded with
    ``pad``, with their padding mask (True = padded; None when nothing is padded)."""
    if modality == "IMAGE":
        return torch.stack(tensors), None
    lengths = torch.tensor([len(t) for t in tensors])
    x = torch.full((len(tensors), int(lengths.max())), pad, dtype=tensors[0].dtype)
    for i, t in enumerate(tensors):
        x[i, : len(t)] = t
    padding = torch.arange(x.size(1))[None, :] >= lengths[:, None]
    return x, (padding if padding.any() else None)


def _batches(items, size: int, same_length: bool) -> List[list]:
    """Consecutive chunks of ``size`` items (``same_length``: of items of one length each)."""
    groups: Dict[int, list] = {}
    for item in items:
        groups.setdefault(len(item[1]) if same_length else 0, []).append(item)
    return [g[i:i + size] for g in groups.values() for i in range(0, len(g), size)]


def _select(out, layer: str) -> torch.Tensor:
    if layer == "last":
        return out.last_hidden_state
    if layer == "all":
        return torch.stack(out.hidden_states, dim=1)  # (B, L, T, C)
    n = int(layer)
    if not -len(out.hidden_states) <= n < len(out.hidden_states):
        raise ExtractError(f"--layer {n}: the model has {len(out.hidden_states)} blocks (0..{len(out.hidden_states) - 1})")
    return out.hidden_states[n]


def extract(args) -> Dict[str, np.ndarray]:
    import d2v_plugin
    from tqdm import tqdm

    if args.layer not in ("last", "all") and not args.layer.lstrip("-").isdigit():
        raise ExtractError(f"--layer {args.layer!r}: expected {LAYERS_HELP}")
    encoder = d2v_plugin.load_encoder(args.checkpoint).to(args.device)
    modality = encoder.modality
    if modality == "TEXT":
        items, pad = _text_items(args, encoder), 1
    elif modality == "AUDIO":
        items, pad = _audio_items(args), 0.0
    else:
        items, pad = _image_items(args, encoder), 0.0
    if not items:
        raise ExtractError("no inputs: the text files hold no non-blank line")
    features = {}
    with torch.no_grad():
        for chunk in tqdm(_batches(items, args.batch_size, same_length=modality == "AUDIO"), desc="d2v-extract", unit="batch", file=sys.stderr):
            x, padding = pad_batch([t for _, t in chunk], modality, pad)
            out = encoder(x.to(args.device), None if padding is None else padding.to(args.device), output_hidden_states=args.layer != "last")
            y = _select(out, args.layer).float().cpu()
            pm = out.padding_mask.cpu() if out.padding_mask is not None else None
            for i, (name, _) in enumerate(chunk):
                keep = slice(None) if pm is None else ~pm[i]
                features[name] = (y[i][:, keep] if args.layer == "all" else y[i][keep]).numpy()
    return features


def write(features: Dict[str, np.ndarray], out: str, fmt: str) -> List[str]:
    os.makedirs(out, exist_ok=True)
    if fmt == "safetensors":
        from safetensors.numpy import save_file

        path = os.path.join(out, "features.safetensors")
        save_file({k: np.ascontiguousarray(v) for k, v in features.items()}, path)
        return [path]
    paths = []
    for name, value in features.items():
        paths.append(os.path.join(out, f"{name}.npy"))
        np.save(paths[-1], value)
    return paths


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    try:
        features = extract(args)
        paths = write(features, args.out, args.format)
    except (ExtractError, ValueError, FileNotFoundError) as e:
        print(f"d2v-extract: error: {e}", file=sys.stderr)
        return 2
    except ImportError as e:  # --format safetensors without the optional export extra
        print(f"d2v-extract: error: needs the Python package {e.name!r}: pip install 'd2v_plugin[export]' "
              "(from a checkout: pip install -e '.[export]')", file=sys.stderr)
        return 2
    first = next(iter(features.values()))
    print(f"d2v-extract: {len(features)} inputs -> {args.out} ({len(paths)} file(s); e.g. {next(iter(features))}: shape {tuple(first.shape)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
