"""Waveforms of a manifest with their letter transcripts (``SPLIT.ltr``), for CTC fine-tuning.

Line ``i`` of ``SPLIT.ltr`` transcribes row ``i`` of ``SPLIT.tsv`` (wav2vec 2.0's layout,
what ``datasets/librispeech/prepare.sh`` writes). Because a transcript is tied to its file
only by that position, the labels are checked before training: as many lines as manifest
rows, every symbol in the dictionary, and every row's ``num_samples`` equal to its file's
length (a mismatch means the manifest was written for other files, so the transcripts may
be too). Batches are padded, never cropped: a cropped file would lose part of its transcript.
"""

from typing import List

import torch
from fairseq.data import AddTargetDataset, Dictionary

from .audio_dataset import AudioManifestDataset, read_manifest


class LabelError(ValueError):
    """Transcripts that do not fit their manifest or dictionary."""


def read_labels(path: str, dictionary: Dictionary, dict_path: str = "the dictionary") -> List[str]:
    """Every line of ``path``, checked: unknown symbols raise a LabelError naming them."""
    labels, unknown = [], {}
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            for s in line.split():
                if dictionary.index(s) == dictionary.unk() and s != dictionary.unk_word:
                    unknown.setdefault(s, number)
            labels.append(line.strip())
    if unknown:
        shown = ", ".join(f"{s!r} (first on line {n})" for s, n in list(unknown.items())[:10])
        raise LabelError(f"{path}: {len(unknown)} symbol(s) missing from {dict_path}: {shown}. "
                         f"Add them to the dictionary or clean the transcripts")
    return labels


def labelled_audio_dataset(manifest: str, labels_path: str, dictionary: Dictionary, dict_path: str = "the dictionary",
                           **audio_kwargs) -> AddTargetDataset:
    """An ``AddTargetDataset`` of ``AudioManifestDataset(manifest, pad=True, **audio_kwargs)``
    whose ``target`` (B, L) / ``target_lengths`` (B) are the letters of ``labels_path``."""
    _, rows = read_manifest(manifest)
    labels = read_labels(labels_path, dictionary, dict_path)
    if len(labels) != len(rows):
        raise LabelError(f"{labels_path} has {len(labels)} transcripts but {manifest} lists {len(rows)} files: "
                         f"line i of the labels must transcribe row i of the manifest")
    audio_kwargs = dict(audio_kwargs, pad=True, max_sample_size=None)
    audio = AudioManifestDataset(manifest, **audio_kwargs)
    declared = {r.line: r.num_samples for r in rows}
    if audio_kwargs.get("check_files", True):
        wrong = [r for r in audio.rows if declared[r.line] != r.num_samples]
        if wrong:
            r = wrong[0]
            raise LabelError(
                f"{manifest} line {r.line}: {r.path} has {r.num_samples} samples but the manifest says {declared[r.line]} "
                f"({len(wrong)} such row(s)); the manifest was not written for these files, so its transcripts "
                f"may not be theirs either. Write the manifest and labels again (datasets/librispeech/prepare.sh)"
            )
    position = {r.line: i for i, r in enumerate(rows)}
    kept = [labels[position[r.line]].encode("utf-8") for r in audio.rows]  # AddTargetDataset stores bytes

    def encode(line: str) -> torch.Tensor:
        return dictionary.encode_line(line, append_eos=False, add_if_not_exist=False).long()

    return AddTargetDataset(audio, kept, pad=dictionary.pad(), eos=dictionary.eos(), batch_targets=True,
                            process_label=encode, label_len_fn=lambda line: len(line.split()), add_to_input=False)

