"""Architecture adapter: where the prunable pieces live in each supported model family.

Everything that differs between model families (attribute paths, config field
names, per-module head-count attributes, the ONNX Runtime optimizer's name for the
family) is in the single ``_ARCHS`` table below, so no other module branches on
``model_type``.

Paths are dotted attribute paths. ``layers_path`` is relative to the *base*
model (``model.base_model``), so it works for both ``BertModel`` and
``BertForSequenceClassification``; every other module path is relative to one
encoder layer.

A layer may lose all its heads or all its FFN neurons: the sub-block is then *skipped*
(see :class:`BlockSkip` and :mod:`tinycompress.models.structure`); the table also says
which module is replaced to do that and how its parent layer calls it.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from tinycompress.errors import TinycompressError


@dataclass(frozen=True)
class BlockSkip:
    """How to skip an attention block or FFN whose every head / neuron was removed.

    The module at ``module`` (relative to one encoder layer) is replaced by a
    ``SkippedBlock`` that keeps only the output projection's bias (and, when the
    post-block LayerNorm lives inside ``module``, that LayerNorm), so the layer computes
    ``LayerNorm(x + bias)``: exactly what the block computes with all units masked.
    """

    module: str  # replaced module; must contain the output projection (attn_out / ffn_out)
    residual_arg: int  # position of the block input x among the positional args the layer calls it with
    returns_weights: bool  # the layer unpacks ``(output, attention weights)`` from it
    passthrough: tuple[str, ...] = ()  # modules before it, replaced by identities (their output is ignored)


@dataclass(frozen=True)
class ArchSpec:
    """Where to find the prunable modules and size fields of one model family."""

    model_type: str
    layers_path: str  # encoder layer list, relative to model.base_model
    query: str  # per-layer Linear paths
    key: str
    value: str
    attn_out: str  # output projection: its *input* columns are grouped per head
    ffn_in: str
    ffn_out: str  # its *input* columns are the FFN neurons
    attn_norm: str  # LayerNorm after the attention block: its input is attn_out's output + the block's input
    ffn_norm: str  # LayerNorm after the FFN: its input is ffn_out's output + the FFN's input
    attn_skip: BlockSkip  # how a layer without heads skips its attention block
    ffn_skip: BlockSkip  # how a layer without FFN neurons skips its FFN
    attention_module: str  # module carrying the head-count attributes below
    head_count_attr: str | None  # attribute holding the number of heads, if any
    all_head_size_attr: str | None  # attribute holding heads * head_size, if any
    heads_field: str  # config field names
    ffn_field: str
    layers_field: str
    hidden_field: str
    encoder_layer_count_attr: str | None  # attribute of the layer list's parent holding the layer count, if any
    # The model type whose fusions ONNX Runtime's transformer optimizer applies to this
    # family (None: export unfused). DistilBERT and MiniLM have no entry of their own in ORT;
    # its BERT fusions cover them.
    ort_model_type: str | None
    # The layer only a [CLS] head uses (relative to the classifier), dropped by a mean head,
    # and the config field of the dropout before the classifier layer.
    cls_only_module: str
    classifier_dropout_field: str

    def head_size(self, config) -> int:
        """Width of one attention head. Fixed by the (unpruned) config, so it
        stays valid after heads are removed."""
        return getattr(config, self.hidden_field) // getattr(config, self.heads_field)

    def num_heads(self, config) -> int:
        """Head count per layer of the *unpruned* model described by ``config``."""
        return getattr(config, self.heads_field)

    def ffn_size(self, config) -> int:
        """FFN width per layer of the *unpruned* model described by ``config``."""
        return getattr(config, self.ffn_field)


# "bert" also covers MiniLM (e.g. all-MiniLM-L6-v2) and TinyBERT checkpoints,
# which ship with model_type "bert".
_ARCHS: dict[str, ArchSpec] = {
    "bert": ArchSpec(
        model_type="bert",
        layers_path="encoder.layer",
        query="attention.self.query",
        key="attention.self.key",
        value="attention.self.value",
        attn_out="attention.output.dense",
        ffn_in="intermediate.dense",
        ffn_out="output.dense",
        attn_norm="attention.output.LayerNorm",
        ffn_norm="output.LayerNorm",
        # BertAttention applies attention.output.LayerNorm itself; BertLayer calls
        # attention(hidden_states, attention_mask, cache=...) and unpacks (output, weights).
        attn_skip=BlockSkip("attention", residual_arg=0, returns_weights=True),
        # BertLayer computes output(intermediate(x), x); BertOutput applies output.LayerNorm.
        ffn_skip=BlockSkip("output", residual_arg=1, returns_weights=False, passthrough=("intermediate",)),
        attention_module="attention.self",
        head_count_attr="num_attention_heads",
        all_head_size_attr="all_head_size",
        heads_field="num_attention_heads",
        ffn_field="intermediate_size",
        layers_field="num_hidden_layers",
        hidden_field="hidden_size",
        encoder_layer_count_attr=None,
        ort_model_type="bert",
        cls_only_module="bert.pooler",  # dense + tanh on h[CLS]
        classifier_dropout_field="classifier_dropout",
    ),
    "distilbert": ArchSpec(
        model_type="distilbert",
        layers_path="transformer.layer",
        query="attention.q_lin",
        key="attention.k_lin",
        value="attention.v_lin",
        attn_out="attention.out_lin",
        ffn_in="ffn.lin1",
        ffn_out="ffn.lin2",
        attn_norm="sa_layer_norm",
        ffn_norm="output_layer_norm",
        # TransformerBlock computes sa_layer_norm(attention(x, ...)[0] + x) and
        # output_layer_norm(ffn(x) + x): the norms sit outside the replaced modules.
        attn_skip=BlockSkip("attention", residual_arg=0, returns_weights=True),
        ffn_skip=BlockSkip("ffn", residual_arg=0, returns_weights=False),
        attention_module="attention",
        # transformers 5.x reshapes with -1 heads, so forward does not read
        # n_heads; we still keep it truthful for anyone inspecting the module.
        head_count_attr="n_heads",
        all_head_size_attr=None,
        heads_field="n_heads",
        ffn_field="hidden_dim",
        layers_field="n_layers",
        hidden_field="dim",
        encoder_layer_count_attr="n_layers",  # Transformer.n_layers
        ort_model_type="bert",
        cls_only_module="pre_classifier",  # dense (+ ReLU in forward) on h[CLS]
        classifier_dropout_field="seq_classif_dropout",
    ),
}


SUPPORTED_MODEL_TYPES: tuple[str, ...] = tuple(sorted(_ARCHS))


def get_arch(model_or_config) -> ArchSpec:
    """Return the ArchSpec for a model or config (anything with ``.model_type``
    or ``.config.model_type``). Raises TinycompressError for unsupported families."""
    config = getattr(model_or_config, "config", model_or_config)
    model_type = getattr(config, "model_type", None)
    if model_type not in _ARCHS:
        raise TinycompressError(
            f"model type {model_type!r} is not supported; supported: {', '.join(SUPPORTED_MODEL_TYPES)}",
            "use a BERT-family checkpoint (BERT, MiniLM, TinyBERT) or a DistilBERT one",
        )
    return _ARCHS[model_type]


def ort_model_type(model_type: str) -> str | None:
    """The name ONNX Runtime's transformer optimizer knows ``model_type`` by: the
    :attr:`ArchSpec.ort_model_type` of a supported family, else ``model_type`` itself (ORT's
    own names, e.g. ``"bert"`` or ``"gpt2"``)."""
    spec = _ARCHS.get(model_type)
    return spec.ort_model_type if spec is not None else model_type


def get_module(root: nn.Module, dotted_path: str) -> nn.Module:
    """Resolve ``"a.b.0.c"`` relative to ``root``. Raises ValueError naming the
    missing component if the path does not exist."""
    module = root
    for part in dotted_path.split("."):
        if not hasattr(module, part):
            raise ValueError(f"{type(module).__name__} has no attribute {part!r} (path {dotted_path!r})")
        module = getattr(module, part)
    return module


def set_module(root: nn.Module, dotted_path: str, new: nn.Module) -> None:
    """Replace the submodule at ``dotted_path`` (relative to ``root``) with ``new``."""
    parent_path, _, name = dotted_path.rpartition(".")
    parent = get_module(root, parent_path) if parent_path else root
    setattr(parent, name, new)


def layers(model: nn.Module) -> list[nn.Module]:
    """The encoder layers of ``model`` (task head or bare base model) as a list."""
    spec = get_arch(model)
    base = getattr(model, "base_model", model)
    return list(get_module(base, spec.layers_path))
