"""``SpeechRecognizer``: a fine-tuned ``d2v_ctc`` checkpoint as a transcriber.

    rec = SpeechRecognizer.from_checkpoint("checkpoints/asr/checkpoint_best.pt")
    rec.transcribe(["a.wav", waveform_16khz])   # -> ["HELLO WORLD", ...]

The checkpoint holds all it needs (the encoder's architecture, its audio normalisation and
the letter dictionary are recorded in its model config): neither the pretrained checkpoint
nor the fine-tuning data are read.
"""

from typing import Callable, List, Optional, Sequence, Union

import numpy as np
import torch

from ..data.audio_dataset import read_audio
from .decoding import make_decoder

SAMPLE_RATE = 16_000
Audio = Union[str, np.ndarray, torch.Tensor]


class SpeechRecognizer:
    def __init__(self, model, symbols: Sequence[str], device="cpu", dtype=torch.float32, lm: Optional[str] = None,
                 batch_size: int = 8, **beam_options):
        self.model = model.to(device=device, dtype=dtype).eval()
        self.symbols = list(symbols)
        self.device = torch.device(device)
        self.dtype = dtype
        self.batch_size = batch_size
        self.decode = make_decoder(self.symbols, lm, **beam_options)

    @classmethod
    def from_checkpoint(cls, path: str, device="cpu", dtype=torch.float32, lm: Optional[str] = None, **options):
        """Load a ``d2v_ctc`` checkpoint (or its ``d2v-export --format inference`` directory);
        ``lm``: an ARPA language model for beam search (needs flashlight-text)."""
        from ..predict.finetuned import find_finetuned

        rec = find_finetuned(path)
        name = rec.name if rec is not None else None
        if name != "d2v_ctc":
            raise ValueError(f"{path} is a {name or 'pretraining'!r} model, not a CTC fine-tuned speech model (d2v_ctc)")
        return cls.from_record(rec, device=device, dtype=dtype, lm=lm, **options)

    @classmethod
    def from_record(cls, rec, device="cpu", dtype=torch.float32, lm: Optional[str] = None, **options):
        """From a :class:`d2v_plugin.predict.finetuned.Finetuned` record of a ``d2v_ctc`` model."""
        from ..predict.finetuned import build_model

        model = build_model(rec)
        if not model.cfg.target_symbols:
            raise ValueError(f"{rec.path}: a d2v_ctc model without target_symbols (its letter dictionary)")
        return cls(model, list(model.cfg.target_symbols), device=device, dtype=dtype, lm=lm, **options)

    @staticmethod
    def load_audio(item: Audio) -> torch.Tensor:
        if isinstance(item, str):
            return torch.from_numpy(read_audio(item, SAMPLE_RATE, resample=True))
        wav = torch.as_tensor(np.asarray(item, dtype=np.float32) if not torch.is_tensor(item) else item).float()
        if wav.dim() != 1:
            raise ValueError(f"a waveform must be 1-D (mono, 16 kHz samples), got shape {tuple(wav.shape)}")
        return wav

    @torch.inference_mode()
    def transcribe(self, inputs: Sequence[Audio], progress: Optional[Callable[[int], None]] = None) -> List[str]:
        """Transcripts of ``inputs`` (file paths or 1-D float waveforms at 16 kHz), in order.

        Inputs are batched by length (``batch_size`` per batch); ``progress(n)`` is called
        after each batch with the number of inputs it held.
        """
        if isinstance(inputs, (str, np.ndarray, torch.Tensor)):
            raise TypeError("transcribe takes a list of inputs (paths or waveforms); wrap a single one in a list")
        waves = [self.load_audio(x) for x in inputs]
        order = sorted(range(len(waves)), key=lambda i: -len(waves[i]))
        texts: List[Optional[str]] = [None] * len(waves)
        for start in range(0, len(order), self.batch_size):
            idx = order[start : start + self.batch_size]
            longest = max(len(waves[i]) for i in idx)
            source = torch.zeros(len(idx), longest)
            padding = torch.ones(len(idx), longest, dtype=torch.bool)
            for row, i in enumerate(idx):
                source[row, : len(waves[i])] = waves[i]
                padding[row, : len(waves[i])] = False
            out = self.model(source.to(self.device, self.dtype), padding.to(self.device))
            log_probs = torch.log_softmax(out["logits"].float(), dim=-1)
            for i, text in zip(idx, self.decode(log_probs, self.model.output_lengths(out))):
                texts[i] = text
            if progress is not None:
                progress(len(idx))
        return texts
