"""Several processes: who this one is, which rows it takes, what it shares, and how it trains.

    torchrun --nproc-per-node 2 -m tinycompress finetune --task sst2
    accelerate launch --num_processes 2 -m tinycompress prune --speedup 2

Everything distributed lives here, on Hugging Face Accelerate: its ``PartialState`` reads the
launcher's environment (torchrun, ``accelerate launch``) and starts the process group (gloo on
CPU, NCCL on CUDA), and its ``Accelerator`` wraps the model for training (DDP, mixed precision).
A run that was not launched with several processes never starts a process group and, at fp32,
never builds an ``Accelerator``: it trains exactly as a single process always has.

The rules (README, "Training on several processes, GPUs or machines"):

* ``finetune.batch_size`` is the batch of one optimizer step over all processes. Every process
  computes the same seeded batch order; each batch is cut into ``world_size × grad_accum``
  contiguous slices (as even as possible), process r taking slices ``r·K .. r·K + K - 1`` as its
  micro-batches. Each micro-batch's mean loss is weighted by its share of the batch's rows times
  ``world_size``, so DDP's gradient average is the single-process batch mean. A slice left empty
  (a short last batch) runs one row with weight 0: every process joins every gradient all-reduce.
* Evaluation and importance scoring take whole batches of the single-process order, batch i on
  process ``i % world_size``; logits are gathered with their row indices (every row exactly once),
  importance sums are all-reduced before any normalisation.
* Only process 0 writes a checkpoint; the others wait and then read the folder it wrote.

torch and accelerate are imported inside the functions, so the CLI (which reads the launcher's
environment to refuse single-process commands) stays free of them.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from tinycompress.errors import TinycompressError

if TYPE_CHECKING:
    import numpy as np
    import torch

    from tinycompress.checkpoint.store import Checkpoint

T = TypeVar("T")

# Collectives give up after this long (then every process exits non-zero). Generous: while
# process 0 measures the cost table of `prune --speedup` (minutes on a small CPU) or writes the
# checkpoint, the others wait at a barrier. A process that dies closes its connections, which
# the others notice at their next collective, long before this.
COLLECTIVE_TIMEOUT_SECONDS = 30 * 60
TIMEOUT_ENV = "TINYCOMPRESS_COLLECTIVE_TIMEOUT"


def launched_world_size() -> int:
    """The number of processes the launcher started (``$WORLD_SIZE``, set by torchrun and
    ``accelerate launch``); 1 when not launched."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE") or 1))
    except ValueError:
        return 1


def launched_rank() -> int:
    """This process's rank among :func:`launched_world_size` (``$RANK``); 0 when not launched."""
    try:
        return int(os.environ.get("RANK") or 0)
    except ValueError:
        return 0


def refuse_under_launcher(command: str) -> None:
    """One-line error for a single-process command started by torchrun / accelerate launch."""
    world = launched_world_size()
    if world > 1:
        raise TinycompressError(
            f"{command} runs in one process, but was launched as {world} processes",
            "launch it without torchrun / accelerate launch (finetune and prune can be launched with N processes)",
        )


# How collectives fail when a peer process is gone (gloo, NCCL, the c10d store).
_PEER_FAILURE_MARKERS = ("gloo", "NCCL", "Connection reset", "Connection closed", "Broken pipe", "timed out")


def peer_failure(exc: BaseException) -> str | None:
    """One line for a collective that failed because another process of the run died or hung
    (under a launcher); None for any other error."""
    if launched_world_size() == 1 or not isinstance(exc, RuntimeError):
        return None
    text = " ".join(str(exc).split())
    if not (type(exc).__name__.startswith("Dist") or any(marker in text for marker in _PEER_FAILURE_MARKERS)):
        return None
    return (
        f"another process of this run stopped or stopped answering ({text[:160]}) — see its error above; "
        "a checkpoint folder only appears complete, written by process 0 at the end"
    )


def launch_report() -> dict[str, Any]:
    """What ``tinycompress env`` says about processes and devices, from the launcher's
    environment variables; no process group is started."""
    import torch

    world = launched_world_size()
    cuda = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if cuda:
        names = [torch.cuda.get_device_name(i) for i in range(cuda)]
        devices = f"{cuda} CUDA: " + ", ".join(f"cuda:{i} {name}" for i, name in enumerate(names))
    else:
        devices = "cpu only (no CUDA device)"
    backend = ("nccl" if cuda else "gloo") if world > 1 else "none (one process)"
    return {
        "world_size": world,
        "rank": launched_rank(),
        "local_rank": int(os.environ.get("LOCAL_RANK") or 0),
        "nodes": os.environ.get("GROUP_WORLD_SIZE") or os.environ.get("NNODES") or "1",
        "backend": backend,
        "devices": devices,
    }


def split_evenly(items: Sequence[T], parts: int) -> list[list[T]]:
    """``items`` cut into ``parts`` contiguous slices whose lengths differ by at most one (the
    longer ones first); some are empty when there are fewer items than parts."""
    size, extra = divmod(len(items), parts)
    out, start = [], 0
    for part in range(parts):
        end = start + size + (1 if part < extra else 0)
        out.append(list(items[start:end]))
        start = end
    return out


@dataclass(frozen=True)
class Processes:
    """The processes of this run and this one's place among them (one process: the defaults)."""

    device: Any
    world_size: int = 1
    rank: int = 0
    local_rank: int = 0
    backend: str | None = None

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def share(self, items: Sequence[T]) -> list[T]:
        """This process's share of ``items`` (whole batches): item i goes to process ``i % world_size``."""
        return list(items[self.rank :: self.world_size])

    def micro_batches(self, indices: Sequence[int], grad_accum: int) -> list[tuple[list[int], float]]:
        """(rows, loss weight) of this process's ``grad_accum`` micro-batches of one optimizer-step
        batch (see the module docstring); one process, no accumulation: ``[(indices, 1.0)]``."""
        if self.world_size == 1 and grad_accum == 1:
            return [(list(indices), 1.0)]
        slices = split_evenly(indices, self.world_size * grad_accum)
        mine = slices[self.rank * grad_accum : (self.rank + 1) * grad_accum]
        # An empty slice still runs a forward/backward (weight 0) so that every process takes
        # part in every gradient all-reduce.
        return [(rows, len(rows) / len(indices) * self.world_size) if rows else ([indices[0]], 0.0) for rows in mine]

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` summed over the processes (every process gets the sum); itself in one process."""
        if not self.distributed:
            return tensor
        from accelerate.utils import reduce

        return reduce(tensor, reduction="sum")

    def gather_rows(self, rows: list[int], values: np.ndarray | None, total: int) -> np.ndarray:
        """The ``[total, ...]`` array whose row ``rows[j]`` is ``values[j]``, assembled on every
        process from every process's rows; each of the ``total`` rows must come exactly once."""
        import numpy as np

        parts = [(rows, values)]
        if self.distributed:
            from accelerate.utils import gather_object

            parts = gather_object(parts)
        all_rows = np.asarray([r for part_rows, _ in parts for r in part_rows], dtype=np.int64)
        counts = np.bincount(all_rows, minlength=total) if len(all_rows) else np.zeros(total, dtype=np.int64)
        if len(counts) != total or (counts != 1).any():
            raise RuntimeError(f"gathered rows do not cover 0..{total - 1} exactly once")
        shaped = [v for _, v in parts if v is not None and len(v)]
        if not shaped:
            return np.zeros((0, 1), dtype=np.float32)
        out = np.zeros((total, *shaped[0].shape[1:]), dtype=shaped[0].dtype)
        for part_rows, part_values in parts:
            if part_rows:
                out[np.asarray(part_rows)] = part_values
        return out

    def broadcast(self, value: T) -> T:
        """Process 0's ``value`` (picklable), on every process."""
        if not self.distributed:
            return value
        from accelerate.utils import broadcast_object_list

        return broadcast_object_list([value], from_process=0)[0]

    def barrier(self) -> None:
        if self.distributed:
            from accelerate import PartialState

            PartialState().wait_for_everyone()

    def sync_module(self, module) -> None:
        """Copy process 0's parameters and buffers into ``module`` on every process (after work
        each process did alike, so that last-bit differences between machines cannot linger)."""
        if not self.distributed:
            return
        import torch.distributed as dist

        for tensor in [*module.parameters(), *module.buffers()]:
            dist.broadcast(tensor.data, src=0)

    def on_main(self, work: Callable[[], T]) -> T:
        """``work()`` on process 0 only, its (picklable) result broadcast to every process; the
        others wait meanwhile. An error on process 0 stops every process."""
        if not self.distributed:
            return work()
        result, failure = None, None
        if self.is_main:
            try:
                result = work()
            except BaseException as exc:
                failure = exc
        shared = self.broadcast(("failed", None) if failure is not None else ("ok", result))
        if failure is not None:
            raise failure
        if shared[0] == "failed":
            raise TinycompressError("process 0 failed; its error is above", "fix that error and launch again")
        return shared[1]

    def write_on_main(self, write: Callable[[], Checkpoint]) -> Checkpoint:
        """Process 0 writes the checkpoint (atomically, as in one process); every process returns
        it: read and verified where the folder is visible (a shared file system), else as process
        0 saw it (its path and manifest)."""
        from pathlib import Path

        from tinycompress.checkpoint.store import Checkpoint, read_checkpoint

        if not self.distributed:
            return write()
        written: list[Checkpoint] = []

        def work() -> tuple[str, dict[str, Any]]:
            written.append(write())
            return str(written[0].path), written[0].manifest

        path, manifest = self.on_main(work)
        if written:
            return written[0]
        return read_checkpoint(path) if Path(path).is_dir() else Checkpoint(Path(path), manifest)

    def check_training(self, settings, device) -> None:
        """Refuse a batch that does not split into ``world_size × grad_accum`` equal micro-batches,
        and fp16 without CUDA, before any data is loaded."""
        parts = self.world_size * settings.grad_accum
        if settings.batch_size % parts:
            fits = max(parts, settings.batch_size // parts * parts)
            raise TinycompressError(
                f"--batch-size {settings.batch_size} (the batch of one optimizer step, over all processes) does not "
                f"split into {self.world_size} process(es) × --grad-accum {settings.grad_accum} = {parts} equal "
                "micro-batches",
                f"use a multiple of {parts} (e.g. --batch-size {fits}) or change --grad-accum / the process count",
            )
        if settings.precision == "fp16" and getattr(device, "type", str(device)) != "cuda":
            raise TinycompressError(
                f"--precision fp16 needs a CUDA device, and this run trains on {device}",
                "use --precision bf16 or fp32, or --device cuda",
            )

    def engine(self, model, optimizer, precision: str) -> Engine:
        """The training engine: Accelerate's (DDP, mixed precision) when there are several
        processes or the precision is not fp32, else plain torch -- exactly the loop of one process."""
        if not self.distributed and precision == "fp32":
            return Engine(model, optimizer)
        return _accelerated(model, optimizer, precision, cpu=self.device.type == "cpu", distributed=self.distributed)

    def setup(self, settings) -> dict[str, Any]:
        """How training is spread, for the manifest."""
        return {
            "world_size": self.world_size,
            "backend": self.backend or "none",
            "precision": settings.precision,
            "grad_accum": settings.grad_accum,
            "global_batch": settings.batch_size,
            "micro_batch": settings.batch_size // (self.world_size * settings.grad_accum),
        }


def start_processes(device: torch.device) -> Processes:
    """This process's :class:`Processes`: when launched with several, start (once) the process
    group through Accelerate's ``PartialState`` -- gloo for a CPU ``device``, NCCL for CUDA, each
    process on its own GPU (``cuda:<local rank>``)."""
    if launched_world_size() == 1:
        return Processes(device)
    if device.type not in ("cpu", "cuda"):
        raise TinycompressError(
            f"several processes train on CPU or CUDA, not {device.type}", "use --device cpu or cuda, or one process"
        )
    from datetime import timedelta

    from accelerate import PartialState

    timeout = timedelta(seconds=float(os.environ.get(TIMEOUT_ENV) or COLLECTIVE_TIMEOUT_SECONDS))
    state = PartialState(cpu=device.type == "cpu", timeout=timeout)
    return Processes(
        state.device,
        world_size=state.num_processes,
        rank=state.process_index,
        local_rank=state.local_process_index,
        backend=state.backend,
    )


def close_processes() -> None:
    """Leave the process group after a run that succeeded on this process, so that processes ending
    at slightly different times do not tear down connections the others still hold. A no-op when
    none was started (torch is not even imported then)."""
    import sys

    if "torch.distributed" not in sys.modules:
        return
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        # A peer that failed after this one's work was done (its error is its own) must not turn
        # this success into a traceback.
        with contextlib.suppress(Exception):
            dist.barrier()
            dist.destroy_process_group()


@dataclass
class Engine:
    """Plain torch: what one process at fp32 has always done. :func:`_accelerated` gives the
    same interface on Accelerate."""

    model: Any
    optimizer: Any
    accelerator: Any = field(default=None, repr=False)

    def no_sync(self):
        """Gradients of the micro-batches inside stay local (no all-reduce until the last one)."""
        return self.accelerator.no_sync(self.model) if self.accelerator else contextlib.nullcontext()

    def autocast(self):
        """Mixed precision for the forward pass and loss (nothing at fp32)."""
        return self.accelerator.autocast() if self.accelerator else contextlib.nullcontext()

    def backward(self, loss) -> None:
        if self.accelerator:
            self.accelerator.backward(loss)
        else:
            loss.backward()

    def clip_grad_norm_(self, max_norm: float) -> None:
        if self.accelerator:
            self.accelerator.clip_grad_norm_(self.model.parameters(), max_norm)
        else:
            import torch

            torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)

    @property
    def step_was_skipped(self) -> bool:
        """fp16 only: the loss scaler skipped the optimizer step (inf/NaN gradients)."""
        return bool(self.accelerator and self.accelerator.optimizer_step_was_skipped)

    def module(self):
        """The model itself (no DDP wrapper), e.g. to evaluate; still under mixed precision."""
        return self.accelerator.unwrap_model(self.model) if self.accelerator else self.model

    def finish(self):
        """The plain model after training: no DDP wrapper, no mixed-precision forward."""
        if not self.accelerator:
            return self.model
        model = self.accelerator.unwrap_model(self.model, keep_fp32_wrapper=False)
        self.accelerator.free_memory()
        return model


def _accelerated(model, optimizer, precision: str, *, cpu: bool, distributed: bool) -> Engine:
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    mixed = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[precision]
    state = AcceleratorState._shared_state
    if not distributed and state and state.get("_mixed_precision") != mixed:
        # One process, a second training with another precision (the Python API): Accelerate
        # keeps one precision per process, and there is no process group to lose.
        AcceleratorState._reset_state(reset_partial_state=True)
    accelerator = Accelerator(mixed_precision=mixed, cpu=cpu)
    wrapped_model, wrapped_optimizer = accelerator.prepare(model, optimizer)
    return Engine(wrapped_model, wrapped_optimizer, accelerator)
