"""Checkpoint export and import: slim inference files, Hugging Face transformers, ONNX.

``d2v-export CHECKPOINT --out DIR --format inference|hf|onnx`` (:mod:`.cli`) dispatches to
one module per format; ``d2v-import-hf`` (:mod:`.hf`) goes the other way.
"""
