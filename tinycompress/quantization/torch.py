"""PyTorch int8 (the quantize stage's ``torch`` backend): dynamic int8 Linear + weight-only int8
word embedding, and a pickle-free safetensors checkpoint format for it. The int8 model traces
to TorchScript like an fp32 one (:mod:`tinycompress.exporters.torchscript`).

Which quantisation API (torch 2.13, CPU)
----------------------------------------
``torch.ao.quantization`` is deprecated in favour of the separate ``torchao`` package.
We checked torchao 0.18.0 (latest on PyPI; pure-Python wheel with no torch pin, so it
would not pull a CUDA torch): ``quantize_(m, Int8DynamicActivationInt8WeightConfig())``
does run on CPU, but

* it is *slower* than fp32 on CPU in eager mode (384x1536x384 MLP, 4096 tokens, 1 thread:
  fp32 118 ms, torchao 144 ms, ``torch.ao`` dynamic 55 ms) - its fast paths need
  ``torch.compile``/CUDA;
* its weights are tensor subclasses that safetensors cannot serialise ("Attempted to
  access the data pointer on an invalid python storage");
* ``torch.jit.trace`` fails on them (INTERNAL ASSERT in TraceTypeManual.cpp);
* its bundled C++ extensions are CUDA / CPython-3.10 builds that fail to load here
  (warnings at import), so only its slow pure-PyTorch paths run.

So we use ``torch.ao.quantization.quantize_dynamic`` (fbgemm/x86 int8 GEMM kernels,
traceable, weights recoverable as plain int8 + scale). Its deprecation warnings are
silenced inside this module only. If it is removed, swap ``_quantize_linears``.

Checkpoint format (what "size on disk" counts)
----------------------------------------------
We store the *int8 weights themselves*, not fp32 + a recipe, so the bytes on disk are the
real int8 footprint and load does no re-quantisation:

* ``int8_weights.safetensors``: for each quantised Linear ``<name>.weight_int8`` (int8),
  ``<name>.weight_scale`` (float64, 1 or out_features values), ``<name>.weight_zero_point``
  (int64) and ``<name>.bias`` (fp32); for the embedding ``<name>.weight_int8`` (int8)
  and ``<name>.scale`` (fp32 per row); every other parameter/buffer in fp32 under its
  usual name.
* ``int8_recipe.json``: format version, which modules are quantised and their shapes.

Loading rebuilds the fp32 skeleton with the caller's builder, loads the fp32 tensors,
then swaps in quantised modules built from the stored int8 tensors, so logits after a
reload are bit-identical to before saving. Nothing is ever unpickled.
"""

from __future__ import annotations

import copy
import json
import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from tinycompress.checkpoint.format import INT8_RECIPE_FILE, INT8_WEIGHTS_FILE
from tinycompress.config import QuantizeSettings
from tinycompress.models.arch import set_module

_FORMAT = "tinycompress-torch-int8"


_FORMAT_VERSION = 1


@contextmanager
def _quiet_torch_ao() -> Iterator[None]:
    """Silence the deprecation warnings of the torch.ao API we chose on purpose (see top)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"torch\.ao\.quantization is deprecated", category=DeprecationWarning)
        warnings.filterwarnings(
            "ignore", message=r"torch\.quantize_per_tensor, torch\.quantize_per_channel", category=UserWarning
        )
        yield


def _dynamic_linear_cls() -> type[nn.Module]:
    with _quiet_torch_ao():
        from torch.ao.nn.quantized.dynamic import Linear as DynamicQuantLinear
    return DynamicQuantLinear


class Int8Embedding(nn.Module):
    """Embedding table stored as int8 with one fp32 scale per row (symmetric).

    ``forward(ids)`` looks up int8 rows and rescales them to fp32, so the table costs
    1 byte per value instead of 4; the lookup itself is memory-bound, not compute-bound.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, padding_idx: int | None = None):
        super().__init__()
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.padding_idx = padding_idx
        self.register_buffer("weight_int8", torch.zeros(num_embeddings, embedding_dim, dtype=torch.int8))
        self.register_buffer("scale", torch.ones(num_embeddings, dtype=torch.float32))

    @classmethod
    def from_float(cls, embedding: nn.Embedding) -> Int8Embedding:
        """Quantise an ``nn.Embedding``: per row, scale = max|w| / 127, q = round(w / scale)."""
        if not isinstance(embedding, nn.Embedding):
            raise ValueError(f"expected nn.Embedding, got {type(embedding).__name__}")
        weight = embedding.weight.detach().float()
        scale = weight.abs().amax(dim=1) / 127.0
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # all-zero rows
        module = cls(embedding.num_embeddings, embedding.embedding_dim, embedding.padding_idx)
        module.weight_int8.copy_(torch.round(weight / scale[:, None]).clamp(-127, 127).to(torch.int8))
        module.scale.copy_(scale)
        return module

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        rows = nn.functional.embedding(input_ids, self.weight_int8)
        return rows.to(torch.float32) * self.scale[input_ids].unsqueeze(-1)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, int8 per-row, padding_idx={self.padding_idx}"


def _check_engine() -> None:
    engine = torch.backends.quantized.engine
    if engine == "none" or engine not in torch.backends.quantized.supported_engines:
        raise RuntimeError(
            f"no usable quantized engine (engine={engine!r}, supported="
            f"{torch.backends.quantized.supported_engines}); int8 Linear needs fbgemm/x86/qnnpack"
        )


def _quantize_linears(model: nn.Module, per_channel: bool) -> None:
    """Swap every ``nn.Linear`` for a dynamic int8 one (weights int8, activations per batch)."""
    from torch.ao.quantization import default_dynamic_qconfig, per_channel_dynamic_qconfig, quantize_dynamic

    qconfig = per_channel_dynamic_qconfig if per_channel else default_dynamic_qconfig
    with _quiet_torch_ao():
        quantize_dynamic(model, {nn.Linear: qconfig}, dtype=torch.qint8, inplace=True)


def _module_name(root: nn.Module, target: nn.Module) -> str:
    for name, module in root.named_modules():
        if module is target:
            return name
    raise ValueError("input embedding module is not a submodule of the model")


def quantize_torch_dynamic(
    model: nn.Module, *, per_channel: bool = False, quantize_embeddings: bool = True
) -> nn.Module:
    """Return an int8 copy of an fp32 HF classifier for CPU inference.

    Every ``nn.Linear`` becomes a dynamic-int8 Linear (int8 weights, activations quantised
    per call); the word embedding (``model.get_input_embeddings()``) becomes an
    ``Int8Embedding`` (weight-only). Position/token-type embeddings and LayerNorms stay fp32
    (they are small). The input model is not modified. Works with pruned models because
    every Linear keeps its own shape.

    Args:
        model: fp32 ``nn.Module``; HF models are required only for the embedding step.
        per_channel: per-output-channel Linear weight scales (more accurate, same speed).
        quantize_embeddings: also quantise the word embedding.
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"expected an nn.Module, got {type(model).__name__}")
    _check_engine()
    qmodel = copy.deepcopy(model).eval()
    _quantize_linears(qmodel, per_channel)
    if quantize_embeddings:
        get_embeddings = getattr(qmodel, "get_input_embeddings", None)
        embedding = get_embeddings() if callable(get_embeddings) else None
        if not isinstance(embedding, nn.Embedding):
            raise ValueError("quantize_embeddings=True needs model.get_input_embeddings() to return nn.Embedding")
        set_module(qmodel, _module_name(qmodel, embedding), Int8Embedding.from_float(embedding))
    return qmodel


def _linear_tensors(name: str, module: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """int8 weight, scale(s), zero point(s) and bias of one dynamic-int8 Linear."""
    weight, bias = module.weight(), module.bias()
    if weight.qscheme() in (torch.per_tensor_affine, torch.per_tensor_symmetric):
        scale = torch.tensor([weight.q_scale()], dtype=torch.float64)
        zero_point = torch.tensor([weight.q_zero_point()], dtype=torch.int64)
        scheme, axis = "per_tensor", None
    else:
        scale = weight.q_per_channel_scales().to(torch.float64)
        zero_point = weight.q_per_channel_zero_points().to(torch.int64)
        scheme, axis = "per_channel", int(weight.q_per_channel_axis())
    tensors = {
        f"{name}.weight_int8": weight.int_repr(),
        f"{name}.weight_scale": scale,
        f"{name}.weight_zero_point": zero_point,
    }
    if bias is not None:
        tensors[f"{name}.bias"] = bias.detach().float()
    info = {
        "in_features": module.in_features,
        "out_features": module.out_features,
        "bias": bias is not None,
        "qscheme": scheme,
        "axis": axis,
    }
    return tensors, info


def _collect(qmodel: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    linear_cls = _dynamic_linear_cls()
    tensors: dict[str, torch.Tensor] = {}
    recipe: dict[str, Any] = {"format": _FORMAT, "version": _FORMAT_VERSION, "linear": {}, "embedding": {}}
    skip_prefixes = []
    for name, module in qmodel.named_modules():
        if isinstance(module, linear_cls):
            linear_tensors, recipe["linear"][name] = _linear_tensors(name, module)
            tensors.update(linear_tensors)
            skip_prefixes.append(f"{name}.")
        elif isinstance(module, Int8Embedding):
            recipe["embedding"][name] = {
                "num_embeddings": module.num_embeddings,
                "embedding_dim": module.embedding_dim,
                "padding_idx": module.padding_idx,
            }
    if not recipe["linear"] and not recipe["embedding"]:
        raise ValueError("model has no int8 modules; quantise it with quantize_torch_dynamic first")
    for key, value in qmodel.state_dict().items():
        if any(key.startswith(p) for p in skip_prefixes):
            continue  # packed int8 params, stored above as plain tensors
        if not isinstance(value, torch.Tensor) or value.is_quantized:
            raise ValueError(f"cannot store state entry {key!r} of type {type(value).__name__} in safetensors")
        tensors[key] = value
    # clone(): safetensors refuses tensors sharing storage (tied weights are then stored
    # twice, which is also what they cost once loaded).
    return {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}, recipe


def save_torch_int8(qmodel: nn.Module, directory: str | Path) -> list[Path]:
    """Write a ``quantize_torch_dynamic`` model as safetensors + JSON (no pickle).

    Returns the files written (``int8_weights.safetensors``, ``int8_recipe.json``); their
    summed size is the model's honest size on disk.
    """
    directory = Path(directory)
    tensors, recipe = _collect(qmodel)
    directory.mkdir(parents=True, exist_ok=True)
    weights, recipe_path = directory / INT8_WEIGHTS_FILE, directory / INT8_RECIPE_FILE
    save_file(tensors, str(weights), metadata={"format": _FORMAT, "version": str(_FORMAT_VERSION)})
    recipe_path.write_text(json.dumps(recipe, indent=2, sort_keys=True) + "\n")
    return [weights, recipe_path]


def _read_checkpoint(directory: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    recipe_path, weights_path = directory / INT8_RECIPE_FILE, directory / INT8_WEIGHTS_FILE
    if not recipe_path.is_file() or not weights_path.is_file():
        raise ValueError(
            f"{directory} is not a torch-int8 checkpoint (needs {INT8_RECIPE_FILE} and {INT8_WEIGHTS_FILE})"
        )
    recipe = json.loads(recipe_path.read_text())
    if recipe.get("format") != _FORMAT or recipe.get("version") != _FORMAT_VERSION:
        raise ValueError(f"unsupported int8 checkpoint format {recipe.get('format')!r} v{recipe.get('version')!r}")
    return recipe, load_file(str(weights_path))


def _quantized_weight(name: str, info: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Rebuild the exact qint8 tensor from stored int8 values, scales and zero points."""
    int8 = tensors[f"{name}.weight_int8"]
    scale, zero_point = tensors[f"{name}.weight_scale"], tensors[f"{name}.weight_zero_point"]
    with _quiet_torch_ao():
        if info["qscheme"] == "per_tensor":
            return torch._make_per_tensor_quantized_tensor(int8, float(scale[0]), int(zero_point[0]))
        return torch._make_per_channel_quantized_tensor(int8, scale, zero_point, int(info["axis"]))


def _load_fp32_part(model: nn.Module, recipe: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> None:
    """Load every non-int8 tensor into the fp32 skeleton, checking nothing is missing."""
    int8_keys = set()
    for name in recipe["linear"]:
        int8_keys.update(f"{name}.{k}" for k in ("weight_int8", "weight_scale", "weight_zero_point"))
    for name in recipe["embedding"]:
        int8_keys.update(f"{name}.{k}" for k in ("weight_int8", "scale"))
    fp32 = {k: v for k, v in tensors.items() if k not in int8_keys}
    try:
        result = model.load_state_dict(fp32, strict=False)
    except RuntimeError as err:  # size mismatch: builder made a different architecture
        raise ValueError(f"fp32_model_builder's model does not match the checkpoint: {err}") from None
    replaced = {f"{n}.weight" for n in (*recipe["linear"], *recipe["embedding"])}
    missing = [k for k in result.missing_keys if k not in replaced]
    if missing or result.unexpected_keys:
        raise ValueError(
            f"fp32_model_builder's model does not match the checkpoint: missing {missing}, "
            f"unexpected {list(result.unexpected_keys)}"
        )


def _swap_in_linear(model: nn.Module, name: str, info: Mapping[str, Any], tensors) -> None:
    current = model.get_submodule(name)
    shape = (info["out_features"], info["in_features"])
    if not isinstance(current, nn.Linear) or tuple(current.weight.shape) != shape:
        raise ValueError(
            f"builder made {current!r} at {name!r} but the checkpoint has Linear"
            f"(in={shape[1]}, out={shape[0]}); the builder must recreate the (pruned) architecture"
        )
    linear_cls = _dynamic_linear_cls()
    with _quiet_torch_ao():
        qlinear = linear_cls(info["in_features"], info["out_features"], bias_=info["bias"], dtype=torch.qint8)
        qlinear.set_weight_bias(_quantized_weight(name, info, tensors), tensors.get(f"{name}.bias"))
    set_module(model, name, qlinear)


def _swap_in_embedding(model: nn.Module, name: str, info: Mapping[str, Any], tensors) -> None:
    current = model.get_submodule(name)
    shape = (info["num_embeddings"], info["embedding_dim"])
    if not isinstance(current, nn.Embedding) or tuple(current.weight.shape) != shape:
        raise ValueError(f"builder made {current!r} at {name!r} but the checkpoint has Embedding{shape}")
    module = Int8Embedding(*shape, padding_idx=info["padding_idx"])
    module.weight_int8.copy_(tensors[f"{name}.weight_int8"])
    module.scale.copy_(tensors[f"{name}.scale"])
    set_module(model, name, module)


def load_torch_int8(directory: str | Path, fp32_model_builder: Callable[[], nn.Module]) -> nn.Module:
    """Rebuild a quantised model saved by ``save_torch_int8``.

    Args:
        directory: folder holding ``int8_weights.safetensors`` and ``int8_recipe.json``.
        fp32_model_builder: zero-argument callable returning an fp32 model with the *same
            architecture* (including pruned per-layer shapes); its weight values are
            irrelevant, everything is overwritten from the checkpoint.

    Returns:
        The int8 model in eval mode; its logits equal those of the saved model exactly.
    """
    recipe, tensors = _read_checkpoint(Path(directory))
    model = fp32_model_builder()
    if not isinstance(model, nn.Module):
        raise ValueError(f"fp32_model_builder must return an nn.Module, got {type(model).__name__}")
    _check_engine()
    model.eval()
    _load_fp32_part(model, recipe, tensors)
    for name, info in recipe["embedding"].items():
        _swap_in_embedding(model, name, info, tensors)
    for name, info in recipe["linear"].items():
        _swap_in_linear(model, name, info, tensors)
    return model.eval()


def quantize_torch_model(model, folder: Path, settings: QuantizeSettings) -> dict[str, Any]:
    """Write ``int8_weights.safetensors`` + ``int8_recipe.json`` of ``model`` into ``folder``."""

    qmodel = quantize_torch_dynamic(
        model, per_channel=settings.per_channel, quantize_embeddings=settings.quantize_embeddings
    )
    save_torch_int8(qmodel, folder)
    recipe = json.loads((folder / INT8_RECIPE_FILE).read_text())
    counts = {"Linear": len(recipe["linear"]), "Embedding": len(recipe["embedding"])}
    return {"quantized_ops": counts, "fused_ops": {}, "attention_fusion": False, "fused_attention_heads": []}
