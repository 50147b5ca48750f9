"""Speed switches (the spec's ``performance`` section), resolved once per run and recorded in it.

``auto`` picks, per device, what is fast where it keeps the numbers trustworthy:

* ``channels_last``: on for models with 2-D convolutions on CUDA, the layout tensor cores want. On
  the CPU it depends on the width and on the instructions oneDNN uses there. Narrow convolutions (at
  most 64 output channels) always: a training step of the quickstart CNN (32 and 64 channels) took
  24% less CPU time with it (``bench/channels_last.py`` measures whole epochs). Wider ones (VGG,
  ResNet: up to 512 channels) only where torch's CPU capability is ``AVX2``: on a 2-core Xeon
  torchvision's vgg11_bn at 32x32 took 24% more and resnet18 at 64x64 20-45% more with it (measured
  under load, best of 2-3), while on a 2-core AMD EPYC with AVX2 and no AVX-512 ten epochs of
  head-only resnet18 at 64x64 without the feature cache took 128 s with it and 180 s without, and the
  main job's first run 60 s against 68 s (on an AVX-512 EPYC it was 0-10% faster too; the default
  there stays narrow-only, the Xeon's).
* ``amp``: bf16 autocast on CUDA devices that support it, else fp16 with a gradient scaler. Off on
  CPU, where bf16 changes the numbers and its speed depends on the processor (on the EPYC machine
  this was developed on, ``amp: bf16`` made a quickstart epoch about 30% faster: opt in there).
* ``cudnn_benchmark``: on for CUDA unless the spec asks for ``deterministic: true``.
* ``pin_memory``: on for CUDA (page-locked host batches, copied with ``non_blocking=True``).
* ``threads``: torch's own default (``OMP_NUM_THREADS`` or the machine's cores) unless set. With
  short spinning (below) that stays the better default under load too: on 2 cores under a load of
  8 to 13, a quickstart epoch took 16.5-19.1 s with two passive threads and 19.2-20.4 s with one;
  and the thread count is fixed for the run, never adapted to the load, because one thread rounds
  differently from two: a run's numbers must not depend on what else the machine was doing.
* ``compile``: ``torch.compile`` the module the loop trains, only when asked (compiling costs time).

The resolved values go into the run's settings (``settings["performance"]``) so a run says how it
was trained; :func:`applied` sets the process-wide ones for the duration of training and restores them.

On a machine shared with other work (or with other runs), OpenMP threads that spin while they wait
for each other burn the time slices the other processes need: :func:`contention_defaults` shortens
the spinning (``GOMP_SPINCOUNT=3000``; ``KMP_BLOCKTIME=0`` for Intel's and LLVM's runtimes), set by
the command line before torch loads unless the user chose how threads wait; the run records what
its process had (``omp_wait_policy``, ``gomp_spincount``, ``kmp_blocktime``).
"""

from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import asdict, dataclass, fields
from typing import Any, Iterator, MutableMapping

from runner.errors import SpecError

AMP_DTYPES = {"bf16": "bfloat16", "fp16": "float16"}
WAIT_POLICY_ENV = "OMP_WAIT_POLICY"
SPINCOUNT_ENV = "GOMP_SPINCOUNT"  # GNU libgomp, the runtime of torch's Linux wheels: busy-wait iterations
BLOCKTIME_ENV = "KMP_BLOCKTIME"  # Intel's and LLVM's runtimes: milliseconds of busy-waiting
# Any of these set means the user has chosen how OpenMP threads wait
_WAIT_CHOSEN_BY = (WAIT_POLICY_ENV, SPINCOUNT_ENV, BLOCKTIME_ENV)
# Busy-wait iterations before a waiting libgomp thread sleeps (its default: 300,000, some milliseconds;
# passive: 0). Measured with bench/plain_loop.py, 2 epochs of the quickstart on 2 cores, seconds alone
# and (each of) two copies at once: default 11.5-19.4 alone, 52-112 two at once; passive 14.5-19.5
# and 21-27; 1,000 17-20 and 24-26; 3,000 11.9-18.4 and 24.5-35.7 (three at once 50-52); 10,000
# 14.7-20.1 and 37-42; 100,000 11.8-14.7 and 44-45. 3,000 was as fast as the default alone and close
# to passive two at once (bench/contention.py: whole runs, 2 and 3 copies).
SHORT_SPIN = "3000"
# the recorded fields that say how threads waited: they change the speed, never the numbers
OPENMP_WAITING = ("omp_wait_policy", "gomp_spincount", "kmp_blocktime")


# ------------------------------------------------------------------------------------------
# Before torch loads: how OpenMP threads wait


def contention_environment(environ: MutableMapping[str, str] | None = None) -> dict[str, str]:
    """The variables a training process gets unless the user chose otherwise: a short spin (:data:`SHORT_SPIN`).

    OpenMP's default lets a thread that waits for the others spin for a few milliseconds. Alone on
    the machine that saves a wake-up; with other processes on the same cores the spinning thread
    takes the time slice the thread it waits for needs, and every parallel operation waits a slice.
    Measured on 2 cores: a quickstart epoch took 30 s instead of 2.9 s under a load of 3, and 61-130 s
    instead of 16.5-19.1 s under a load of 8 to 13 (``bench/contention.py`` measures whole runs).
    Passive waiting (sleeping at once) avoids that but costs a wake-up per parallel region: 20-30%
    slower alone. A spin of a few thousand iterations is as fast as the default alone and close to
    passive under load. Intel's and LLVM's runtimes (not measured here) wait passively, as before.
    For a launcher's worker processes too.
    """
    environ = os.environ if environ is None else environ
    if any(name in environ for name in _WAIT_CHOSEN_BY):
        return {}
    return {SPINCOUNT_ENV: SHORT_SPIN, BLOCKTIME_ENV: "0"}


def contention_defaults() -> dict[str, str]:
    """Put :func:`contention_environment` into this process's environment; what was set.

    Only before torch is imported: the OpenMP runtime reads its environment once, when torch loads it.
    """
    if "torch" in sys.modules:
        return {}
    added = contention_environment()
    os.environ.update(added)
    return added


@dataclass(frozen=True)
class Performance:
    """What a run actually used (no ``auto`` left)."""

    threads: int
    channels_last: bool
    amp: str | None  # "bf16", "fp16" or None
    grad_scaler: bool
    cudnn_benchmark: bool
    pin_memory: bool
    compile: bool
    # how the training process's OpenMP threads waited: its OMP_WAIT_POLICY, GOMP_SPINCOUNT and
    # KMP_BLOCKTIME (None: unset; all three unset is OpenMP's default of spinning some milliseconds)
    omp_wait_policy: str | None = None
    gomp_spincount: str | None = None
    kmp_blocktime: str | None = None
    # the instruction set torch's CPU kernels used (``channels_last: auto`` depends on it; None off the CPU)
    cpu_capability: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "Performance":
        """Read back from a run's settings; keys added after the run was stored take their defaults."""
        return cls(**{f.name: values[f.name] for f in fields(cls) if f.name in values})

    def autocast(self, device: Any) -> Any:
        """The autocast context for forward passes (a no-op context when AMP is off)."""
        if self.amp is None:
            return contextlib.nullcontext()
        import torch

        return torch.autocast(device_type=device.type, dtype=getattr(torch, AMP_DTYPES[self.amp]))

    def new_grad_scaler(self, device: Any) -> Any:
        """fp16 gradients underflow without loss scaling; bf16 has float32's range and needs none."""
        if not self.grad_scaler:
            return None
        import torch

        return torch.amp.GradScaler(device.type)

    def batch_to(self, images: Any, device: Any) -> Any:
        """Move a batch to the device (asynchronously from pinned memory), in the model's memory format."""
        if self.channels_last and images.ndim == 4:
            import torch

            return images.to(device, non_blocking=True, memory_format=torch.channels_last)
        return images.to(device, non_blocking=True)

    def compiled(self, module: Any) -> Any:
        """The module the loop calls: ``torch.compile(module)`` when asked (parameters are shared)."""
        if not self.compile:
            return module
        import torch

        return torch.compile(module)


# No speed-ups and no process-wide changes (a training loop driven by hand, without a plan)
DEFAULT = Performance(threads=0, channels_last=False, amp=None, grad_scaler=False, cudnn_benchmark=False,
                      pin_memory=False, compile=False)


def _switch(value: str, auto: bool) -> bool:
    return auto if value == "auto" else value == "on"


CPU_CHANNELS_LAST_MAX_WIDTH = 64
# torch.backends.cpu.get_cpu_capability() values where wide convolutions are faster in channels_last too
CPU_CHANNELS_LAST_ANY_WIDTH = frozenset({"AVX2"})


def conv2d_width(model: Any) -> int:
    """The most output channels of any 2-D convolution of ``model`` (0: none); works on the ``meta`` device."""
    from torch import nn

    return max((m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d)), default=0)


def channels_last_pays(device: Any, model: Any) -> bool:
    """Where ``channels_last: auto`` turns it on (see the module docstring for the measurements)."""
    width = conv2d_width(model)
    if device.type == "cuda":
        return width > 0
    if device.type != "cpu" or width == 0:
        return False
    return width <= CPU_CHANNELS_LAST_MAX_WIDTH or cpu_capability() in CPU_CHANNELS_LAST_ANY_WIDTH


def cpu_capability() -> str:
    """The instruction set torch's CPU kernels (and oneDNN) dispatch to here: ``AVX2``, ``AVX512``, ..."""
    import torch

    return torch.backends.cpu.get_cpu_capability()


def amp_for(requested: str, device: Any) -> str | None:
    if requested == "off":
        return None
    if requested != "auto":
        return requested
    if device.type != "cuda":
        return None
    import torch

    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def resolve(spec: Any, device: Any, model: Any) -> Performance:
    """The switches for this spec on this device and model; ``auto`` made concrete."""
    import torch

    wanted = spec.performance
    cuda = device.type == "cuda"
    if wanted.cudnn_benchmark == "on" and spec.deterministic:
        raise SpecError("performance.cudnn_benchmark: on contradicts deterministic: true (cuDNN would pick "
                        "algorithms by timing them); use auto or off")
    if wanted.pin_memory == "on" and not cuda:
        raise SpecError(f"performance.pin_memory: on needs a CUDA device, this run uses {device.type}; use auto")
    amp = amp_for(wanted.amp, device)
    return Performance(
        threads=int(wanted.threads or torch.get_num_threads()),
        channels_last=_switch(wanted.channels_last, channels_last_pays(device, model)),
        amp=amp,
        grad_scaler=amp == "fp16",
        cudnn_benchmark=_switch(wanted.cudnn_benchmark, cuda and not spec.deterministic),
        pin_memory=_switch(wanted.pin_memory, cuda),
        compile=bool(wanted.compile),
        omp_wait_policy=os.environ.get(WAIT_POLICY_ENV),
        gomp_spincount=os.environ.get(SPINCOUNT_ENV),
        kmp_blocktime=os.environ.get(BLOCKTIME_ENV),
        cpu_capability=cpu_capability() if device.type == "cpu" else None,
    )


@contextlib.contextmanager
def applied(performance: Performance) -> Iterator[Performance]:
    """Set the thread count and ``cudnn.benchmark`` while training; put the previous values back after."""
    import torch

    threads, benchmark = torch.get_num_threads(), torch.backends.cudnn.benchmark
    if performance.threads and performance.threads != threads:
        torch.set_num_threads(performance.threads)
    torch.backends.cudnn.benchmark = performance.cudnn_benchmark
    try:
        yield performance
    finally:
        torch.set_num_threads(threads)
        torch.backends.cudnn.benchmark = benchmark
