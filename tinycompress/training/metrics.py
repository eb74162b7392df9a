"""Task metrics from logits, using scikit-learn and scipy."""

from __future__ import annotations

import numpy as np

from tinycompress.data.tasks import TaskSpec


def predictions(spec: TaskSpec, logits: np.ndarray) -> np.ndarray:
    return logits[:, 0] if spec.is_regression else logits.argmax(axis=-1)


def compute_metrics(spec: TaskSpec, logits: np.ndarray, labels) -> dict[str, float]:
    """The task's metrics (see ``TaskSpec.metrics``) as plain floats."""
    from scipy.stats import pearsonr, spearmanr
    from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

    labels = np.asarray(labels)
    preds = predictions(spec, logits)
    scorers = {
        "accuracy": lambda: accuracy_score(labels, preds),
        "f1": lambda: f1_score(labels, preds),
        "matthews_correlation": lambda: matthews_corrcoef(labels, preds),
        "pearson": lambda: pearsonr(preds, labels)[0],
        "spearman": lambda: spearmanr(preds, labels)[0],
    }
    return {name: float(scorers[name]()) for name in spec.metrics}
