"""The untrained baseline of CTC fine-tuning: a pretrained encoder with a fresh CTC head.

    python -m d2v_plugin.asr.baseline PRETRAINED.pt --data DATA [--split valid]

prints the WER and CER of that model on ``DATA/SPLIT.tsv`` (greedy decoding, the same
scoring as the fine-tuning's validation and ``d2v-transcribe``): what fine-tuning has to beat.
"""

import argparse
import sys

import torch


def untrained_recognizer(model_path: str, data: str, seed: int = 1):
    """A :class:`SpeechRecognizer` whose model is built as the first fine-tuning step builds it."""
    from omegaconf import OmegaConf

    from ..models.finetuning.ctc import D2vCtcConfig, D2vCtcModel
    from ..tasks.audio_finetuning import D2vAudioFinetuningConfig, D2vAudioFinetuningTask
    from .recognizer import SpeechRecognizer

    torch.manual_seed(seed)
    task = D2vAudioFinetuningTask.setup_task(D2vAudioFinetuningConfig(data=data, seed=seed))
    cfg = OmegaConf.structured(D2vCtcConfig(model_path=model_path))
    model = D2vCtcModel.build_model(cfg, task)
    return SpeechRecognizer(model, task.target_dictionary.symbols)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m d2v_plugin.asr.baseline", description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", help="the pretrained checkpoint fine-tuning starts from")
    p.add_argument("--data", required=True, help="fine-tuning data directory (SPLIT.tsv, SPLIT.ltr, dict.ltr.txt)")
    p.add_argument("--split", default="valid", help="split to score (default valid)")
    args = p.parse_args(argv)
    from ..criteria.ctc import error_counts
    from .transcribe import manifest_inputs

    paths, refs = manifest_inputs(f"{args.data}/{args.split}.tsv")
    if refs is None:
        p.error(f"no {args.split}.ltr / {args.split}.wrd beside the manifest")
    hyps = untrained_recognizer(args.checkpoint, args.data).transcribe(paths)
    w, wn, c, cn = error_counts(refs, hyps)
    print(f"WER {100.0 * w / max(wn, 1):.3f} CER {100.0 * c / max(cn, 1):.3f} (untrained CTC head on {args.checkpoint})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
