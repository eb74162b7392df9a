"""Classification heads: the pooled [CLS] of Hugging Face's classifiers, or the mean of the tokens.

``cls`` is the model class as Hugging Face builds it: BERT classifies ``pooler(h[CLS])``
(a dense + tanh layer), DistilBERT ``pre_classifier(h[CLS])``. ``mean`` classifies the average
of the last layer's hidden states over the real (unpadded) tokens, as sentence-transformers and
SetFit do: the default model, all-MiniLM-L6-v2, was trained for exactly that pooling, and its
``pooler.dense`` is a leftover of the older MiniLM checkpoint that its training never touched.

A mean head drops the [CLS]-only layer (``bert.pooler`` / ``pre_classifier``), so its weights
are neither counted nor saved, and goes ``dropout -> classifier`` on the mean. The model stays
its Hugging Face class underneath (pruning, export and the training loop see the same modules);
only ``forward`` differs, through a subclass named ``MeanPooling<class>``. The choice is written
into the model config (:data:`HEAD_ATTR`), so a saved folder is rebuilt with the same head.
"""

from __future__ import annotations

import torch
from torch import nn

from tinycompress.models.arch import get_arch, set_module
from tinycompress.models.config_fields import HEAD_ATTR

HEAD_TYPES: tuple[str, ...] = ("cls", "mean")

# ``model.head: auto`` takes the pooling the encoder was trained with: sentence-transformers
# folders say it in their Pooling module's config (modules.json names that module's folder).
AUTO = "auto"
_ST_MODULES_FILE = "modules.json"
_ST_POOLING_TYPE = "sentence_transformers.models.Pooling"


def pretrained_pooling(source: str) -> str | None:
    """``mean`` or ``cls`` when ``source`` is a local sentence-transformers folder whose Pooling
    module is plain mean or [CLS] pooling; None otherwise (no such folder, a hub id, another
    pooling, an unreadable file)."""
    import json
    from pathlib import Path

    folder = Path(source)
    try:
        modules = json.loads((folder / _ST_MODULES_FILE).read_text(encoding="utf-8"))
        pooling = next(m for m in modules if m.get("type") == _ST_POOLING_TYPE)
        settings = json.loads((folder / pooling.get("path", "") / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, StopIteration, AttributeError, TypeError):
        return None
    modes = {k.removeprefix("pooling_mode_") for k, v in settings.items() if k.startswith("pooling_mode_") and v}
    return {"mean_tokens": "mean", "cls_token": "cls"}.get(modes.pop()) if len(modes) == 1 else None


def resolve_head(head: str, source: str) -> str:
    """The head a fine-tune of ``source`` gets for the setting ``head`` (``auto``: the pooling the
    encoder was pretrained with, :func:`pretrained_pooling`, else ``cls``)."""
    if head != AUTO:
        return head
    return pretrained_pooling(source) or "cls"


def head_of(model_or_config) -> str:
    """The head type a model (or its config) classifies with: ``cls`` unless recorded otherwise."""
    config = getattr(model_or_config, "config", model_or_config)
    return getattr(config, HEAD_ATTR, None) or "cls"


def masked_mean(hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of ``hidden`` (batch, tokens, width) over the tokens whose mask is 1."""
    if attention_mask is None:
        return hidden.mean(dim=1)
    weights = attention_mask.unsqueeze(-1).to(hidden.dtype)
    # clamp: a row without any real token (never produced by the tokenizer) gives zeros, not NaN.
    return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)


class _MeanPoolingForward:
    """The ``forward`` of a mean-pooling classifier (mixed into a Hugging Face classifier class)."""

    def _mean_pooled(self, inputs: dict, labels, kwargs):
        from transformers.modeling_outputs import SequenceClassifierOutput

        return_dict = kwargs.pop("return_dict", None)
        outputs = self.base_model(**{k: v for k, v in inputs.items() if v is not None}, **kwargs, return_dict=True)
        pooled = self.dropout(masked_mean(outputs[0], inputs.get("attention_mask")))
        logits = self.classifier(pooled)
        loss = None
        if labels is not None:
            if self.config.num_labels == 1:
                loss = nn.functional.mse_loss(logits.squeeze(-1), labels.to(logits.dtype))
            else:
                loss = nn.functional.cross_entropy(logits, labels)
        output = SequenceClassifierOutput(
            loss=loss, logits=logits, hidden_states=outputs.hidden_states, attentions=outputs.attentions
        )
        return output.to_tuple() if return_dict is False else output


# Two forwards with explicit arguments: exporters read the inputs a model takes from its
# signature (DistilBERT has no token_type_ids).
class _WithTokenTypes(_MeanPoolingForward):
    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, labels=None, **kwargs):
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids}
        return self._mean_pooled(inputs, labels, kwargs)


class _WithoutTokenTypes(_MeanPoolingForward):
    def forward(self, input_ids=None, attention_mask=None, labels=None, **kwargs):
        return self._mean_pooled({"input_ids": input_ids, "attention_mask": attention_mask}, labels, kwargs)


_MEAN_CLASSES: dict[type, type] = {}


def _mean_class(base: type) -> type:
    """``MeanPooling<base>``: ``base`` with the mean-pooling forward (one class per base)."""
    if base not in _MEAN_CLASSES:
        import inspect

        takes_token_types = "token_type_ids" in inspect.signature(base.forward).parameters
        mixin = _WithTokenTypes if takes_token_types else _WithoutTokenTypes
        name = f"MeanPooling{base.__name__}"
        cls = type(name, (mixin, base), {"__module__": __name__, "__qualname__": name})
        globals()[name] = cls  # findable by name, so the model pickles like any other
        _MEAN_CLASSES[base] = cls
    return _MEAN_CLASSES[base]


def hf_class_name(model) -> str:
    """The Hugging Face class a model is (for a mean head: the class under ``MeanPooling<class>``)."""
    cls = type(model)
    return (cls.__bases__[-1] if cls in _MEAN_CLASSES.values() else cls).__name__  # bases: (forward, HF class)


def apply_head_(model, head: str) -> None:
    """Give ``model`` (a Hugging Face sequence classifier with its [CLS] head) the ``head`` type, in place.

    ``mean`` removes the [CLS]-only layer and records the choice in ``model.config``; ``cls``
    leaves a [CLS] model as it is. Applying ``mean`` twice is harmless.
    """
    if head not in HEAD_TYPES:
        raise ValueError(f"unknown head {head!r}; expected one of {HEAD_TYPES}")
    if isinstance(model, _MeanPoolingForward):
        if head != "mean":
            raise ValueError("a mean-pooling model cannot be given its [CLS] head back; rebuild it from its config")
        return
    if head == "cls":
        return
    spec = get_arch(model)
    set_module(model, spec.cls_only_module, None)
    model.__class__ = _mean_class(type(model))
    setattr(model.config, HEAD_ATTR, "mean")


def set_classifier_dropout(config, dropout: float) -> None:
    """Dropout before the classifier layer, written into the model ``config`` (its field differs per family)."""
    setattr(config, get_arch(config).classifier_dropout_field, dropout)
