"""Dataset preparation helpers (raw data -> fairseq-ready files)."""
