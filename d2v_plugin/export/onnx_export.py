"""ONNX export of a data2vec student encoder, or of a fine-tuned model with its head, checked in onnxruntime.

``export_onnx(checkpoint, out_dir, dtype)`` writes ``out_dir/model.onnx`` (and
``config.json``, the inference config, for reference) with the TorchScript exporter
(``torch.onnx.export(..., dynamo=False)``), then runs the ONNX model in onnxruntime on a
second input of another batch size and length and compares it with PyTorch.

Inputs and outputs of the graph:

- text: ``source`` int64 (B, T) token ids, ``padding_mask`` bool (B, T) (True = pad) ->
  ``last_hidden_state`` (B, T, C); data2vec_text (1.0) takes ``source`` only: like its
  PyTorch model it finds the padding from the pad token (id 1), so the exporter drops the
  unused ``padding_mask`` input (``config.json``'s ``onnx.inputs`` lists the graph's inputs);
- speech: ``source`` float (B, S) 16 kHz waveforms, ``padding_mask`` bool (B, S) ->
  ``last_hidden_state`` (B, T, C), ``padding_mask_out`` bool (B, T) at frame rate;
- images: ``source`` float (B, 3, H, W), H and W fixed to the model's input size ->
  ``last_hidden_state`` (B, N, C) (CLS token removed).

The graph is traced on an example whose last sequence is padded, so it always takes the
models' padded code path (the one that also gives the right result without padding; the
"no padding" shortcuts of the PyTorch code are data-dependent and do not survive tracing).
Every registered architecture exports: data2vec_multi (text, speech with ALiBi, images),
data2vec_text, data2vec_audio, data2vec_vision.

A fine-tuned checkpoint exports encoder and head with the same inputs and the head's outputs:
``logits`` (B, classes) for text / image classification, ``start_logits`` and ``end_logits``
(B, T) for SQuAD (-inf at padding), ``logits`` (B, T, letters) and ``padding_mask_out`` for CTC.

B, T and S are dynamic axes. Outputs at padded positions carry no meaning. ``dtype`` fp16
casts the weights and float inputs (checked within 1e-2); bf16 is refused (onnxruntime's
CPU kernels have none).
"""

import json
import os
from typing import Any, Dict, Tuple

import torch
from torch import nn

from .inference import CONFIG, FORMAT, VERSION, model_config_dict, torch_dtype

OPSET = 17
ONNX_FILE = "model.onnx"
TOLERANCE = 1e-4


class OnnxEncoder(nn.Module):
    """``Encoder`` as a module of plain tensors: ``(source[, padding_mask]) -> (last_hidden_state[, padding_mask])``."""

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder
        self.modality = encoder.modality

    def forward(self, source, padding_mask=None):
        out = self.encoder(source, padding_mask)
        if self.modality == "AUDIO":
            return out.last_hidden_state, out.padding_mask
        return out.last_hidden_state


class OnnxHead(nn.Module):
    """A fine-tuned model (encoder + head) as a module of plain tensors (see :data:`HEAD_OUTPUTS`)."""

    def __init__(self, model: nn.Module, name: str):
        super().__init__()
        self.model = model
        self.name = name

    def forward(self, source, padding_mask=None):
        if self.name == "d2v_image_classification":
            return self.model(source)
        out = self.model(source, padding_mask=padding_mask)
        if self.name == "d2v_ctc":
            return out["logits"], out["padding_mask"]
        if self.name == "d2v_span_qa":
            return out["start_logits"], out["end_logits"]
        return out


# fine-tuning model -> (output names, their dynamic axes beyond the batch)
HEAD_OUTPUTS = {
    "d2v_text_classification": (["logits"], {}),
    "d2v_image_classification": (["logits"], {}),
    "d2v_span_qa": (["start_logits", "end_logits"], {1: "length"}),
    "d2v_ctc": (["logits", "padding_mask_out"], {1: "frames"}),
}


def _head_names(name: str, modality: str):
    inputs, _, axes = _names(modality)
    outputs, extra = HEAD_OUTPUTS[name]
    axes = {k: v for k, v in axes.items() if k in inputs}
    for o in outputs:
        axes[o] = {0: "batch", **extra}
    return inputs, outputs, axes


def compare_outputs(wrapper: nn.Module, session, example) -> float:
    """Max |onnxruntime - PyTorch| over every output, where PyTorch's value is finite
    (padded steps of span logits are -inf); boolean outputs must be equal."""
    with torch.no_grad():
        ref = wrapper(*example)
    ref = ref if isinstance(ref, tuple) else (ref,)
    got = session.run(None, session_feeds(session, example))
    worst = 0.0
    for r, g in zip(ref, got):
        g = torch.from_numpy(g)
        if r.shape != g.shape:
            raise ValueError(f"onnxruntime output shape {tuple(g.shape)} != PyTorch {tuple(r.shape)}")
        if r.dtype == torch.bool:
            if not torch.equal(r, g):
                raise ValueError("onnxruntime's boolean output differs from PyTorch's")
            continue
        finite = torch.isfinite(r)
        if not torch.equal(finite, torch.isfinite(g)):
            raise ValueError("onnxruntime's output is infinite where PyTorch's is not (or the other way)")
        worst = max(worst, (r.float() - g.float()).abs()[finite].max().item())
    return worst


def _image_shape(model) -> Tuple[int, int]:
    from omegaconf import OmegaConf

    cfg = OmegaConf.structured(model.cfg)
    modalities = cfg.get("modalities")
    if modalities is not None:
        return int(modalities.image.in_chans), int(modalities.image.input_size)
    if cfg.get("image_size") is not None:
        return int(cfg.get("in_channels", 3)), int(cfg.image_size)
    raise ValueError(f"{type(model).__name__}: cannot find the image input size in its config")


def _example(model, modality: str, batch: int, length: int, seed: int) -> Tuple[torch.Tensor, ...]:
    """A (source, padding_mask) example: the last sequence shorter than the others."""
    g = torch.Generator().manual_seed(seed)
    if modality == "IMAGE":
        chans, size = _image_shape(model)
        return (torch.randn(batch, chans, size, size, generator=g),)
    if modality == "TEXT":
        vocab = model.modality_encoders["TEXT"].local_encoder.embed_tokens.num_embeddings if hasattr(model, "modality_encoders") else None
        if vocab is None:
            vocab = model.encoder.local_encoder.embed_tokens.num_embeddings
        source = torch.randint(4, vocab, (batch, length), generator=g)
        source[:, 0] = 0  # <s>
        pad = torch.zeros(batch, length, dtype=torch.bool)
        pad[-1, length - length // 4:] = True
        source[pad] = 1
        return source, pad
    source = torch.randn(batch, length, generator=g) * 0.1
    pad = torch.zeros(batch, length, dtype=torch.bool)
    pad[-1, length - length // 4:] = True
    source[pad] = 0.0
    return source, pad


def _names(modality: str):
    if modality == "IMAGE":
        inputs, outputs = ["source"], ["last_hidden_state"]
        axes = {"source": {0: "batch"}, "last_hidden_state": {0: "batch"}}
    elif modality == "TEXT":
        inputs, outputs = ["source", "padding_mask"], ["last_hidden_state"]
        axes = {"source": {0: "batch", 1: "length"}, "padding_mask": {0: "batch", 1: "length"},
                "last_hidden_state": {0: "batch", 1: "length"}}
    else:
        inputs, outputs = ["source", "padding_mask"], ["last_hidden_state", "padding_mask_out"]
        axes = {"source": {0: "batch", 1: "samples"}, "padding_mask": {0: "batch", 1: "samples"},
                "last_hidden_state": {0: "batch", 1: "frames"}, "padding_mask_out": {0: "batch", 1: "frames"}}
    return inputs, outputs, axes


def session_feeds(session, example) -> Dict[str, Any]:
    """onnxruntime feeds for ``(source[, padding_mask])``: only the inputs the graph kept
    (data2vec_text finds padding from the pad token, so its graph has no ``padding_mask``)."""
    names = [i.name for i in session.get_inputs()]
    values = dict(zip(["source", "padding_mask"], example))
    return {n: values[n].numpy() for n in names}


def compare(wrapper: nn.Module, session, example, modality: str) -> float:
    """Max |onnxruntime - PyTorch| at non-padded output positions."""
    with torch.no_grad():
        ref = wrapper(*example)
    ref = ref if isinstance(ref, tuple) else (ref,)
    feeds = session_feeds(session, example)
    got = session.run(None, feeds)
    x_ref, x_got = ref[0].float(), torch.from_numpy(got[0]).float()
    if x_ref.shape != x_got.shape:
        raise ValueError(f"onnxruntime output shape {tuple(x_got.shape)} != PyTorch {tuple(x_ref.shape)}")
    keep = torch.ones(x_ref.shape[:2], dtype=torch.bool)
    if modality == "TEXT":
        keep = ~example[1]
    elif modality == "AUDIO":
        pm_ref, pm_got = ref[1], torch.from_numpy(got[1])
        if not torch.equal(pm_ref, pm_got):
            raise ValueError("onnxruntime output padding mask differs from PyTorch's")
        keep = ~pm_ref
    return (x_ref - x_got).abs()[keep].max().item()


def export_onnx(path: str, out_dir: str, dtype: str = "fp32", opset: int = OPSET, tolerance: float = TOLERANCE) -> Dict[str, Any]:
    """Export the student encoder of checkpoint ``path`` (or an exported inference
    directory) to ``out_dir/model.onnx``; check it in onnxruntime. Returns a summary."""
    import onnxruntime as ort

    from ..checkpoints import load_student
    from ..encoder import Encoder
    from ..models.architectures import architecture_of

    target = torch_dtype(dtype)
    if target == torch.bfloat16:
        raise ValueError(f"{path}: --format onnx --dtype bf16 is not supported: onnxruntime's CPU kernels (Conv, Mul, ...) "
                         "have no bfloat16 implementation; use fp32 or fp16")
    from .inference import _finetuned_record

    finetuned = _finetuned_record(path)
    if finetuned is not None:  # encoder + head
        from ..predict.finetuned import build_model

        head_model = build_model(finetuned)
        model = head_model.encoder
        wrapper = OnnxHead(head_model, finetuned.name).eval()
    else:
        model = load_student(path)
        wrapper = OnnxEncoder(Encoder(model)).eval()
    arch = architecture_of(model)
    modality = model.mode
    if target != torch.float32:
        wrapper = wrapper.to(target)
    os.makedirs(out_dir, exist_ok=True)
    onnx_path = os.path.join(out_dir, ONNX_FILE)
    inputs, outputs, axes = _names(modality) if finetuned is None else _head_names(finetuned.name, modality)
    lengths = {"TEXT": (11, 16), "AUDIO": (5600, 8000), "IMAGE": (0, 0)}[modality]
    example = _example(model, modality, 2, lengths[0], seed=0)
    check = _example(model, modality, 3, lengths[1], seed=1)
    if target != torch.float32:
        example = tuple(t.to(target) if t.is_floating_point() else t for t in example)
        check = tuple(t.to(target) if t.is_floating_point() else t for t in check)
    try:
        with torch.no_grad():
            torch.onnx.export(
                wrapper, example, onnx_path, input_names=inputs, output_names=outputs,
                dynamic_axes=axes, opset_version=opset, dynamo=False, do_constant_folding=True,
            )
    except Exception as e:
        raise ValueError(f"{arch.name} ({modality}) from {path} cannot be exported to ONNX: {type(e).__name__}: {e}") from e
    config = {"format": FORMAT, "version": VERSION, "architecture": arch.name, "modality": modality,
              "dtype": dtype, "model": model_config_dict(model), "onnx": {"file": ONNX_FILE, "opset": opset,
              "inputs": inputs, "outputs": outputs}}
    with open(os.path.join(out_dir, CONFIG), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    session = ort.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])
    max_diff = compare(wrapper, session, check, modality) if finetuned is None else compare_outputs(wrapper, session, check)
    graph_inputs = [i.name for i in session.get_inputs()]
    config["onnx"]["inputs"] = graph_inputs
    with open(os.path.join(out_dir, CONFIG), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    tol = tolerance if target == torch.float32 else 1e-2
    summary = {
        "format": "onnx",
        "checkpoint": path,
        "out_dir": out_dir,
        "architecture": arch.name,
        "modality": modality,
        "dtype": dtype,
        "opset": opset,
        "inputs": graph_inputs,
        "checkpoint_bytes": os.path.getsize(path) if os.path.isfile(path) else None,
        "exported_bytes": os.path.getsize(onnx_path),
        "check_input_shape": list(check[0].shape),
        "max_abs_diff": max_diff,
        "tolerance": tol,
    }
    if finetuned is not None:
        summary["head"] = finetuned.name
        config["finetuned"] = {"name": finetuned.name, "outputs": outputs}
        with open(os.path.join(out_dir, CONFIG), "w") as f:
            json.dump(config, f, indent=2, sort_keys=True)
    if not max_diff <= tol:
        raise ValueError(f"{arch.name} ({modality}): onnxruntime differs from PyTorch by {max_diff:.3g} > {tol:g} on an input of shape {tuple(check[0].shape)}")
    return summary
