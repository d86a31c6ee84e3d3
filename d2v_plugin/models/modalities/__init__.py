"""Modality encoders: each turns one kind of raw input into a sequence for the shared encoder."""
