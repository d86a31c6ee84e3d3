"""Options of Meta's ``data2vec_multi`` that d2v_plugin does not implement, in one table.

A checkpoint's config may hold any of Meta's fields. The ones our dataclasses declare are
used; the ones below are refused when they hold a value other than Meta's default and that
value would change what the caller gets (the encoder's features, or training). Everything
else Meta's config carries (``type``, the dead ``remove_masks``, ...) is ignored.
"""

from typing import Any, Dict

# option -> (Meta's default, what a non-default value changes: "training" or "features")
MODEL_OPTIONS = {
    "shared_decoder": (None, "training", "a decoder shared by all modalities, with its own regression loss"),
    "recon_loss": (0.0, "training", "a pixel reconstruction loss"),
}
MODALITY_OPTIONS: Dict[str, tuple] = {}


def check_unsupported(model_values: Dict[str, Any], purpose: str, source: str) -> None:
    """Raise ValueError naming the first unsupported option whose value matters for ``purpose``.

    ``purpose``: ``"features"`` (the encoder's output: load_encoder, fine-tuning) or
    ``"training"`` (the whole pretraining model). ``source`` names the file in the message.
    """

    def check(table, values, prefix):
        for key, (default, changes, what) in table.items():
            if key in values and values[key] != default and (purpose == "training" or changes == "features"):
                raise ValueError(
                    f"{source}: model.{prefix}{key}={values[key]!r} ({what}) is not implemented by d2v_plugin; "
                    f"only {key}={default!r} (Meta's default) is supported for {purpose}"
                )

    check(MODEL_OPTIONS, model_values, "")
    for name, values in (model_values.get("modalities") or {}).items():
        if isinstance(values, dict):
            check(MODALITY_OPTIONS, values, f"modalities.{name}.")
