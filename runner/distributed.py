"""One run in several processes: torchrun's environment, the process group, what the processes share.

A distributed run is started by ``torchrun`` (``torch.distributed.run``): directly, possibly on
several nodes (``torchrun --nproc-per-node N -m runner run SPEC``), or on this machine by
``runner run SPEC --nproc N`` (:func:`launch`, torchrun's launcher in this process). Every process
runs the same command; torchrun gives each its ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and the
address of its key-value store (``MASTER_ADDR``, ``MASTER_PORT``). :func:`session` joins the
process group and hands the command a :class:`Collective`:

* rank 0 decides and the others take its decision (:meth:`Collective.from_rank0`): the device,
  upstream runs, the plan, the run row, the frozen features, each epoch's metrics (so early
  stopping and plateau schedulers decide alike). Only rank 0 reads and writes the store, the
  checkpoints and the initial weights files: the other ranks receive the weights by broadcast
  (:meth:`Collective.prepare`), so a node needs the data and the spec, not the store;
* training shards every split (:class:`runner.data.Shard`), wraps the trained module in
  DistributedDataParallel (:meth:`Collective.wrap`), reseeds each rank's generators every epoch
  from (seed, rank, epoch) (:meth:`Collective.start_epoch`, which a resume re-derives) and adds up
  metric sums, counts and confusion matrices over the ranks (:meth:`Collective.sum`);
* a rank that fails writes its error into torchrun's store before it exits; rank 0, stopped by the
  broken connection or by torchrun's SIGTERM, stores the run ``failed`` with that error
  (:meth:`Collective.failure_elsewhere`). The other ranks ignore SIGINT and SIGTERM while training:
  rank 0 alone decides whether a signal means ``interrupted``. Nothing waits for a collective's
  timeout: a dead peer breaks gloo's connections at once, and torchrun ends the rest (SIGTERM,
  then SIGKILL 30 s later).

Backends: NCCL on CUDA, each process pinned to the GPU of its ``LOCAL_RANK``
(``torch.cuda.set_device`` only then); gloo otherwise. ``performance.sync_batchnorm: auto``
converts BatchNorm to SyncBatchNorm on CUDA only: PyTorch's SyncBatchNorm refuses CPU tensors.

One process started without torchrun gets :data:`ONE_PROCESS`, whose every operation is the identity.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import logging
import os
import signal
import sys
import tempfile
import traceback
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping, TypeVar

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from runner import rng
from runner.data import Shard
from runner.errors import RunnerError, SpecError
from runner.lifecycle import STOP_SIGNALS, stop_on_signals

T = TypeVar("T")
TORCHRUN_ENV = ("RANK", "WORLD_SIZE")
LAUNCHER_SIGNALS = ("SIGTERM", "SIGINT", "SIGHUP", "SIGQUIT")  # those torchrun's launcher takes over


# ------------------------------------------------------------------------------------------
# Decisions the plan records (pure: no process group needed)


def backend_for(device: torch.device) -> str:
    """NCCL for CUDA tensors; gloo for the CPU (torchvision's reference scripts hard-code nccl: that is what to avoid)."""
    return "nccl" if device.type == "cuda" else "gloo"


def check_device(requested: str, device: torch.device) -> None:
    """A distributed run gives every process its own GPU (by local rank): a fixed one, or MPS, cannot be shared out."""
    if device.type == "mps":
        raise SpecError("device: mps cannot train with several processes (torch.distributed has no MPS backend); use cpu")
    if device.type == "cuda" and ":" in requested:
        raise SpecError(f"device: {requested} names one GPU, but each process of a distributed run uses the GPU of its "
                        "LOCAL_RANK; use cuda or auto (and CUDA_VISIBLE_DEVICES to choose the GPUs)")


def sync_batchnorm_decision(requested: str, device: torch.device, model: nn.Module, world_size: int) -> tuple[bool, str | None]:
    """Whether BatchNorm layers become SyncBatchNorm (statistics over the global batch), and why not."""
    if not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        return False, "the model has no BatchNorm layer"
    if requested == "off":
        return False, "switched off in the spec"
    if device.type != "cuda":
        if requested == "on":
            raise SpecError(f"performance.sync_batchnorm: on needs CUDA devices (PyTorch's SyncBatchNorm refuses "
                            f"{device.type} tensors); use auto or off")
        return False, f"PyTorch's SyncBatchNorm runs on CUDA only, this run uses {device.type}"
    if world_size == 1:
        return False, "one process"
    return True, None


def seed_for(seed: int, rank: int, epoch: int) -> int:
    """The seed of one rank's generators for one epoch: independent streams, the same after a resume."""
    return int(np.random.SeedSequence([seed, rank, epoch]).generate_state(1)[0])


def weights_digest(model: nn.Module) -> str:
    """sha256 of every parameter and buffer, bit for bit (names included)."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


# ------------------------------------------------------------------------------------------
# What torchrun tells a process


@dataclass(frozen=True)
class Launch:
    """This process's place in a run started by torchrun."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    restart: int  # torchrun restarts the whole group with --max-restarts; keys of an earlier attempt are stale

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] = os.environ) -> Launch | None:
        """None when torchrun did not start this process (no ``RANK`` and ``WORLD_SIZE``)."""
        if not all(environ.get(key) for key in TORCHRUN_ENV):
            return None
        try:
            world_size = int(environ["WORLD_SIZE"])
            return cls(rank=int(environ["RANK"]), world_size=world_size, local_rank=int(environ.get("LOCAL_RANK", "0")),
                       local_world_size=int(environ.get("LOCAL_WORLD_SIZE", str(world_size))),
                       restart=int(environ.get("TORCHELASTIC_RESTART_COUNT", "0")))
        except ValueError:
            values = ", ".join(f"{k}={environ.get(k)!r}" for k in (*TORCHRUN_ENV, "LOCAL_RANK", "LOCAL_WORLD_SIZE"))
            raise RunnerError(f"torchrun's environment is not a set of numbers: {values}") from None


# ------------------------------------------------------------------------------------------
# The collective: one process alone, or a process group


@dataclass(frozen=True)
class RankFailure:
    """What a rank wrote into torchrun's store before it exited on an error."""

    rank: int
    error: str  # "ValueError: …"
    traceback: str
    exit_code: int

    def describe(self) -> str:
        return f"rank {self.rank}: {self.error}"


class OtherRankFailed(RunnerError):
    """Rank 0 stopped because another rank failed: the other rank's error, in one line."""

    def __init__(self, failure: RankFailure) -> None:
        super().__init__(failure.describe())
        self.failure = failure
        self.exit_code = failure.exit_code


class Rank0Stopped(SystemExit):
    """Rank 0 failed while deciding for everyone: the other ranks exit with its code and say nothing (rank 0 did)."""


class Collective:
    """The run's processes as one process sees them. This base is one process alone: every operation is the identity."""

    rank = 0
    world_size = 1
    local_world_size = 1
    device: torch.device | None = None  # None: the plan's
    shard: Shard | None = None

    @property
    def is_writer(self) -> bool:
        """Whether this process reads and writes the store and the run's files (rank 0)."""
        return self.rank == 0

    @property
    def planned_world_size(self) -> int | None:
        """What :func:`runner.plan.plan` is told: None for one process without a process group."""
        return None

    def from_rank0(self, compute: Callable[[], T]) -> T:
        """What ``compute()`` gives on rank 0, on every rank (only rank 0 calls it)."""
        return compute()

    def sum(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """The tensors summed over the ranks, in place (metric sums, counts, confusion matrices)."""
        return tensors

    def prepare(self, model: nn.Module, sync_batchnorm: bool) -> None:
        """Ready a freshly built model: SyncBatchNorm where planned, then rank 0's weights on every rank."""

    def wrap(self, module: nn.Module) -> nn.Module:
        """The module the optimizer steps through: DistributedDataParallel over its parameters that train now."""
        return module

    def share_buffers(self, model: nn.Module) -> None:
        """Rank 0's buffers (BatchNorm statistics) on every rank, after a training epoch (timm's ``distribute_bn``).

        DistributedDataParallel broadcasts them at the start of each forward, so after an epoch's last
        step each rank holds the statistics of its own last batch; validation, checkpoints and the
        final weights use rank 0's, as the next forward would.
        """

    def start_epoch(self, epoch: int, loader: Any, seed: int) -> None:
        """Reshuffle the training shards and reseed this rank's generators for ``epoch``."""

    def check_same_weights(self, model: nn.Module, when: str) -> None:
        """Raise when the ranks hold different weights."""

    def failure_elsewhere(self) -> RankFailure | None:
        """The error another rank reported before it exited, if any (rank 0 asks when training stopped)."""
        return None

    def resume_command(self, run_id: str) -> str:
        return f"runner resume {run_id}"


ONE_PROCESS = Collective()


class ProcessGroup(Collective):
    """One rank of a run started by torchrun, in the default process group."""

    def __init__(self, launch: Launch, device: torch.device, store: Any) -> None:
        self.rank, self.world_size, self.local_world_size = launch.rank, launch.world_size, launch.local_world_size
        self.device = device
        self.shard = Shard(launch.rank, launch.world_size)
        self._side = dist.PrefixStore(f"runner/{launch.restart}", store)  # failures, beside the process group's keys

    @property
    def planned_world_size(self) -> int | None:
        return self.world_size

    def _object_device(self) -> torch.device | None:
        return self.device if self.device is not None and self.device.type == "cuda" else None

    def from_rank0(self, compute: Callable[[], T]) -> T:
        payload: list[Any] = [None]
        if self.rank == 0:
            try:
                payload = [("value", compute())]
            except BaseException as exc:
                # the others stop with rank 0's exit code instead of waiting for a broken connection
                with contextlib.suppress(Exception):
                    dist.broadcast_object_list([("stopped", exit_code_of(exc))], src=0, device=self._object_device())
                raise
        dist.broadcast_object_list(payload, src=0, device=self._object_device())
        kind, value = payload[0]
        if kind == "stopped":
            raise Rank0Stopped(value)
        return value

    def sum(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        for tensor in tensors:
            dist.all_reduce(tensor)
        return tensors

    def prepare(self, model: nn.Module, sync_batchnorm: bool) -> None:
        if sync_batchnorm:  # in place: the layers keep their parameters and buffers (and state dict names)
            nn.SyncBatchNorm.convert_sync_batchnorm(model)
        model.to(self.device)
        self._broadcast(model.state_dict().values())  # only rank 0 read the initial weights
        self.check_same_weights(model, "at the start")

    def share_buffers(self, model: nn.Module) -> None:
        self._broadcast(model.buffers())

    def _broadcast(self, tensors: Any) -> None:
        """Rank 0's values into every rank's tensors, in place."""
        with torch.no_grad():
            for tensor in tensors:
                flat = tensor.contiguous()
                dist.broadcast(flat, src=0)
                if flat.data_ptr() != tensor.data_ptr():
                    tensor.copy_(flat)

    def wrap(self, module: nn.Module) -> nn.Module:
        if not any(p.requires_grad for p in module.parameters()):
            return module
        device_ids = [self.device.index] if self.device is not None and self.device.type == "cuda" else None
        # init_sync=False: every rank holds rank 0's weights already (prepare), no broadcast per stage.
        # The wrapper of an earlier stage keeps its gradient hooks until it is collected, but they do
        # nothing: a reducer acts only on the backward pass that follows its own forward.
        return DistributedDataParallel(module, device_ids=device_ids, init_sync=False)

    def start_epoch(self, epoch: int, loader: Any, seed: int) -> None:
        sampler = getattr(loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)  # without it every epoch repeats the same order (pytorch #31771)
        rank_seed = seed_for(seed, self.rank, epoch)
        rng.seed_generators(rank_seed)  # augmentation, dropout: different on each rank, re-derived on resume
        generator = getattr(loader, "generator", None)
        if generator is not None:
            generator.manual_seed(rank_seed)

    def check_same_weights(self, model: nn.Module, when: str) -> None:
        digests: list[Any] = [None] * self.world_size
        dist.all_gather_object(digests, weights_digest(model))
        if len(set(digests)) != 1:
            listed = ", ".join(f"rank {rank} {digest[:12]}" for rank, digest in enumerate(digests))
            raise RunnerError(f"the processes hold different weights {when} (sha256 {listed})")

    def report_failure(self, exc: BaseException) -> None:
        """Tell rank 0 why this rank stops (before it exits); never raises."""
        record = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc(), "exit_code": exit_code_of(exc)}
        try:
            self._side.set(f"failure/{self.rank}", json.dumps(record))
        except Exception:  # noqa: BLE001 - the store went with rank 0: nobody is left to tell
            pass

    def failure_elsewhere(self) -> RankFailure | None:
        for rank in range(self.world_size):
            key = f"failure/{rank}"
            try:
                if rank == self.rank or not self._side.check([key]):
                    continue
                return RankFailure(rank=rank, **json.loads(self._side.get(key)))
            except Exception:  # noqa: BLE001 - an unreachable store knows nothing
                return None
        return None

    def resume_command(self, run_id: str) -> str:
        if self.local_world_size == self.world_size:
            return f"runner resume {run_id} --nproc {self.world_size}"
        return f"torchrun … -m runner resume {run_id} (on {self.world_size} processes)"

    def leave(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()


def exit_code_of(exc: BaseException) -> int:
    """The exit code the command line gives ``exc`` (see :func:`runner.cli.main`)."""
    if isinstance(exc, SystemExit):
        return exc.code if isinstance(exc.code, int) else 1
    code = getattr(exc, "exit_code", None)
    if isinstance(code, int):
        return code
    if isinstance(exc, KeyboardInterrupt):
        return 130
    return 2 if isinstance(exc, RunnerError) else 1


# ------------------------------------------------------------------------------------------
# Joining and leaving


def _device_of(kind: str, launch: Launch) -> torch.device:
    device = torch.device(kind)
    if device.type != "cuda":
        return device
    count = torch.cuda.device_count()
    if launch.local_rank >= count:
        raise RunnerError(f"LOCAL_RANK {launch.local_rank} has no GPU: this node has {count} CUDA device(s) for "
                          f"{launch.local_world_size} processes")
    device = torch.device("cuda", launch.local_rank)
    torch.cuda.set_device(device)  # only when CUDA is used: "cuda" now means this process's GPU
    return device


def join(launch: Launch, decide_device: Callable[[], str]) -> ProcessGroup:
    """Join the process group: rank 0 decides the device (``decide_device()``), the backend follows from it."""
    try:
        store, _rank, _world = next(dist.rendezvous("env://"))
    except ValueError as exc:  # a missing MASTER_ADDR / MASTER_PORT
        raise RunnerError(f"cannot join the other processes: {exc}") from None
    side = dist.PrefixStore(f"runner/{launch.restart}", store)
    if launch.rank == 0:
        try:
            kind = decide_device()
        except BaseException as exc:
            side.set("device", json.dumps({"stopped": exit_code_of(exc)}))
            raise
        side.set("device", json.dumps({"device": kind}))
    decided = json.loads(side.get("device"))  # the others wait here for rank 0
    if "stopped" in decided:
        raise Rank0Stopped(decided["stopped"])
    device = _device_of(decided["device"], launch)
    backend = backend_for(device)
    dist.init_process_group(backend, store=dist.PrefixStore("default_pg", store), rank=launch.rank, world_size=launch.world_size,
                            device_id=device if backend == "nccl" else None)
    return ProcessGroup(launch, device, store)


@contextlib.contextmanager
def session(decide_device: Callable[[], str], debug: bool = False) -> Iterator[Collective]:
    """This process's :class:`Collective` for one command: a process group under torchrun, else :data:`ONE_PROCESS`.

    ``decide_device`` (called on rank 0 only) names the device, e.g. ``"cuda"``. A rank other than 0
    that fails reports its error to rank 0 and exits without a word (rank 0 tells the user);
    rank 0 stopped by a broken connection or a SIGTERM says which rank failed and why.
    """
    launch = Launch.from_environment()
    if launch is None:
        yield ONE_PROCESS
        return
    group = join(launch, decide_device)
    try:
        with stop_on_signals():  # torchrun's SIGTERM (another rank failed) must not kill a rank mid-sentence
            yield group
    except SystemExit:
        _ignore_stop_signals()
        raise
    except BaseException as exc:
        _ignore_stop_signals()  # ending anyway: the error must be stored and said, whatever torchrun sends now
        if group.rank != 0:
            group.report_failure(exc)
            if debug:
                raise
            raise SystemExit(exit_code_of(exc)) from None
        elsewhere = group.failure_elsewhere()
        if elsewhere is not None and not _explained(exc):
            raise OtherRankFailed(elsewhere) from exc
        raise
    group.leave()


def _ignore_stop_signals() -> None:
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)


def _explained(exc: BaseException) -> bool:
    """Rank 0's own error, already worded for the user (not a broken connection or torchrun's SIGTERM)."""
    return isinstance(exc, RunnerError) or isinstance(getattr(exc, "exit_code", None), int)


# ------------------------------------------------------------------------------------------
# Launching: `runner run SPEC --nproc N`


def launch(nproc: int, runner_args: list[str], debug: bool = False) -> int:
    """``python -m runner ARGS`` in ``nproc`` processes on this machine through torchrun's launcher; the exit code.

    The launcher runs in this process, as ``torchrun --standalone`` would: a signal to this process
    goes on to the workers (whose rank 0 stores the run ``interrupted``); a failed worker makes it
    stop the others. Rank 0 says what happened; this adds a line only when rank 0 could not.
    """
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    if nproc < 1:
        raise RunnerError(f"--nproc must be at least 1, got {nproc}")
    if Launch.from_environment() is not None:
        raise RunnerError("--nproc starts torchrun, but this process already runs under torchrun; leave --nproc out")
    # torchrun's per-launch directory (the workers' error files) would otherwise stay behind in /tmp;
    # the failures are read from it before torchrun returns
    with tempfile.TemporaryDirectory(prefix="runner-torchrun-", ignore_cleanup_errors=True) as log_dir, _launcher_leaves_no_trace(debug):
        args = torchrun.parse_args(["--standalone", f"--nproc-per-node={nproc}", "--log-dir", log_dir, "--module", "runner",
                                    *runner_args])
        try:
            torchrun.run(args)
        except ChildFailedError as exc:
            return _exit_code_of_workers(exc.failures)
        except SignalException as exc:
            signalled = 128 + int(exc.sigval)
        else:
            return 0
    # On a signal torchrun leaves its rendezvous open (for other nodes to rescale): the handler's
    # keep-alive thread runs until the handler is garbage-collected. When a collection that the
    # keep-alive thread itself triggered does it, the finalizer cannot join that thread and prints
    # a traceback; collect now, in this thread, as soon as the launcher's frames are gone.
    gc.collect()
    return signalled


def _exit_code_of_workers(failures: dict[int, Any]) -> int:
    """Rank 0's exit code when it exited on its own (it said why); otherwise one line naming the first failure."""
    rank0 = failures.get(0)
    if rank0 is not None and rank0.exitcode > 0:
        return int(rank0.exitcode)
    rank, failure = (0, rank0) if rank0 is not None else min(failures.items(), key=lambda item: item[1].timestamp)
    how = f"was killed by {failure.signal_name()}" if failure.exitcode < 0 else f"exited with code {failure.exitcode}"
    print(f"error: rank {rank} (pid {failure.pid}) {how}", file=sys.stderr)
    return 1


@contextlib.contextmanager
def _launcher_leaves_no_trace(debug: bool) -> Iterator[None]:
    """torchrun's launcher sets environment variables and signal handlers for good, and logs at length: undo both."""
    saved_env = {key: os.environ.get(key) for key in ("OMP_NUM_THREADS", "TORCHELASTIC_SIGNALS_TO_HANDLE")}
    saved_handlers = {name: signal.getsignal(getattr(signal, name)) for name in LAUNCHER_SIGNALS if hasattr(signal, name)}
    if not debug:
        logging.disable(logging.CRITICAL)
    try:
        yield
    finally:
        if not debug:
            logging.disable(logging.NOTSET)
        for name, handler in saved_handlers.items():
            if handler is not None:
                signal.signal(getattr(signal, name), handler)
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


__all__ = [
    "Collective", "ProcessGroup", "ONE_PROCESS", "Launch", "RankFailure", "OtherRankFailed", "Rank0Stopped",
    "session", "join", "launch", "backend_for", "check_device", "sync_batchnorm_decision", "seed_for", "weights_digest",
    "exit_code_of",
]
