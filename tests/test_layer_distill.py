"""Tests for layer-wise (hidden-state) distillation in tinycompress.training.losses / loop."""

import copy

import pytest
import torch
import torch.nn.functional as F
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    DistilBertConfig,
    DistilBertForSequenceClassification,
)

from tinycompress.config import FinetuneSettings
from tinycompress.data.batching import Encoded
from tinycompress.data.tasks import get_task
from tinycompress.models.arch import get_arch, get_module
from tinycompress.models.structure import prune_heads_, prune_neurons_
from tinycompress.training.loop import train
from tinycompress.training.losses import batch_loss, distillation_loss, hidden_state_loss

VOCAB = 100


def make_model(kind: str = "bert", n_layers: int = 2, seed: int = 0, init: float = 0.02):
    torch.manual_seed(seed)
    if kind == "bert":
        config = BertConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            num_hidden_layers=n_layers,
            num_attention_heads=4,
            intermediate_size=37,
            max_position_embeddings=64,
            initializer_range=init,
        )
        return BertForSequenceClassification(config).eval()
    config = DistilBertConfig(
        vocab_size=VOCAB,
        dim=32,
        n_layers=n_layers,
        n_heads=4,
        hidden_dim=37,
        max_position_embeddings=64,
        initializer_range=init,
    )
    return DistilBertForSequenceClassification(config).eval()


def make_batch(batch_size: int = 6, seq_len: int = 10, seed: int = 1) -> dict:
    generator = torch.Generator().manual_seed(seed)
    mask = torch.ones(batch_size, seq_len, dtype=torch.long)
    mask[1, 6:] = 0
    mask[3, 2:] = 0
    return {
        "input_ids": torch.randint(1, VOCAB, (batch_size, seq_len), generator=generator),
        "attention_mask": mask,
        "labels": torch.randint(0, 2, (batch_size,), generator=generator),
    }


def pruned_copy(model):
    student = copy.deepcopy(model)
    prune_heads_(student, [[0, 3], [1, 2]])
    prune_neurons_(student, [list(range(0, 37, 3)), list(range(10))])
    return student


@torch.no_grad()
def hidden_mse(student, teacher, batches, layer_map=None) -> float:
    losses = []
    for batch in batches:
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        s = student(**inputs, output_hidden_states=True).hidden_states
        t = teacher(**inputs, output_hidden_states=True).hidden_states
        losses.append(hidden_state_loss(s, t, inputs["attention_mask"], layer_map))
    return float(torch.stack(losses).mean())


@pytest.mark.parametrize("kind", ["bert", "distilbert"])
def test_layer_loss_is_zero_for_the_teacher_itself(kind):
    teacher = make_model(kind)
    student = copy.deepcopy(teacher)
    assert hidden_mse(student, teacher, [make_batch()]) == 0.0
    with_layers = batch_loss(student, make_batch(), "cpu", regression=False, teacher=teacher, layer_weight=3.0)
    without = batch_loss(student, make_batch(), "cpu", regression=False, teacher=teacher)
    assert torch.equal(with_layers, without)


@pytest.mark.parametrize("teacher_kind", [None, "same"])
def test_layer_weight_zero_is_exactly_the_old_loss(teacher_kind):
    student = pruned_copy(make_model())
    teacher = make_model() if teacher_kind else None
    requested = []
    hook = student.register_forward_pre_hook(
        lambda module, args, kwargs: requested.append(kwargs.get("output_hidden_states")), with_kwargs=True
    )
    try:
        loss = batch_loss(student, make_batch(), "cpu", regression=False, teacher=teacher, temperature=3.0, alpha=0.7)
    finally:
        hook.remove()
    assert requested == [None]  # hidden states are not even asked for

    # The loss as batch_loss computed it before layer distillation existed.
    batch = make_batch()
    labels = batch.pop("labels")
    logits = student(**batch).logits
    if teacher is None:
        expected = F.cross_entropy(logits, labels)
    else:
        with torch.no_grad():
            teacher_logits = teacher(**batch).logits
        expected = distillation_loss(logits, teacher_logits, labels, temperature=3.0, alpha=0.7, regression=False)
    assert torch.equal(loss, expected)


def test_layer_loss_is_added_with_its_weight():
    teacher = make_model()
    student = pruned_copy(teacher)
    base = batch_loss(student, make_batch(), "cpu", regression=False, teacher=teacher)
    total = batch_loss(student, make_batch(), "cpu", regression=False, teacher=teacher, layer_weight=2.5)
    layer = hidden_mse(student, teacher, [make_batch()])
    assert layer > 0
    torch.testing.assert_close(total, base + 2.5 * layer)


def test_padding_tokens_do_not_count():
    generator = torch.Generator().manual_seed(0)
    student = [torch.randn(3, 5, 8, generator=generator) for _ in range(3)]
    teacher = [torch.randn(3, 5, 8, generator=generator) for _ in range(3)]
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 0, 0, 0, 0]])
    loss = hidden_state_loss(student, teacher, mask)
    keep = mask.bool()
    expected = torch.stack([F.mse_loss(s[keep], t[keep]) for s, t in zip(student[1:], teacher[1:])]).mean()
    torch.testing.assert_close(loss, expected)
    for s in student:
        s[~keep] = 1e6  # whatever sits at padded positions
    torch.testing.assert_close(hidden_state_loss(student, teacher, mask), expected)


def test_layer_map_pairs_student_layers_with_teacher_layers():
    generator = torch.Generator().manual_seed(0)
    student = [torch.randn(2, 4, 8, generator=generator) for _ in range(3)]  # embeddings + 2 layers
    teacher = [torch.randn(2, 4, 8, generator=generator) for _ in range(4)]  # embeddings + 3 layers
    expected = (F.mse_loss(student[1], teacher[1]) + F.mse_loss(student[2], teacher[3])) / 2
    torch.testing.assert_close(hidden_state_loss(student, teacher, None, [0, 2]), expected)
    with pytest.raises(ValueError, match="layer_map"):
        hidden_state_loss(student, teacher)
    with pytest.raises(ValueError, match="layer_map"):
        hidden_state_loss(student, teacher, None, [0, 3])


def test_layer_map_through_batch_loss_on_a_student_with_a_removed_layer():
    teacher = make_model(n_layers=3)
    student = copy.deepcopy(teacher)
    spec = get_arch(student)
    del get_module(student.base_model, spec.layers_path)[1]
    setattr(student.config, spec.layers_field, 2)
    loss = batch_loss(
        student, make_batch(), "cpu", regression=False, teacher=teacher, layer_weight=1.0, layer_map=[0, 2]
    )
    assert torch.isfinite(loss)
    with pytest.raises(ValueError, match="layer_map"):
        batch_loss(student, make_batch(), "cpu", regression=False, teacher=teacher, layer_weight=1.0)


def test_layer_weight_needs_a_teacher():
    with pytest.raises(ValueError, match="teacher"):
        batch_loss(make_model(), make_batch(), "cpu", regression=False, layer_weight=1.0)
    with pytest.raises(ValueError, match="layer_weight"):
        batch_loss(make_model(), make_batch(), "cpu", regression=False, teacher=make_model(), layer_weight=-1.0)


def random_split(rows: int, seed: int) -> Encoded:
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(4, 12, (rows,), generator=generator).tolist()
    ids = [torch.randint(5, VOCAB, (n,), generator=generator).tolist() for n in lengths]
    labels = torch.randint(0, 2, (rows,), generator=generator).tolist()
    return Encoded(input_ids=ids, token_type_ids=None, labels=labels)


def test_training_with_the_layer_loss_brings_hidden_states_to_the_teacher():
    # A wide init, so that the pruned heads and neurons leave a clear gap to close (with BERT's
    # 0.02 a random layer is nearly the identity and pruning changes little).
    teacher = make_model(init=0.15)
    train_data, dev_data = random_split(192, seed=0), random_split(32, seed=1)
    settings = FinetuneSettings(epochs=1, learning_rate=3e-3, batch_size=16, warmup_ratio=0.0)
    probe = [make_batch(seed=s) for s in range(3)]
    students = {}
    for weight in (0.0, 10.0):
        student = pruned_copy(teacher)
        students[weight] = student
        before = hidden_mse(student, teacher, probe)
        train(
            student,
            train_data,
            dev_data,
            get_task("sst2"),
            settings,
            pad_id=0,
            device=torch.device("cpu"),
            seed=0,
            teacher=teacher,
            layer_weight=weight,
        )
    after = {weight: hidden_mse(student, teacher, probe) for weight, student in students.items()}
    assert after[10.0] < 0.6 * before
    assert after[10.0] < after[0.0]
    with pytest.raises(ValueError, match="teacher"):
        train(
            pruned_copy(teacher),
            train_data,
            dev_data,
            get_task("sst2"),
            settings,
            pad_id=0,
            device=torch.device("cpu"),
            seed=0,
            layer_weight=1.0,
        )
