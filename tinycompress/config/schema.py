"""The settings of every stage, each default written once: the sections of :class:`Config`.

Types are strict: ``epochs: true``, ``seed: "7"`` or ``vocab: "yes"`` are errors rather than
quietly becoming 1, 7 and True; an integer is accepted where a number is expected
(``speedup: 2``), and every number must be finite (no ``.inf`` / ``.nan``).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic_core import PydanticCustomError

# The head weights a retraining-free prune to a target compares (prune.head_weights unset).
RETRAINING_FREE_HEAD_WEIGHTS = (0.25, 0.5, 1.0, 2.0, 4.0)
# One or more finite, positive weights.
_HeadWeights = Annotated[list[Annotated[float, Field(gt=0, allow_inf_nan=False)]], Field(min_length=1)]


class _Section(BaseModel):
    # Unknown keys are refused (typos must not be silently ignored); assignment is validated
    # too, so a config stays valid after overrides. Strict types: no bool -> int, no str ->
    # number / bool (an int is still accepted for a float); numbers must be finite.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, strict=True, allow_inf_nan=False)


class ModelSettings(_Section):
    name: str = Field("default", description="'default' (all-MiniLM-L6-v2, offline), an HF id or a local folder")
    max_length: int = Field(128, ge=8, le=512, description="Tokens per example; longer texts are truncated")
    head: Literal["auto", "cls", "mean"] = Field(
        "cls",
        description=(
            "Classification head of a fine-tune: cls (Hugging Face's pooled [CLS]; loads anywhere) | mean (mean of "
            "the token states; loads with tinycompress or as ONNX) | auto (the pooling a sentence-transformers "
            "model was trained with, else cls)"
        ),
    )


class DataSettings(_Section):
    data_dir: str | None = Field(
        None, description="Folder of GLUE TSVs (if unset: $TINYCOMPRESS_DATA_DIR, else the hub)"
    )
    dev_fraction: float = Field(
        0.05, gt=0, lt=0.5, description="Share of train carved off (seeded) for model selection"
    )
    max_train_samples: int | None = Field(None, ge=1, description="Use only this many training rows (quick runs)")
    max_test_samples: int | None = Field(None, ge=1, description="Evaluate on only this many test rows")


class FinetuneSettings(_Section):
    epochs: int = Field(3, ge=1, description="Fine-tuning epochs")
    learning_rate: float = Field(5e-5, gt=0, description="Fine-tuning learning rate")
    batch_size: int = Field(
        32, ge=1, description="Fine-tuning batch size: rows per optimizer step, over all processes of a launched run"
    )
    eval_batch_size: int = Field(
        128, ge=1, description="Batch size for evaluation (dynamic int8 models are scored one row at a time)"
    )
    weight_decay: float = Field(0.01, ge=0, description="AdamW weight decay")
    warmup_ratio: float = Field(0.06, ge=0, lt=1, description="Share of the steps spent warming the learning rate up")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradients are clipped to this norm")
    classifier_dropout: float | None = Field(
        None, ge=0, lt=1, description="Dropout before the classifier layer (if unset: the model's own, 0.1 for BERT)"
    )
    group_by_length: bool = Field(True, description="Batch similar lengths together (less padding)")
    precision: Literal["fp32", "bf16", "fp16"] = Field(
        "fp32",
        description="Training precision: fp32 | bf16 | fp16 (mixed precision through Accelerate; fp16 needs CUDA)",
    )
    grad_accum: int = Field(
        1,
        ge=1,
        description=(
            "Micro-batches per optimizer step on each process (gradient accumulation); the batch size stays the "
            "optimizer step's, so it must be a multiple of processes x grad_accum"
        ),
    )


class PruneSettings(_Section):
    criterion: Literal["taylor", "fisher", "magnitude", "random"] | None = Field(
        None,
        description=(
            "taylor | fisher | magnitude | random (if unset: fisher for a target, whose search weighs heads "
            "against neurons; taylor for ratios)"
        ),
    )
    ratio: float | None = Field(
        None,
        ge=0,
        lt=1,
        description="Fraction of all attention heads removed, in [0, 1); setting it (or --ffn-ratio) prunes by ratios instead of a target",
    )
    ffn_ratio: float | None = Field(
        None,
        ge=0,
        lt=1,
        description="Fraction of all FFN neurons removed, in [0, 1); setting it (or --ratio) prunes by ratios instead of a target",
    )
    steps: int = Field(1, ge=1, description="Prune in this many steps, re-scoring between them")
    importance_samples: int = Field(1024, ge=1, description="Training rows used to score importance")
    min_heads_per_layer: int = Field(
        0, ge=0, description="Heads every layer keeps (0: a layer may lose its attention block)"
    )
    min_neurons_per_layer: int = Field(
        0, ge=0, description="FFN neurons every layer keeps (0: a layer may lose its FFN; with neither it is removed)"
    )
    speedup: float | None = Field(
        2.0,
        gt=1,
        description=(
            "Target: prune until the int8 (ONNX Runtime) model runs this many times faster than the unpruned int8 "
            "model at --target-batch-size, by this machine's measured latency table (the default target unless "
            "a ratio, --target-latency-ms or --target-size-mb is set)"
        ),
    )
    target_latency_ms: float | None = Field(
        None, gt=0, description="Target: int8 (ONNX Runtime) latency in ms at --target-batch-size, instead of --speedup"
    )
    target_size_mb: float | None = Field(
        None, gt=0, description="Target: size of the int8 (ONNX Runtime) model file in MB, instead of --speedup"
    )
    target_batch_size: Literal[1, 32] = Field(
        32, description="Batch size the latency targets and the measured speed-up refer to: 1 | 32"
    )
    speedup_checks: int = Field(
        2,
        ge=0,
        le=5,
        description=(
            "With --speedup or --target-latency-ms: times the chosen structure's int8 model against the unpruned "
            "one up to this many times before any recovery, and searches again with the budget corrected by how far "
            "the measured speed-up fell from the cost table's prediction (0: trust the table)"
        ),
    )
    head_weights: _HeadWeights | None = Field(
        None,
        description=(
            "With a target: weights the search gives the heads' importance against the neurons', one candidate "
            "structure each; every distinct candidate is cut from the parent, rescaled by least squares and scored "
            "on held-out training rows, and the lowest loss wins ([1.0]: take the scores as they are; if unset: "
            f"{' '.join(f'{w:g}' for w in RETRAINING_FREE_HEAD_WEIGHTS)} when no distillation follows "
            "(--recover-epochs 0), else 1.0)"
        ),
    )
    selection_samples: int = Field(
        1024, ge=1, description="Training rows (other than the scoring rows) that score the candidate structures"
    )
    measure_block_removal: bool = Field(
        True,
        description=(
            "With a target: measure the loss of removing each layer's attention block, FFN and whole layer on the "
            "scoring rows, and let the search price those removals at the measured loss where the summed "
            "scores say less (fisher and taylor)"
        ),
    )
    mask_tuning: bool = Field(
        True,
        description=(
            "After pruning, rescale the kept heads and neurons of each layer by least squares to reconstruct the "
            "parent's layer outputs on training rows (retraining-free, Kwon et al. 2022)"
        ),
    )
    mask_tuning_samples: int = Field(2048, ge=1, description="Training rows the least-squares rescaling fits")
    recover_epochs: int = Field(2, ge=0, description="Epochs of distillation from the parent after pruning; 0 = none")
    recover_learning_rate: float | None = Field(
        None,
        gt=0,
        description="Learning rate of the distillation after pruning (if unset: the fine-tune's, finetune.learning_rate)",
    )
    distill_temperature: float = Field(2.0, gt=0, description="Softmax temperature of the distillation loss")
    distill_alpha: float = Field(
        0.5, ge=0, le=1, description="Weight of the soft (teacher) loss; the rest is the hard label loss"
    )
    distill_layer_weight: float = Field(
        1.0,
        ge=0,
        description=(
            "Weight of the per-layer hidden-state loss (MSE to the parent's matching layer, TinyBERT / CoFi) "
            "added to the distillation loss; 0 = logits only"
        ),
    )
    vocab: bool = Field(
        False, description="Also drop the word-embedding rows of tokens the train and dev texts never use"
    )
    vocab_min_frequency: int = Field(1, ge=1, description="With --vocab: keep tokens seen at least this often")
    vocab_top_k: int | None = Field(
        None,
        ge=1,
        description="With --vocab: keep at most this many of the most frequent tokens, special tokens aside (if unset: no limit)",
    )

    @field_validator("target_batch_size", mode="before")
    @classmethod
    def _batch_size_is_an_int(cls, value: Any) -> Any:
        # A Literal of ints compares by equality, so it would take true for 1 and 32.0 for 32.
        if type(value) is not int:
            raise PydanticCustomError("literal_error", "Input should be 1 or 32", {"expected": "1 or 32"})
        return value


class QuantizeSettings(_Section):
    backend: Literal["onnx", "torch"] = Field(
        "onnx", description="Quantization backend: onnx (ONNX Runtime) | torch (torch int8 Linear + int8 embedding)"
    )
    mode: Literal["dynamic", "static"] = Field(
        "dynamic", description="dynamic | static (ONNX QDQ, calibrated on training rows)"
    )
    per_channel: bool = Field(False, description="Weight scales per output channel (on) or per tensor (off)")
    quantize_embeddings: bool = Field(True, description="Quantize the word embedding (Gather) too")
    calibration_samples: int = Field(128, ge=1, description="Training rows calibrating static quantization")
    tolerance: float | None = Field(
        None,
        ge=0,
        description=(
            "Accuracy-driven tuning (ONNX backend): try int8 recipes and keep the most sensitive layers fp32 "
            "until the dev metric is within this many points (0.3 = 0.003 accuracy) of the fp32 model's, "
            "then keep the fastest such candidate (if unset: no tuning, the configured recipe)"
        ),
    )


class ExportSettings(_Section):
    format: Literal["onnx", "torchscript", "all"] = Field("onnx", description="Export format: onnx | torchscript | all")
    opset: int = Field(17, ge=13, description="ONNX opset of fp32 exports")
    atol: float = Field(1e-4, gt=0, description="Parity tolerance of fp32 exports against PyTorch")
    int8_atol: float = Field(0.1, gt=0, description="Parity tolerance of int8 exports against PyTorch")


class ReportSettings(_Section):
    bench: bool = Field(
        False, description="Measure every row's latency on this machine now, rather than read it from the manifests"
    )
    bench_runs: int = Field(50, ge=5, description="Timed runs per batch size when latency is measured")
    baselines: bool = Field(
        True,
        description="Also int8-quantize the unpruned fine-tuned model (ONNX Runtime and torch) for comparison",
    )


class SearchSettings(_Section):
    trials: int = Field(
        20,
        ge=1,
        description="Trials of `finetune --search` in all: a search resumed after Ctrl-C runs only the ones missing",
    )
    samples: int | None = Field(
        4000,
        ge=1,
        description="Training rows each search trial trains on (if unset: all); the chosen recipe then trains on all rows",
    )


class Config(_Section):
    task: str = Field("sst2", description="GLUE task: sst2, cola, mrpc, rte, stsb, qnli, qqp, mnli")
    seed: int = Field(42, ge=0, le=2**32 - 1, description="Random seed")
    device: Literal["auto", "cpu", "cuda", "mps"] = Field(
        "auto", description="auto | cpu | cuda | mps (auto = cuda > mps > cpu)"
    )
    threads: int | None = Field(None, ge=1, description="CPU threads for torch / ONNX Runtime (if unset: all cores)")
    workdir: str = Field("runs", description="Workspace holding runs/<task>/<stage>-v<N> folders")
    model: ModelSettings = ModelSettings()
    data: DataSettings = DataSettings()
    finetune: FinetuneSettings = FinetuneSettings()
    search: SearchSettings = SearchSettings()
    prune: PruneSettings = PruneSettings()
    quantize: QuantizeSettings = QuantizeSettings()
    export: ExportSettings = ExportSettings()
    report: ReportSettings = ReportSettings()

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    @property
    def recover_learning_rate(self) -> float:
        """The learning rate of the distillation after pruning: ``prune.recover_learning_rate``,
        else the fine-tune's."""
        return self.prune.recover_learning_rate or self.finetune.learning_rate
