"""Several processes on CPU (gloo): real launchers (torchrun, accelerate launch, two torchrun "machines"
on 127.0.0.1) against the same run in one process.

The tiny model has no dropout here, so two processes differ from one only by float summation
order: loss curves agree to ~1e-6 and metrics exactly. The toy splits are odd-sized (193 train
rows, 81 test rows) so the last batches split unevenly and some micro-batches are empty.
"""

from __future__ import annotations

import json
import os
import runpy
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import assert_one_line_error, make_tiny_model_dir, write_toy_sst2
from typer.testing import CliRunner

from tinycompress.checkpoint.store import read_checkpoint
from tinycompress.cli.app import app
from tinycompress.config import load_config
from tinycompress.data.tasks import get_task
from tinycompress.inference.predictor import load_predictor
from tinycompress.stages.evaluate import evaluate_target
from tinycompress.training.distributed import Processes, split_evenly
from tinycompress.training.evaluation import evaluate_predictor_dev

runner = CliRunner()
LAUNCH_VARS = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")

# Scores raw importance and gathers test logits with whatever processes launched it; process 0
# saves them. Run under torchrun by a test, and in this process for the reference.
SCORING_SCRIPT = """
import sys

import torch

from tinycompress.checkpoint.hf import load_hf_model
from tinycompress.checkpoint.store import read_checkpoint
from tinycompress.data.batching import encode, padding_id
from tinycompress.data.glue import load_config_data
from tinycompress.data.tasks import get_task
from tinycompress.pruning.importance import compute_importance, summed_over_processes
from tinycompress.stages.prune_job import importance_batches
from tinycompress.training.distributed import close_processes, start_processes
from tinycompress.training.evaluation import predict_logits


def main(folder, out):
    torch.set_num_threads(1)
    checkpoint = read_checkpoint(folder)
    config = checkpoint.config
    spec = get_task(config.task)
    processes = start_processes(torch.device("cpu"))
    shared = processes if processes.distributed else None
    model, tokenizer = load_hf_model(checkpoint)
    data = load_config_data(config, spec)
    train, test = (encode(tokenizer, split, config.model.max_length) for split in (data.train, data.test))
    pad = padding_id(tokenizer)
    result = {"world_size": processes.world_size}
    for criterion in ("taylor", "fisher"):
        # 100 rows in batches of 8: 13 batches, 7 on process 0 and 6 on process 1.
        batches = importance_batches(train, 100, batch_size=8, pad_id=pad, regression=False, seed=0, processes=shared)
        with summed_over_processes(shared.sum if shared else None):
            scores = compute_importance(model, batches(), criterion, normalize=False)
        result[criterion] = [*scores.head_scores, *scores.neuron_scores]
    result["logits"] = predict_logits(model, test, batch_size=7, pad_id=pad, processes=processes)
    if processes.is_main:
        torch.save(result, out)
    close_processes()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
"""


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
    return env | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}


def _torchrun(*args: str, launcher: tuple[str, ...] = ("--standalone", "--nproc-per-node", "2")) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", *launcher, *args]


def _run(command: list[str], timeout: int = 240) -> subprocess.CompletedProcess:
    result = subprocess.run(command, capture_output=True, text=True, env=_env(), timeout=timeout)
    assert result.returncode == 0, result.stderr[:6000] + "\n...\n" + result.stderr[-1500:]
    return result


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A dropout-free tiny BERT, odd-sized toy SST-2 and the config file every run here uses."""
    root = tmp_path_factory.mktemp("distributed")
    model = make_tiny_model_dir(root / "model")
    config = json.loads((model / "config.json").read_text())
    config |= {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
    (model / "config.json").write_text(json.dumps(config))
    data = write_toy_sst2(root / "glue", n_train=241, n_test=81)
    settings = {
        "task": "sst2",
        "threads": 1,
        "model": {"name": str(model), "max_length": 32},
        "data": {"data_dir": str(data), "dev_fraction": 0.2},
        "finetune": {"epochs": 3, "learning_rate": 2e-3, "batch_size": 16, "warmup_ratio": 0.0},
    }
    path = root / "tiny.yaml"
    path.write_text(yaml.safe_dump(settings))
    return root, path


@pytest.fixture(scope="module")
def one_process(setup):
    """The reference: the same fine-tune in this one process."""
    from tinycompress.stages.finetune import finetune

    root, config = setup
    return finetune(load_config(config, {"workdir": str(root / "one")}))


def _only_checkpoint(workdir: Path, stage: str = "finetune"):
    folders = sorted(p.name for p in (workdir / "sst2").iterdir() if not p.name.startswith("."))
    assert folders == [f"{stage}-v1"], folders
    return read_checkpoint(workdir / "sst2" / f"{stage}-v1")  # verifies every file


def _check_like_one_process(checkpoint, one, world_size: int = 2) -> None:
    """Same loss curve and dev metrics as one process; metrics over every row, equal to one-process
    evaluation of the saved folder."""
    assert checkpoint.details["distributed"]["world_size"] == world_size
    got, want = checkpoint.details["history"], one.details["history"]
    assert [h["train_loss"] for h in got] == pytest.approx([h["train_loss"] for h in want], abs=1e-4)
    assert [h["dev/accuracy"] for h in got] == [h["dev/accuracy"] for h in want]
    for key in ("train_rows", "dev_rows", "test_rows", "original/test/accuracy"):
        assert checkpoint.metrics[key] == one.metrics[key], key
    assert checkpoint.metrics["test_rows"] == 81
    assert evaluate_target(str(checkpoint.path))["test/accuracy"] == checkpoint.metrics["test/accuracy"]
    dev = evaluate_predictor_dev(load_predictor(checkpoint), checkpoint.config, get_task("sst2"))
    assert dev["dev/accuracy"] == checkpoint.metrics["dev/accuracy"]


def test_batches_split_into_micro_batches_covering_every_row_once():
    assert split_evenly(list(range(5)), 4) == [[0, 1], [2], [3], [4]]
    assert split_evenly([7], 3) == [[7], [], []]
    for rows, world, accum in [(16, 2, 1), (16, 2, 2), (13, 2, 2), (1, 2, 2), (3, 4, 1)]:
        batch = list(range(100, 100 + rows))
        shares = [Processes("cpu", world_size=world, rank=r).micro_batches(batch, accum) for r in range(world)]
        real = [(part, weight) for share in shares for part, weight in share if weight > 0]
        assert sorted(i for part, _ in real for i in part) == batch
        # DDP averages over processes: the weights make that the mean over the batch's rows.
        assert sum(len(part) / len(batch) for part, _ in real) == pytest.approx(1.0)
        assert all(weight == pytest.approx(len(part) / rows * world) for part, weight in real)
        assert all(len(share) == accum for share in shares)  # every process steps alike
    assert Processes("cpu").micro_batches([3, 1, 2], 1) == [([3, 1, 2], 1.0)]


def test_one_process_at_fp32_trains_without_accelerate():
    model = torch.nn.Linear(2, 2)
    engine = Processes(torch.device("cpu")).engine(model, torch.optim.SGD(model.parameters(), lr=0.1), "fp32")
    assert engine.accelerator is None and engine.model is model


def test_gradient_accumulation_and_bf16_in_one_process(setup, one_process):
    from tinycompress.stages.finetune import finetune

    root, config = setup
    accumulated = finetune(load_config(config, {"workdir": str(root / "accum"), "finetune.grad_accum": 4}))
    assert accumulated.details["distributed"] == {
        "world_size": 1,
        "backend": "none",
        "precision": "fp32",
        "grad_accum": 4,
        "global_batch": 16,
        "micro_batch": 4,
    }
    losses = [h["train_loss"] for h in accumulated.details["history"]]
    assert losses == pytest.approx([h["train_loss"] for h in one_process.details["history"]], abs=1e-4)
    bf16 = finetune(load_config(config, {"workdir": str(root / "bf16"), "finetune.precision": "bf16"}))
    assert bf16.details["distributed"]["precision"] == "bf16"
    losses = [h["train_loss"] for h in bf16.details["history"]]
    assert losses == pytest.approx([h["train_loss"] for h in one_process.details["history"]], abs=0.02)
    # The saved weights are fp32 and the forward is plain again (no autocast left on the model).
    assert evaluate_target(str(bf16.path))["test/accuracy"] == bf16.metrics["test/accuracy"]


def test_torchrun_two_processes_match_one(setup, one_process):
    root, config = setup
    workdir = root / "torchrun"
    result = _run(
        _torchrun(
            "-m", "tinycompress", "finetune", "--config", str(config), "--workdir", str(workdir), "--grad-accum", "2"
        )
    )
    assert result.stdout.count("wrote ") == 1  # only process 0 prints
    checkpoint = _only_checkpoint(workdir)
    assert checkpoint.details["distributed"] == {
        "world_size": 2,
        "backend": "gloo",
        "precision": "fp32",
        "grad_accum": 2,
        "global_batch": 16,
        "micro_batch": 4,
    }
    _check_like_one_process(checkpoint, one_process)


def test_accelerate_launch_two_processes(setup, one_process):
    root, config = setup
    workdir = root / "accelerate"
    # On a machine without GPUs, Accelerate's torchrun-based launcher is --multi_gpu (its --cpu means MPI).
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    launcher += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    launcher += ["--main_process_port", str(_free_port())]
    _run([*launcher, "-m", "tinycompress", "finetune", "--config", str(config), "--workdir", str(workdir)])
    _check_like_one_process(_only_checkpoint(workdir), one_process)


def test_two_torchrun_machines_on_localhost(setup, one_process):
    root, config = setup
    workdir, port = root / "two-nodes", _free_port()
    launchers = []
    for node in (0, 1):
        launcher = ("--nnodes", "2", "--nproc-per-node", "1", "--node-rank", str(node), "--rdzv-backend", "c10d")
        launcher += ("--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "tinycompress-test")
        command = _torchrun(
            "-m", "tinycompress", "finetune", "--config", str(config), "--workdir", str(workdir), launcher=launcher
        )
        launchers.append(
            subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
        )
    outputs = [launcher.communicate(timeout=240) for launcher in launchers]
    assert [launcher.returncode for launcher in launchers] == [0, 0], [err[-2000:] for _, err in outputs]
    assert sum(out.count("wrote ") for out, _ in outputs) == 1
    _check_like_one_process(_only_checkpoint(workdir), one_process)


def test_importance_and_logits_from_two_processes_equal_one(setup, one_process):
    root, _ = setup
    script = root / "score.py"
    script.write_text(SCORING_SCRIPT)
    out = root / "scores-2.pt"
    _run(_torchrun(str(script), str(one_process.path), str(out)))
    two = torch.load(out, weights_only=False)
    runpy.run_path(str(script))["main"](str(one_process.path), str(root / "scores-1.pt"))
    one = torch.load(root / "scores-1.pt", weights_only=False)
    assert (two["world_size"], one["world_size"]) == (2, 1)
    for criterion in ("taylor", "fisher"):
        for got, want in zip(two[criterion], one[criterion], strict=True):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6 * float(want.abs().max()))
    # The same batches, each computed once: every row's logits, bit for bit.
    assert two["logits"].shape == (81, 2) and (two["logits"] == one["logits"]).all()


def test_prune_with_two_processes(setup, one_process):
    from tinycompress.checkpoint.workspace import parent_base
    from tinycompress.stages.prune import prune

    root, _ = setup
    flags = ["--ratio", "0.5", "--ffn-ratio", "0.3", "--recover-epochs", "1", "--importance-samples", "100"]
    workdir = root / "prune-2"
    _run(_torchrun("-m", "tinycompress", "prune", str(one_process.path), *flags, "--workdir", str(workdir)))
    two = _only_checkpoint(workdir, "prune")
    overrides = {
        "workdir": str(root / "prune-1"),
        "prune.ratio": 0.5,
        "prune.ffn_ratio": 0.3,
        "prune.recover_epochs": 1,
        "prune.importance_samples": 100,
    }
    one = prune(load_config(None, overrides, base=parent_base(one_process, "prune")), one_process)
    assert two.details["world_size"] == 2 and two.details["recovery"]["distributed"]["world_size"] == 2
    for key in ("heads_removed", "neurons_removed"):
        assert two.details[key] == one.details[key], key
    # Scores in the manifest are rounded to 4 significant digits.
    for got, want in zip(two.details["importance"]["heads"], one.details["importance"]["heads"], strict=True):
        assert got == pytest.approx(want, rel=1e-3)
    got, want = two.details["recovery"]["history"], one.details["recovery"]["history"]
    assert [h["train_loss"] for h in got] == pytest.approx([h["train_loss"] for h in want], abs=1e-3)
    assert two.metrics["pruned_no_recovery/test/accuracy"] == one.metrics["pruned_no_recovery/test/accuracy"]
    assert evaluate_target(str(two.path))["test/accuracy"] == two.metrics["test/accuracy"]


def _rank_of(process) -> str | None:
    try:
        return process.environ().get("RANK")
    except Exception:  # gone meanwhile, or not ours to read
        return None


def test_a_lost_peer_is_one_line_naming_it(monkeypatch):
    from tinycompress.training.distributed import peer_failure

    error = RuntimeError("[gloo/transport/tcp/pair.cc:537] Read error [127.0.0.1]:4010: Connection reset by peer.")
    assert peer_failure(error) is None  # not launched: a bug like any other
    monkeypatch.setenv("WORLD_SIZE", "2")
    line = peer_failure(error)
    assert line.startswith("another process of this run stopped") and "Connection reset by peer" in line
    assert peer_failure(RuntimeError("shape mismatch")) is None


def test_a_killed_process_stops_the_run_and_leaves_no_checkpoint(setup):
    import psutil

    root, config = setup
    workdir = root / "killed"
    command = _torchrun(
        "-m", "tinycompress", "finetune", "--config", str(config), "--workdir", str(workdir), "--epochs", "500"
    )
    launcher = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    try:
        seen = ""
        while "epoch 1/500" not in seen:  # process 0 logs each epoch: training is under way
            line = launcher.stderr.readline()
            assert line, seen[-2000:]
            seen += line
        workers = [p for p in psutil.Process(launcher.pid).children(recursive=True) if _rank_of(p) == "1"]
        assert len(workers) == 1
        workers[0].send_signal(signal.SIGKILL)
        killed = time.monotonic()
        launcher.communicate(timeout=120)
    finally:
        if launcher.poll() is None:
            launcher.kill()
    assert launcher.returncode != 0
    assert time.monotonic() - killed < 60
    assert not [p.name for p in (workdir / "sst2").iterdir() if p.name.startswith("finetune-v")]


@pytest.mark.parametrize(
    "args",
    [["run"], ["quantize"], ["export"], ["report"], ["evaluate", "default"], ["predict", "runs/x", "a film"]],
)
def test_single_process_commands_refuse_under_a_launcher(args):
    launched = {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"}
    assert_one_line_error(
        runner.invoke(app, args, env=launched), f"{args[0]} runs in one process", "finetune and prune"
    )
    # The other processes exit non-zero without repeating the line.
    quiet = runner.invoke(app, args, env=launched | {"RANK": "1", "LOCAL_RANK": "1"})
    assert quiet.exit_code == 1 and quiet.output == ""


@pytest.mark.parametrize(
    "flags, needle",
    [
        (["--precision", "fp16"], "--precision fp16 needs a CUDA device"),
        (["--batch-size", "15", "--grad-accum", "2"], "does not split into 1 process(es) × --grad-accum 2"),
    ],
)
def test_training_setups_that_cannot_work_are_refused(setup, tmp_path, flags, needle):
    _, config = setup
    result = runner.invoke(app, ["finetune", "--config", str(config), "--workdir", str(tmp_path), *flags])
    assert_one_line_error(result, needle)
    assert not (tmp_path / "sst2").exists() or not list((tmp_path / "sst2").glob("finetune-v*"))


def test_env_shows_the_processes():
    launched = {"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1"}
    report = json.loads(runner.invoke(app, ["env", "--json"], env=launched).stdout)
    assert (report["world_size"], report["rank"], report["local_rank"]) == (2, 1, 1)
    assert report["backend"] == ("nccl" if torch.cuda.is_available() else "gloo")
    alone = json.loads(runner.invoke(app, ["env", "--json"], env={k: "" for k in LAUNCH_VARS}).stdout)
    assert alone["world_size"] == 1 and alone["backend"] == "none (one process)" and "devices" in alone
