"""Raw-audio datasets read from wav2vec-style manifests with soundfile.

A manifest (``train.tsv``) holds the root directory on its first line, then one row per
file: ``relative/path<TAB>num_samples``. Files must be mono at the task's sample rate
(16 kHz for data2vec); anything else is reported naming the file and its manifest row.
"""

import logging
import math
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import List, Optional, Tuple

import numpy as np
import soundfile as sf
import torch
import torch.nn.functional as F
from fairseq.data import FairseqDataset

logger = logging.getLogger(__name__)


def _prepare_soundfile() -> None:
    """Use every soundfile path this module takes once, in the importing thread.

    soundfile's cffi bindings set up each C function and type on first use; two threads
    doing that at once can abort the process (cffi's ``realize_c_type`` assertion, seen as a
    rare crash of a training run whose data threads read audio). Opening, reading and
    failing to open a file here leaves nothing to set up later."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        for ext in ("wav", "flac"):
            path = os.path.join(tmp, f"warm.{ext}")
            sf.write(path, np.zeros(16, dtype=np.float32), 16000)
            with sf.SoundFile(path) as f:
                f.frames, f.samplerate, f.channels
                f.read(dtype="float32", always_2d=False)
        bad = os.path.join(tmp, "bad.wav")
        with open(bad, "wb") as f:
            f.write(b"not audio")
        try:
            sf.SoundFile(bad).close()
        except Exception:
            pass


_prepare_soundfile()


class AudioFileError(ValueError):
    """A file listed in a manifest cannot be used."""


class UnreadableAudioError(AudioFileError):
    """Missing, corrupt or empty: ``skip_unreadable`` may skip it."""


class AudioFormatError(AudioFileError):
    """Readable but in the wrong format (channels, sample rate): always an error."""


@dataclass
class ManifestRow:
    path: str  # relative to the manifest's root
    num_samples: int
    line: int  # 1-based line number in the manifest


class ManifestRows(Sequence):
    """Manifest rows kept as three numpy arrays (paths as UTF-8 bytes, sample counts, line
    numbers) instead of one Python object per row: a manifest of millions of files costs tens
    of bytes per row, and forked data-loader workers share these pages instead of copying them
    as they touch per-row objects' reference counts over an epoch. Indexing gives a ManifestRow.
    """

    def __init__(self, rows: Sequence[ManifestRow]):
        self.paths = np.array([r.path.encode("utf-8") for r in rows], dtype=bytes)
        self.num_samples = np.array([r.num_samples for r in rows], dtype=np.int64)
        self.lines = np.array([r.line for r in rows], dtype=np.int64)

    def __len__(self) -> int:
        return len(self.lines)

    def __getitem__(self, index) -> ManifestRow:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        return ManifestRow(self.paths[index].decode("utf-8"), int(self.num_samples[index]), int(self.lines[index]))


def read_manifest(manifest: str) -> Tuple[str, List[ManifestRow]]:
    """Parse a manifest; malformed rows raise a ValueError naming the file and line."""
    if not os.path.isfile(manifest):
        raise FileNotFoundError(f"manifest {manifest} does not exist")
    rows = []
    with open(manifest, encoding="utf-8") as f:
        root = f.readline().rstrip("\n")
        if not root.strip():
            raise ValueError(f"{manifest} line 1: expected the root directory of the audio files, got an empty line")
        for number, line in enumerate(f, start=2):
            line = line.rstrip("\n")
            if not line.strip():
                continue
            parts = line.split("\t")
            if len(parts) != 2 or not parts[1].strip().isdigit():
                raise ValueError(f"{manifest} line {number}: expected 'relative/path<TAB>num_samples', got {line!r}")
            rows.append(ManifestRow(parts[0], int(parts[1]), number))
    return root.strip(), rows


def _resample_ratio(rate: int, target: int) -> Tuple[int, int]:
    g = math.gcd(rate, target)
    return target // g, rate // g


def audio_length(path: str, sample_rate: int, resample: bool = False) -> int:
    """Samples of ``path`` at ``sample_rate``, from its header only; raises AudioFileError."""
    if not os.path.isfile(path):
        raise UnreadableAudioError(f"{path}: file does not exist")
    try:
        with sf.SoundFile(path) as f:
            frames, rate, channels = f.frames, f.samplerate, f.channels
    except Exception as e:  # libsndfile's errors: unknown format, truncated header, ...
        size = os.path.getsize(path)
        what = "empty file (0 bytes)" if size == 0 else f"not a readable audio file ({e})"
        raise UnreadableAudioError(f"{path}: {what}") from None
    _check_format(path, channels, rate, sample_rate, resample)
    if frames <= 0:
        raise UnreadableAudioError(f"{path}: empty audio (0 samples)")
    if rate != sample_rate:
        up, down = _resample_ratio(rate, sample_rate)
        return math.ceil(frames * up / down)
    return int(frames)


def _check_format(path, channels, rate, sample_rate, resample):
    if channels != 1:
        raise AudioFormatError(
            f"{path}: {channels} channels; data2vec expects mono audio. Mix it down first "
            f"(e.g. `sox IN -c 1 OUT` or `ffmpeg -i IN -ac 1 OUT`)"
        )
    if rate != sample_rate and not resample:
        raise AudioFormatError(
            f"{path}: sample rate {rate} Hz, the task expects {sample_rate} Hz (task.sample_rate). "
            f"Convert the file (e.g. `sox IN -r {sample_rate} OUT`) or set task.resample=true to resample on the fly"
        )


def read_audio(path: str, sample_rate: int, resample: bool = False) -> np.ndarray:
    """A mono float32 waveform at ``sample_rate``; raises AudioFileError naming ``path``."""
    if not os.path.isfile(path):
        raise UnreadableAudioError(f"{path}: file does not exist")
    try:
        with sf.SoundFile(path) as f:
            _check_format(path, f.channels, f.samplerate, sample_rate, resample)
            rate = f.samplerate
            wav = f.read(dtype="float32", always_2d=False)
    except AudioFileError:
        raise
    except Exception as e:
        size = os.path.getsize(path)
        what = "empty file (0 bytes)" if size == 0 else f"not a readable audio file ({e})"
        raise UnreadableAudioError(f"{path}: {what}") from None
    if wav.size == 0:
        raise UnreadableAudioError(f"{path}: empty audio (0 samples)")
    if rate != sample_rate:
        from scipy.signal import resample_poly

        up, down = _resample_ratio(rate, sample_rate)
        wav = resample_poly(wav, up, down).astype(np.float32)
    return wav


class AudioManifestDataset(FairseqDataset):
    """Waveforms of a manifest, batched by length; a batch is cropped to its shortest item.

    With ``pad`` the batch is padded to its longest item instead (``padding_mask`` marks
    the padding). ``max_sample_size`` crops longer files (a random window when
    ``random_crop``), ``min_sample_size`` drops shorter ones.

    ``check_files`` reads every file's header when the dataset is built, so missing,
    corrupt, empty, stereo and wrong-rate files are reported before training starts
    (``skip_unreadable`` drops the unreadable ones and logs how many). Files that break
    later (corrupt audio data) are reported, or skipped, when they are read.
    """

    def __init__(
        self,
        manifest: str,
        sample_rate: int = 16000,
        max_sample_size: Optional[int] = None,
        min_sample_size: int = 0,
        shuffle: bool = True,
        pad: bool = False,
        normalize: bool = False,
        skip_unreadable: bool = False,
        check_files: bool = True,
        resample: bool = False,
        random_crop: bool = True,
        seed: int = 1,
        check_threads: int = 8,
    ):
        super().__init__()
        self.manifest = manifest
        self.sample_rate = sample_rate
        self.max_sample_size = max_sample_size if max_sample_size else np.iinfo(np.int64).max
        self.min_sample_size = min_sample_size or 0
        self.shuffle = shuffle
        self.pad = pad
        self.normalize = normalize
        self.skip_unreadable = skip_unreadable
        self.resample = resample
        self.random_crop = random_crop
        self.seed = seed
        self.epoch = 1
        self.skipped_at_read = 0

        self.root, rows = read_manifest(manifest)
        if check_files:
            rows = self._check(rows, check_threads)
        too_short = [r for r in rows if r.num_samples < self.min_sample_size]
        if too_short:
            logger.info(f"{manifest}: skipped {len(too_short)} files shorter than min_sample_size={self.min_sample_size} samples")
        rows = [r for r in rows if r.num_samples >= self.min_sample_size]
        self.rows = ManifestRows(rows)
        self._sizes = self.rows.num_samples
        logger.info(f"{manifest}: {len(rows)} files, {self._sizes.sum() / sample_rate / 3600:.2f} hours")

    # ---- loading -------------------------------------------------------------------
    def path(self, row: ManifestRow) -> str:
        return os.path.join(self.root, row.path)

    def _where(self, row: ManifestRow) -> str:
        return f"{self.manifest} line {row.line}"

    def _check(self, rows: List[ManifestRow], threads: int) -> List[ManifestRow]:
        def check(row):
            try:
                return audio_length(self.path(row), self.sample_rate, self.resample), None
            except AudioFileError as e:
                return None, e

        if len(rows) >= 10_000:
            logger.info(f"{self.manifest}: reading the headers of {len(rows)} files (task.check_files=false skips this)")
        # the first header is read here, alone: soundfile's cffi bindings set up their C types
        # lazily on first use, and several threads doing that at once can abort the process
        # (cffi's realize_c_type assertion, seen as a rare crash of this check)
        results = [check(rows[0])] if rows else []
        with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
            results += list(pool.map(check, rows[1:]))
        kept, unreadable, bad_format, resized = [], [], [], 0
        for row, (length, err) in zip(rows, results):
            if isinstance(err, AudioFormatError):
                bad_format.append((row, err))
            elif err is not None:
                unreadable.append((row, err))
            else:
                if length != row.num_samples:
                    resized += 1
                kept.append(ManifestRow(row.path, length, row.line))
        if bad_format:
            raise AudioFormatError(self._summary(bad_format, "file(s) in the wrong format"))
        if unreadable:
            if not self.skip_unreadable:
                raise UnreadableAudioError(
                    self._summary(unreadable, "unreadable file(s)")
                    + "\nFix or remove them, or set task.skip_unreadable=true to skip them"
                )
            logger.warning(self._summary(unreadable, "unreadable file(s), skipped (task.skip_unreadable=true)"))
        if resized:
            logger.info(f"{self.manifest}: {resized} rows give another num_samples than the file's header; using the header's")
        return kept

    def _summary(self, problems, what: str, show: int = 5) -> str:
        lines = [f"{self.manifest}: {len(problems)} {what}:"]
        lines += [f"  {self._where(row)}: {err}" for row, err in problems[:show]]
        if len(problems) > show:
            lines.append(f"  ... and {len(problems) - show} more")
        return "\n".join(lines)

    # ---- FairseqDataset ------------------------------------------------------------
    def __len__(self):
        return len(self.rows)

    def __getitem__(self, index):
        row = self.rows[index]
        try:
            wav = read_audio(self.path(row), self.sample_rate, self.resample)
            if len(wav) < row.num_samples:  # cut short since its row was written or its header read
                raise UnreadableAudioError(f"{self.path(row)}: truncated: {len(wav)} samples, its row says {row.num_samples}")
        except UnreadableAudioError as e:
            if not self.skip_unreadable:
                raise UnreadableAudioError(f"{self._where(row)}: {e} (task.skip_unreadable=true skips such files)") from None
            self.skipped_at_read += 1
            logger.warning(f"{self._where(row)}: {e}; skipped ({self.skipped_at_read} skipped by this reader so far)")
            return {"id": index, "source": None}
        except AudioFormatError as e:
            raise AudioFormatError(f"{self._where(row)}: {e}") from None
        source = torch.from_numpy(wav)
        if self.normalize:
            source = F.layer_norm(source, source.shape)
        return {"id": index, "source": source}

    def set_epoch(self, epoch):
        self.epoch = epoch

    @property
    def sizes(self):
        return self._sizes

    def size(self, index):
        return self.num_tokens(index)

    def num_tokens(self, index):
        return int(min(self._sizes[index], self.max_sample_size))

    def num_tokens_vec(self, indices):
        return np.minimum(self._sizes[indices], self.max_sample_size)

    def ordered_indices(self):
        """Longest first (batches of similar lengths crop little); random among equals."""
        if not self.shuffle:
            return np.arange(len(self))
        order = np.random.permutation(len(self))
        lengths = np.minimum(self._sizes, self.max_sample_size)
        return np.lexsort([order, lengths])[::-1]

    def filter_indices_by_size(self, indices, max_sizes):
        return indices, []  # long files are cropped, not dropped

    def collater(self, samples):
        samples = [s for s in samples if s["source"] is not None]
        if not samples:
            return {}
        sizes = [len(s["source"]) for s in samples]
        target = min(max(sizes) if self.pad else min(sizes), self.max_sample_size)
        ids = torch.LongTensor([s["id"] for s in samples])
        rng = np.random.default_rng([self.seed, self.epoch, int(ids[0])])
        source = samples[0]["source"].new_zeros(len(samples), target)
        padding_mask = torch.zeros(len(samples), target, dtype=torch.bool)
        for i, (s, size) in enumerate(zip(samples, sizes)):
            wav = s["source"]
            if size > target:
                start = int(rng.integers(0, size - target + 1)) if self.random_crop else 0
                wav = wav[start : start + target]
            source[i, : len(wav)] = wav
            padding_mask[i, len(wav) :] = True
        return {
            "id": ids,
            "net_input": {"source": source, "padding_mask": padding_mask, "id": ids},
            "nsentences": len(samples),
            "ntokens": int((~padding_mask).sum()),
        }
