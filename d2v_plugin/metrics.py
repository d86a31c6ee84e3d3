"""Evaluation metrics of text classification / regression, as GLUE defines them.

Thin wrappers around scikit-learn and scipy: every function takes ``(preds, labels)``
(array-likes of the same length) and returns a plain float in [0, 1] (or [-1, 1] for
correlations). Correlations of a constant input are undefined; they are returned as
0.0 ("no correlation") instead of NaN, so that checkpoint selection keeps working
while a model still predicts a constant.

GLUE's official metric per task (Wang et al. 2019, table 1) is in :data:`GLUE_METRIC`;
:func:`compute` gives every number a metric family reports.
"""

import warnings
from typing import Dict

import numpy as np
from scipy import stats
from sklearn import metrics as skm

#: the metric families :func:`compute` knows, and what each reports
METRICS = {
    "accuracy": ("accuracy",),
    "mcc": ("mcc", "accuracy"),
    "acc_and_f1": ("acc_and_f1", "accuracy", "f1"),
    "macro_f1": ("macro_f1", "accuracy"),
    "pearson_and_spearman": ("pearson_and_spearman", "pearson", "spearman"),
}

#: GLUE task (config name) -> metric family; the first value it reports is the headline
GLUE_METRIC = {
    "cola": "mcc",
    "sst_2": "accuracy",
    "mrpc": "acc_and_f1",
    "qqp": "acc_and_f1",
    "sts_b": "pearson_and_spearman",
    "mnli": "accuracy",
    "qnli": "accuracy",
    "rte": "accuracy",
    "wnli": "accuracy",
}


def _arrays(preds, labels):
    preds, labels = np.asarray(preds), np.asarray(labels)
    if preds.shape != labels.shape:
        raise ValueError(f"predictions {preds.shape} and labels {labels.shape} differ in shape")
    if preds.size == 0:
        raise ValueError("no predictions to evaluate")
    return preds, labels


def accuracy(preds, labels) -> float:
    preds, labels = _arrays(preds, labels)
    return float(skm.accuracy_score(labels, preds))


def matthews_corr(preds, labels) -> float:
    """Matthews correlation coefficient (CoLA); 0 when it is undefined (a constant input)."""
    preds, labels = _arrays(preds, labels)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return float(skm.matthews_corrcoef(labels, preds))


def f1(preds, labels, pos_label=1) -> float:
    """Binary F1 of the class ``pos_label`` (MRPC, QQP: the "paraphrase"/"duplicate" class)."""
    preds, labels = _arrays(preds, labels)
    return float(skm.f1_score(labels, preds, pos_label=pos_label, average="binary", zero_division=0))


def macro_f1(preds, labels) -> float:
    """Unweighted mean of the per-class F1 over the classes seen in labels or predictions."""
    preds, labels = _arrays(preds, labels)
    return float(skm.f1_score(labels, preds, average="macro", zero_division=0))


def _correlation(fn, preds, labels) -> float:
    preds, labels = _arrays(np.asarray(preds, dtype=np.float64), np.asarray(labels, dtype=np.float64))
    if preds.size < 2 or np.ptp(preds) == 0 or np.ptp(labels) == 0:
        return 0.0
    return float(fn(preds, labels)[0])


def pearson(preds, labels) -> float:
    return _correlation(stats.pearsonr, preds, labels)


def spearman(preds, labels) -> float:
    return _correlation(stats.spearmanr, preds, labels)


def compute(metric: str, preds, labels, pos_label=1) -> Dict[str, float]:
    """Every value of the metric family ``metric`` (a key of :data:`METRICS`), as fractions.

    Combined scores follow GLUE: ``acc_and_f1`` = (accuracy + F1) / 2 and
    ``pearson_and_spearman`` = (Pearson + Spearman) / 2.
    """
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; choose one of {', '.join(METRICS)}")
    out = {}
    if metric == "pearson_and_spearman":
        out["pearson"] = pearson(preds, labels)
        out["spearman"] = spearman(preds, labels)
        out["pearson_and_spearman"] = (out["pearson"] + out["spearman"]) / 2
        return out
    out["accuracy"] = accuracy(preds, labels)
    if metric == "mcc":
        out["mcc"] = matthews_corr(preds, labels)
    elif metric == "acc_and_f1":
        out["f1"] = f1(preds, labels, pos_label=pos_label)
        out["acc_and_f1"] = (out["accuracy"] + out["f1"]) / 2
    elif metric == "macro_f1":
        out["macro_f1"] = macro_f1(preds, labels)
    return out
