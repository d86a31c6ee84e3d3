"""Speech recognition with CTC fine-tuned data2vec models (``d2v_ctc``).

:class:`SpeechRecognizer` loads a fine-tuned checkpoint and transcribes files or waveforms;
``d2v-transcribe`` (:mod:`d2v_plugin.asr.transcribe`) is its command line;
:mod:`d2v_plugin.asr.decoding` holds greedy and KenLM beam-search CTC decoding.
"""

__all__ = ["SpeechRecognizer"]


def __getattr__(name):
    # imported lazily: the criteria import d2v_plugin.asr.decoding while d2v_plugin itself loads
    if name == "SpeechRecognizer":
        from .recognizer import SpeechRecognizer

        return SpeechRecognizer
    raise AttributeError(name)
