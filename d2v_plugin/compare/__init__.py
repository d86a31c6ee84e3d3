"""``scripts/compare_text.sh``: data2vec 2.0, data2vec 1.0 and a RoBERTa masked-LM baseline,
pretrained on the same data for the same number of updates and fine-tuned with the same
recipe and seeds (:mod:`.run`), with the numbers read back from fairseq's json logs
(:mod:`.logs`) into ``comparison.md`` and ``comparison.png`` (:mod:`.report`)."""
