"""Training health at a glance: read fairseq training logs (json, simple, tensorboard) and
plot data2vec's statistics (``d2v-plot``)."""
