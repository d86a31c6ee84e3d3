"""Meta's official-format data2vec 2.0 text checkpoint: our encoder gives Meta's output."""

import torch

import d2v_plugin
from helpers import compat_dir


def test_v2_text_checkpoint_matches_meta():
    root = compat_dir()
    encoder = d2v_plugin.load_encoder(str(root / "v2_text.checkpoint.pt"))
    expected = torch.load(root / "v2_text.expected.pt", map_location="cpu", weights_only=True)
    assert isinstance(encoder, d2v_plugin.Encoder)
    assert not encoder.training and encoder.model.ema is None
    with torch.no_grad():
        out = encoder(expected["source"], expected["padding_mask"], output_hidden_states=True)
        meta_format = encoder.extract_features(expected["source"], expected["padding_mask"])
    assert out.last_hidden_state.shape == expected["x"].shape == (2, 16, 64)
    keep = ~expected["out_padding_mask"]
    assert keep.sum() < keep.numel()  # the fixture has padding: the mask is exercised
    assert (out.last_hidden_state - expected["x"])[keep].abs().max() < 1e-4
    assert torch.equal(out.padding_mask, expected["out_padding_mask"])
    assert len(out.hidden_states) == 2 and torch.equal(out.hidden_states[-1], out.last_hidden_state)  # post-norm: no final norm
    assert torch.equal(meta_format["x"], out.last_hidden_state)
