#!/usr/bin/env python3
"""Model FLOPs of one data2vec 2.0 training update, from a config.

Counts the multiply-adds of every matrix product and convolution (2 FLOPs each), as
``torch.utils.flop_counter.FlopCounterMode`` does, for the computation data2vec 2.0 does
in one update of ``batch`` samples:

- student: the modality encoder (image patch embedding; speech conv feature extractor,
  projection, convolutional positional encoder), then the prenet and shared blocks on the
  *visible* positions of each of the ``clone_batch`` copies, and the decoder on every
  position of each copy; backward = 2 x forward (input layers whose input needs no
  gradient: 1 x, the weight gradient only);
- teacher (EMA, forward only): the prenet and shared blocks on the *full* input of each
  sample once (its own patch embedding / positional convolutions when it has them).

Norms, activations, softmax, the loss and the optimizer are not counted (they are
memory-bound and small). A transformer block on ``n`` tokens of width ``D`` costs
``2 n D^2 (4 + 2 mlp_ratio)`` in its linear layers plus ``4 n^2 D`` in attention.

Example::

    python benchmarks/flops.py config/pretraining/text_base.yaml
    python benchmarks/flops.py benchmarks/configs/audio_parity.yaml --clip-samples 24000 -- dataset.max_tokens=64000

MFU (model FLOPs utilisation) = FLOPs per update x updates/s / the hardware's peak;
``benchmarks/throughput.py --peak-tflops`` (or ``--gpu``) prints it.
"""

import argparse
import os
import sys
from typing import Dict, List, Optional, Sequence

# dense bf16 peak TFLOP/s (without sparsity) of GPUs one may run the benchmark on
PEAK_TFLOPS = {
    "H200": 989.0,
    "H100": 989.0,  # SXM; the PCIe card is 756
    "A100": 312.0,
    "L40S": 362.0,
    "A10G": 125.0,
    "RTX 4090": 165.0,
    "V100": 125.0,  # fp16 tensor cores (no bf16)
}


def peak_tflops_for(device_name: str) -> Optional[float]:
    """The table's peak for a CUDA device name such as ``NVIDIA H200`` (None if unknown)."""
    name = device_name.upper()
    for key, value in PEAK_TFLOPS.items():
        if key.upper() in name:
            return value
    return None


def block_flops(n: int, dim: int, mlp_ratio: float) -> float:
    """Forward FLOPs of one pre/post-LN transformer block on one sequence of ``n`` tokens."""
    linear = 2 * n * dim * dim * (4 + 2 * mlp_ratio)  # qkv (3), output projection (1), mlp (2 x ratio)
    attention = 4 * n * n * dim  # q k^T and attn v
    return linear + attention


def conv_flops(out_positions: int, c_in: int, c_out: int, kernel_elems: int, groups: int = 1) -> float:
    return 2 * out_positions * c_out * (c_in // groups) * kernel_elems


def conv_frames(samples: int, layers: Sequence) -> List[int]:
    """Output length of each (channels, kernel, stride) layer of an unpadded conv stack."""
    out = []
    for _, k, s in layers:
        samples = (samples - k) // s + 1
        out.append(samples)
    return out


def _decoder_flops(dec, embed_dim: int, positions: int, dims: int) -> float:
    k = dec.decoder_kernel ** dims
    total = 0.0
    for i in range(dec.decoder_layers):
        c_in = embed_dim if i == 0 else dec.decoder_dim
        total += conv_flops(positions, c_in, dec.decoder_dim, k, dec.decoder_groups)
    dim = dec.decoder_dim
    for i in range(dec.projection_layers - 1):
        nxt = int(dim * dec.projection_ratio) if i == 0 else dim
        total += 2 * positions * dim * nxt
        dim = nxt
    return total + 2 * positions * dim * embed_dim


def update_flops(cfg, modality: str, batch: float, length: int, masked_fraction: Optional[float] = None) -> Dict[str, float]:
    """FLOPs of one training update, by part (and ``total``).

    ``cfg``: the model config (``Data2VecMultiConfig`` or an OmegaConf node with its fields);
    ``modality``: text, audio or image; ``batch``: samples per update (may be fractional,
    an average); ``length``: tokens per sample (text) or samples per clip (audio), ignored
    for images; ``masked_fraction``: share of the positions hidden from the student (default:
    the modality's ``mask_prob``; pass the logged ``masked_pct`` for the exact value).
    """
    mcfg = getattr(cfg.modalities, modality)
    D, r = cfg.embed_dim, cfg.mlp_ratio
    P, L, C = mcfg.prenet_depth, cfg.depth, cfg.clone_batch
    extra = 0
    student_local = teacher_local = 0.0  # per sample
    student_rows_local = teacher_rows_local = 0.0  # per cloned row (student) / per sample (teacher)
    dims = 1
    if modality == "text":
        T = int(length)
    elif modality == "image":
        grid = mcfg.input_size // mcfg.patch_size
        T, dims = grid * grid, 2
        extra = mcfg.num_extra_tokens
        de = mcfg.embed_dim
        patch = conv_flops(T, mcfg.in_chans, de, mcfg.patch_size ** 2) + (2 * T * de * D if de != D else 0)
        student_local = 2 * patch  # forward + weight gradient (the pixels need no gradient)
        if not cfg.ema_encoder_only and mcfg.ema_local_encoder:
            teacher_local = patch
    elif modality == "audio":
        from d2v_plugin.models.modalities.audio import parse_conv_spec

        layers = parse_conv_spec(mcfg.feature_encoder_spec)
        frames = conv_frames(int(length), layers)
        T = frames[-1]
        c_in, extractor = 1, 0.0
        for i, ((c_out, k, _), n) in enumerate(zip(layers, frames)):
            f = conv_flops(n, c_in, c_out, k)
            extractor += f * (2 if i == 0 else 3)
            c_in = c_out
        student_local = extractor + 3 * 2 * T * c_in * D  # + LayerNorm/Linear projection
        if mcfg.conv_pos_depth > 0:
            k = max(3, mcfg.conv_pos_width // mcfg.conv_pos_depth)
            pos = mcfg.conv_pos_depth * conv_flops(T, D, D, k, mcfg.conv_pos_groups)
            student_rows_local = 3 * pos  # on every (masked) position of every copy
            if not cfg.ema_encoder_only:
                teacher_rows_local = pos
    else:
        raise ValueError(f"unknown modality {modality!r} (text, audio or image)")
    if masked_fraction is None:
        masked_fraction = mcfg.mask_prob
    visible = max(1, round(T * (1 - masked_fraction)))
    student_blocks = 3 * C * (P + L) * block_flops(visible + extra, D, r)
    decoder = 3 * C * _decoder_flops(mcfg.decoder, D, T, dims)
    teacher_blocks = (P + L) * block_flops(T + extra, D, r)
    parts = {
        "student_modality_encoder": batch * (student_local + C * student_rows_local),
        "student_blocks": batch * student_blocks,
        "decoder": batch * decoder,
        "teacher_modality_encoder": batch * (teacher_local + teacher_rows_local),
        "teacher_blocks": batch * teacher_blocks,
    }
    parts["total"] = sum(parts.values())
    parts["positions"], parts["visible"] = T, visible
    return parts


def model_config(path: str, overrides: Sequence[str] = ()):
    """The ``model`` section of a config file with ``model.*`` overrides, over this plugin's
    defaults (``Data2VecMultiConfig``), and the whole file as an OmegaConf node."""
    from omegaconf import OmegaConf

    from d2v_plugin import checkpoints
    from d2v_plugin.models.data2vec2 import Data2VecMultiConfig

    raw = OmegaConf.load(path)
    if overrides:
        raw = OmegaConf.merge(raw, OmegaConf.from_dotlist([o for o in overrides if "=" in o and not o.startswith("+")]))
    if "model" not in raw:
        raise ValueError(f"{path}: no model section")
    values = OmegaConf.to_container(raw.model, resolve=True)
    values.setdefault("seed", raw.get("common", {}).get("seed", 1))
    return checkpoints.model_config(values, Data2VecMultiConfig), raw


def config_modality(raw) -> str:
    name = str(raw.model.get("supported_modality", "")).lower()
    if name not in ("text", "audio", "image"):
        raise ValueError(f"model.supported_modality is {name!r}: FLOPs are counted for data2vec_multi TEXT, AUDIO or IMAGE")
    return name


def config_flops(path: str, overrides: Sequence[str] = (), clip_samples: Optional[int] = None,
                 batch: Optional[float] = None, masked_fraction: Optional[float] = None) -> Dict[str, float]:
    """:func:`update_flops` for a config file: the batch is ``dataset.batch_size`` (speech:
    ``dataset.max_tokens // clip_samples`` unless ``batch`` is given)."""
    cfg, raw = model_config(path, overrides)
    modality = config_modality(raw)
    dataset = raw.get("dataset", {})
    if modality == "audio":
        if not clip_samples:
            raise ValueError("speech: give the samples per clip (clip_samples / --clip-samples)")
        length = clip_samples
        if batch is None:
            batch = max(1, int(dataset.get("max_tokens")) // clip_samples)
    else:
        length = int(raw.task.get("tokens_per_sample", 0)) if modality == "text" else 0
        if batch is None:
            batch = int(dataset.get("batch_size"))
    return update_flops(cfg, modality, batch, length, masked_fraction)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="a data2vec_multi pretraining config (yaml), e.g. config/pretraining/text_base.yaml")
    p.add_argument("--clip-samples", type=int, help="speech: samples per clip (the batch is dataset.max_tokens // this)")
    p.add_argument("--batch", type=float, help="samples per update (default: dataset.batch_size, speech: see --clip-samples)")
    p.add_argument("--masked-fraction", type=float, help="share of positions hidden from the student (default: the modality's mask_prob)")
    p.add_argument("overrides", nargs="*", help="model./task./dataset. overrides (key=value), after `--`")
    args = p.parse_args(argv)
    parts = config_flops(args.config, args.overrides, args.clip_samples, args.batch, args.masked_fraction)
    print(f"{args.config}: {parts['positions']} positions per sample, {parts['visible']} visible to the student")
    for k, v in parts.items():
        if k not in ("positions", "visible"):
            print(f"  {k:<26} {v / 1e9:12.3f} GFLOP")
    return parts


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    main()
