"""Pieces shared by the tasks of this package (not a task module itself).

The leading underscore keeps both this package's auto-import (``d2v_plugin._autoimport``) and
fairseq's ``import_tasks`` (for ``--user-dir``) from importing it as a task module; the tasks
import it themselves.
"""

import os
from typing import Optional

from fairseq.data import Dictionary


def check_data_dir(data: str, hint: str) -> None:
    """Raise a ``FileNotFoundError`` that names ``task.data`` and ``hint`` unless ``data`` is a directory."""
    if not os.path.isdir(data):
        raise FileNotFoundError(f"task.data: directory {data!r} does not exist; {hint}")


def load_text_dictionary(dict_path: str, missing_hint: Optional[str] = None) -> Dictionary:
    """The fairseq dictionary ``dict_path`` of a text model, with ``<mask>`` appended.

    data2vec text pretraining (as Meta's text models) reserves a ``<mask>`` symbol; appending it
    keeps the vocabulary, and so the embedding table, the size of the pretrained checkpoint's.
    With ``missing_hint``, a missing file raises ``FileNotFoundError`` naming ``task.data`` and
    the hint (without, the caller has checked the file itself).
    """
    if missing_hint is not None and not os.path.isfile(dict_path):
        raise FileNotFoundError(f"task.data: {dict_path} is missing; {missing_hint}")
    dictionary = Dictionary.load(dict_path)
    dictionary.add_symbol("<mask>")
    return dictionary


class TextDictionaryMixin:
    """For a task whose one dictionary, ``self.dictionary``, is both source and target dictionary.

    List it before ``FairseqTask`` among the bases, so that its properties win.
    """

    @property
    def source_dictionary(self):
        return self.dictionary

    @property
    def target_dictionary(self):
        return self.dictionary


class NoDictionaryMixin:
    """For a task on raw inputs (audio, images): no source or target dictionary.

    List it before ``FairseqTask`` among the bases, so that its properties win.
    """

    @property
    def source_dictionary(self):
        return None

    @property
    def target_dictionary(self):
        return None
