"""Training on several processes with PyTorch's DistributedDataParallel, and a 4-bit
gradient exchange for it.

    results = launch(2, fn, *args)           # fn(*args) on 2 new processes (gloo on CPU)
    ddp, comm = wrap(converted_model, "fp4")  # DDP; comm counts the bytes the hook sent

`fp4_allreduce_hook` averages each gradient bucket across ranks in radix-4 FP4 (two codes
per byte, one power-of-two scale byte per CHUNK elements), in two steps like a
reduce-scatter followed by an all-gather: each rank sends shard j of its bucket to rank j
(all_to_all), rank j decodes the N shards, averages them in rank order and sends the
quantized average to every rank (all_gather); every rank decodes the same bytes, so the
ranks stay bit-identical. For a shard of S = numel/N elements a rank sends
2·(N-1)·(S/2 + ceil(S/CHUNK)) bytes, about (1/2 + 1/CHUNK) / 4 = 0.126 of the
2·(N-1)/N·4·numel of an fp32 ring all-reduce at any world size N (an all-gather of every
rank's codes would grow with N), within 1/7 for buckets of more than ~30·N elements.
Error feedback on both quantizations: what one lost this step is added to the next step's
input to it (two residuals per parameter, twice the parameters' memory).
"""

from __future__ import annotations

import math
import os
import signal
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from fourbit import formats
from fourbit.formats.base import exp2i
from fourbit.nn.quant import pack_nibbles, unpack_nibbles
from fourbit.scaling import PACT

CHUNK = 256  # elements per scale byte: 1/256 byte per element on top of the 1/2 of the codes
FP4 = formats.get("fp4_radix4")
# a chunk holding NaN or ±inf is sent with this scale byte and arrives as all NaN, so a bad
# gradient is never turned into a number (FP4 has no code for NaN)
_NAN_EXPONENT = -128
# torch < 2.13 names it all_gather_into_tensor
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


# -- the process group ----------------------------------------------------------------------
def backend() -> str:
    """The process group's backend: gloo (CPU tensors) unless `init` was asked for nccl."""
    return dist.get_backend() if dist.is_initialized() else "gloo"


def init(
    rank: int | None = None, world_size: int | None = None, rendezvous: str | None = None, device: str = "cpu"
) -> None:
    """Join the process group: as `rank` of `world_size`, meeting in the file `rendezvous`
    (what `launch` does), or, without arguments, from torchrun's environment variables.
    device "cuda" (models on GPUs, one per process) uses nccl; "cpu" (`fourbit train`) gloo."""
    dist.init_process_group(
        "nccl" if device == "cuda" else "gloo",
        init_method=None if rendezvous is None else f"file://{rendezvous}",
        rank=-1 if rank is None else rank,
        world_size=-1 if world_size is None else world_size,
    )
    if device == "cuda":  # one GPU per process; torchrun names it LOCAL_RANK
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", dist.get_rank())) % torch.cuda.device_count())


def rank() -> int:
    """This process's rank (0 outside a process group)."""
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    """Number of processes (1 outside a process group)."""
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    """True on rank 0, the one process that writes files."""
    return rank() == 0


def launch(nproc: int, fn: Callable, *args) -> list:
    """Run fn(*args) on `nproc` new processes joined in one process group; their return
    values, by rank. `fn` must be importable (a module-level function).

    While they run, a SIGTERM sent to this process is passed on to each of them, and
    SIGINT is left to them: a terminal's Ctrl-C reaches every process of its group."""
    with tempfile.TemporaryDirectory() as tmp:
        # a file to meet in rather than a TCP port: a free port can be taken before it is used
        context = mp.spawn(_worker, args=(nproc, fn, args, tmp), nprocs=nproc, join=False)

        def forward(signum, frame):
            for process in context.processes:
                if process.is_alive():
                    os.kill(process.pid, signum)

        handlers = {signal.SIGTERM: forward, signal.SIGINT: signal.SIG_IGN}
        in_main_thread = threading.current_thread() is threading.main_thread()  # signal() works there only
        previous = {s: signal.signal(s, h) for s, h in handlers.items()} if in_main_thread else {}
        try:
            while not context.join():
                pass
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
        # the files are our own children's results, which may hold any picklable object
        return [torch.load(Path(tmp) / f"{r}.pt", weights_only=False) for r in range(nproc)]


def _worker(rank: int, nproc: int, fn: Callable, args: tuple, tmp: str) -> None:
    # the processes share the cores; more threads than cores makes OpenMP spin
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // nproc))
    init(rank, nproc, str(Path(tmp) / "rendezvous"))
    try:
        result = fn(*args)
    finally:
        dist.destroy_process_group()
    torch.save(result, Path(tmp) / f"{rank}.pt")


def shard(order: list[int]) -> list[int]:
    """This rank's part of a data order: order[rank::world], cut to a multiple of the world
    size so every rank runs the same number of steps (DDP waits for all ranks each step).
    With per-rank batch size B/world, step t of all ranks together sees the samples of
    step t of one process with batch size B."""
    world = world_size()
    return order[: len(order) - len(order) % world][rank() :: world]


def from_torchrun() -> bool:
    """True in a process started by torchrun (its environment names the process group)."""
    return {"RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"} <= os.environ.keys()


def from_main(obj):
    """Rank 0's `obj` (any picklable object) on every rank."""
    if world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, 0)
    return box[0]


def gather(obj) -> list:
    """Every rank's `obj` (any picklable object), by rank, on every rank."""
    if world_size() == 1:
        return [obj]
    objects = [None] * world_size()
    dist.all_gather_object(objects, obj)
    return objects


def reduce_floats(values: dict[str, float], op: str = "mean") -> dict[str, float]:
    """The sum or mean of each value across ranks. Every rank must pass the same keys in
    the same order."""
    if op not in ("sum", "mean"):
        raise ValueError(f"op must be 'sum' or 'mean'; got {op!r}")
    if world_size() == 1:
        return dict(values)
    device = torch.device("cuda", torch.cuda.current_device()) if backend() == "nccl" else None
    t = torch.tensor(list(values.values()), dtype=torch.float64, device=device)
    dist.all_reduce(t)
    if op == "mean":
        t /= world_size()
    return dict(zip(values, t.tolist(), strict=True))


def broadcast_buffers(model: nn.Module) -> None:
    """Rank 0's buffers (BatchNorm statistics, GradScale scales, RNG states) to every rank.
    DDP does this before each training forward; each rank's forward and backward then
    change its own, so call this before every rank evaluates the model."""
    for buffer in model.buffers():
        dist.broadcast(buffer, 0)


def wrap(
    model: nn.Module, grad_comm: str = "fp32", chunk: int = CHUNK
) -> tuple[DistributedDataParallel, FP4State | None]:
    """`model` (converted, on this rank's device) in DistributedDataParallel; with
    grad_comm "fp4" its gradients go through `fp4_allreduce_hook`, whose state is returned.

    DDP copies rank 0's parameters and buffers to every rank here, and rank 0's buffers
    before every forward (its default): GradScale scales and the layers' RNG states change
    in backward from each rank's own gradient, so rank 0's are the run's state. PACT clips
    not yet fixed take rank 0's alpha after their first forward (`_PACTAlphaSync`).
    """
    if grad_comm not in ("fp32", "fp4"):
        raise ValueError(f"grad_comm must be 'fp32' or 'fp4'; got {grad_comm!r}")
    device_ids = [torch.cuda.current_device()] if backend() == "nccl" else None
    if grad_comm == "fp32":
        ddp, state = DistributedDataParallel(model, device_ids=device_ids), None
    else:
        # One bucket of every gradient: the hook runs synchronously, so more buckets would
        # overlap nothing, and with one bucket (laid out by the hook in the model's parameter
        # order) every step has the same chunks and shard owners, though DDP regroups its
        # buckets after the first step: a resumed run then repeats an uninterrupted one exactly.
        megabytes = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
        ddp = DistributedDataParallel(model, device_ids=device_ids, bucket_cap_mb=math.ceil(megabytes) + 1)
        state = FP4State(model, chunk)
        ddp.register_comm_hook(state, fp4_allreduce_hook)
    sync = _PACTAlphaSync(model)
    ddp.register_forward_pre_hook(sync.before)
    ddp.register_forward_hook(sync)
    return ddp, state


class _PACTAlphaSync:
    """Around each forward of the DDP model: rank 0's alpha to every rank for each PACT
    clip that saw its first input in it. A clip sets alpha (a parameter) from the first
    input it sees, as on one process, but each rank sees its own batch. Copied before
    backward and the optimizer step, the ranks' parameters and optimizer states never
    differ; only the first forward ran with each rank's own alpha. A clip can be unset
    again (fourbit.train undoes a skipped step's forward), so every forward looks at every
    clip before (`before`, a pre-hook) and after (`__call__`)."""

    def __init__(self, model: nn.Module):
        self.clips = [m for m in model.modules() if isinstance(m, PACT)]
        self.unset: list[bool] = []

    def _unset(self) -> list[bool]:
        """Whether each clip is yet to see an input (one host sync for all of them)."""
        return (torch.stack([m.signed for m in self.clips]) < 0).tolist() if self.clips else []

    def before(self, module: nn.Module, args) -> None:
        self.unset = self._unset()

    def __call__(self, module: nn.Module, args, output) -> None:
        now = self._unset()  # the same on every rank
        for pact, before, after in zip(self.clips, self.unset, now, strict=True):
            if before and not after:
                # safe in the graph: of alpha, it keeps only whether alpha >= 1e-8 (clip_level's clamp)
                dist.broadcast(pact.alpha.data, 0)


# -- the 4-bit exchange ---------------------------------------------------------------------
def ring_allreduce_bytes(numel: int, world: int, element_size: int = 4) -> float:
    """Bytes one rank sends in a ring all-reduce of `numel` elements."""
    return 2 * (world - 1) / world * element_size * numel


def encode(x: Tensor, chunk: int = CHUNK) -> tuple[Tensor, Tensor]:
    """float32 rows [rows, L] (L even) -> (uint8 messages [rows, L/2 + ceil(L/chunk)], the
    values they decode to): the radix-4 FP4 codes two per byte, then one int8 exponent e
    per chunk (scale 2**e).

    (choice) e is one of the two powers of two next to the chunk's max |x| / top: the one
    that covers the max (it lands in [top/2, top)) or half of it (the max saturates to
    the top value), whichever gives the smaller squared error. Radix 4 leaves a factor 4
    between the top two values, so either can be better: on chunks of 256 the relative
    error is 0.344 / 0.348 / 0.316 (Gaussian / Laplace / Student-t(3)) against 0.387 /
    0.375 / 0.403 always covering and 0.346 / 0.358 / 0.333 always saturating.
    """
    rows, length = x.shape
    chunks = _pad(x, chunk).reshape(rows, -1, chunk)
    amax = chunks.abs().amax(-1)  # NaN or inf where the chunk holds one
    finite = torch.isfinite(amax)
    chunks = torch.where(finite[..., None], chunks, 0)
    _, e = torch.frexp(torch.where(finite, amax, 0) / FP4.max_value())  # max/top = m·2**e, m in [0.5, 1)
    candidates = [(e - 1).clamp(-127, 127), e.clamp(-127, 127)]  # saturating, covering; -128 is NaN's
    scales = [exp2i(c)[..., None] for c in candidates]
    units = [FP4.quantize(chunks / s) for s in scales]  # on FP4's unit grid (exact: s is 2**e)
    errors = [(u * s - chunks).square().sum(-1) for u, s in zip(units, scales, strict=True)]
    saturate = errors[0] <= errors[1]
    e, unit = torch.where(saturate, *candidates), torch.where(saturate[..., None], *units)
    values = torch.where(finite[..., None], unit * exp2i(e)[..., None], torch.nan)
    codes = _code_of(unit).reshape(rows, -1)[:, :length]
    e = torch.where(finite, e, _NAN_EXPONENT).to(torch.int8).view(torch.uint8)
    return torch.cat([pack_nibbles(codes).reshape(rows, -1), e], 1), values.reshape(rows, -1)[:, :length]


def decode(message: Tensor, length: int, chunk: int = CHUNK) -> Tensor:
    """Inverse of `encode`: uint8 [rows, M] -> float32 [rows, length]."""
    rows = message.shape[0]
    codes = unpack_nibbles(message[:, : length // 2], torch.Size([rows, length]), torch.uint8)
    e = message[:, length // 2 :].view(torch.int8).to(torch.int32)
    unit = _UNIT_VALUES.to(message.device)[_pad(codes, chunk).to(torch.int32)]
    values = unit.reshape(rows, -1, chunk) * exp2i(e)[..., None]
    values = torch.where((e == _NAN_EXPONENT)[..., None], torch.nan, values)
    return values.reshape(rows, -1)[:, :length]


# FP4's 16 codes and their values on the unit grid, as look-up tables: several times faster
# on whole buckets than FP4.encode / FP4.decode, which work the codes out from exponents
_UNIT_VALUES = FP4.decode(torch.arange(16, dtype=torch.uint8))
# each unit grid value is a power of two or ±0: its sign and exponent bits name its code
_CODES = torch.zeros(512, dtype=torch.uint8)
_CODES[_UNIT_VALUES.view(torch.int32) >> 23 & 0x1FF] = torch.arange(16, dtype=torch.uint8)


def _code_of(unit: Tensor) -> Tensor:
    """FP4 codes of values on the unit grid."""
    return _CODES.to(unit.device)[unit.view(torch.int32) >> 23 & 0x1FF]


def _pad(x: Tensor, chunk: int) -> Tensor:
    """Rows padded with zeros to a multiple of `chunk` (encoded, but never sent)."""
    return nn.functional.pad(x, (0, -x.shape[1] % chunk))


class FP4State:
    """State of `fp4_allreduce_hook`: the error-feedback residuals, and the bytes this rank
    sent (`bytes_sent`) next to what an fp32 ring all-reduce of the same buckets would have
    sent (`fp32_bytes`).

    Two residuals per parameter (DoubleSqueeze, Tang et al. 2019): "sent", what quantizing
    this rank's gradient lost, and "mean", what quantizing the mean of the shard this rank
    owns lost (zero elsewhere). Kept by parameter name, not by bucket index, because DDP
    regroups its buckets after the first step. They differ between ranks: a checkpoint
    needs every rank's `state_dict()`.
    """

    def __init__(self, model: nn.Module, chunk: int = CHUNK, group: dist.ProcessGroup | None = None):
        if chunk < 2 or chunk % 2:
            raise ValueError(f"chunk must be an even number >= 2; got {chunk!r}")
        self.chunk, self.group = chunk, group
        self.names = {p: name for name, p in model.named_parameters()}
        self.position = {name: i for i, name in enumerate(self.names.values())}
        self.residuals: dict[str, dict[str, Tensor]] = {"sent": {}, "mean": {}}
        self.bytes_sent, self.fp32_bytes = 0, 0.0

    @property
    def ratio(self) -> float:
        """bytes_sent / fp32_bytes (0 before anything was sent)."""
        return self.bytes_sent / self.fp32_bytes if self.fp32_bytes else 0.0

    def state_dict(self) -> dict:
        """This rank's residuals (they differ between ranks) and byte counts."""
        residuals = {kind: dict(r) for kind, r in self.residuals.items()}
        return {"residuals": residuals, "bytes_sent": self.bytes_sent, "fp32_bytes": self.fp32_bytes}

    def load_state_dict(self, state: dict) -> None:
        self.residuals = {kind: dict(r) for kind, r in state["residuals"].items()}
        self.bytes_sent, self.fp32_bytes = state["bytes_sent"], state["fp32_bytes"]

    def allreduce(self, grads: list[tuple[str, Tensor]]) -> Tensor:
        """The mean across ranks of `grads` ((name, tensor) pairs of the model's parameters,
        the same on every rank, in any order), laid end to end in the order given; exchanged
        in FP4, identical on every rank. A chunk holding NaN or ±inf arrives as NaN and
        leaves the residuals as they were."""
        given = [name for name, _ in grads]
        grads = sorted(grads, key=lambda pair: self.position[pair[0]])  # chunks independent of DDP's order
        world, me = dist.get_world_size(self.group), dist.get_rank(self.group)
        n = sum(g.numel() for _, g in grads)
        shard = 2 * math.ceil(n / (2 * world))  # even, so each shard's codes fill whole bytes
        flat = nn.functional.pad(torch.cat([g.reshape(-1).float() for _, g in grads]), (0, world * shard - n))
        sent_residual, mean_residual = (self._load(kind, grads, world * shard) for kind in ("sent", "mean"))

        x = (flat + sent_residual).reshape(world, shard)
        sent, q = encode(x, self.chunk)
        received = torch.empty_like(sent)
        dist.all_to_all_single(received, sent, group=self.group)
        # the shard this rank owns: the mean of every rank's part, summed in rank order
        own = slice(me * shard, (me + 1) * shard)
        mean = decode(received, shard, self.chunk).sum(0) / world + mean_residual[own]
        mine, _ = encode(mean[None], self.chunk)
        everyone = sent.new_empty(world, mine.shape[1])
        _all_gather(everyone, mine, group=self.group)
        out = decode(everyone, shard, self.chunk).reshape(-1)

        x, q = x.reshape(-1), q.reshape(-1)
        self.residuals["sent"].update(_by_name(torch.where(q.isnan(), sent_residual, x - q), grads))
        kept = torch.zeros_like(mean_residual)
        kept[own] = torch.where(out[own].isnan(), mean_residual[own], mean - out[own])
        self.residuals["mean"].update(_by_name(kept, grads))
        self.bytes_sent += 2 * (world - 1) * sent.shape[1]  # all_to_all and ring all-gather
        self.fp32_bytes += ring_allreduce_bytes(n, world)
        means = _by_name(out, grads)
        return torch.cat([means[name].reshape(-1) for name in given])

    def _load(self, kind: str, grads: list[tuple[str, Tensor]], length: int) -> Tensor:
        """The residuals of `grads`, laid end to end and padded with zeros to `length`."""
        stored = self.residuals[kind]
        flat = torch.cat(
            [stored[name].reshape(-1) if name in stored else g.new_zeros(g.numel()) for name, g in grads]
        )
        return nn.functional.pad(flat.float(), (0, length - flat.numel()))


def _by_name(flat: Tensor, grads: list[tuple[str, Tensor]]) -> dict[str, Tensor]:
    """The leading elements of `flat` cut into tensors shaped like each of `grads`, by name."""
    sizes = [g.numel() for _, g in grads]
    parts = flat[: sum(sizes)].split(sizes)
    return {name: part.reshape(g.shape) for (name, g), part in zip(grads, parts, strict=True)}


# bucket and result unannotated: DDP checks annotations against the classes themselves, and
# `from __future__ import annotations` makes them strings
def fp4_allreduce_hook(state: FP4State, bucket):
    """DDP communication hook (`ddp.register_comm_hook(FP4State(model), fp4_allreduce_hook)`):
    the bucket's mean across ranks, exchanged in radix-4 FP4 with error feedback."""
    buffer = bucket.buffer()
    grads = [(state.names[p], g) for p, g in zip(bucket.parameters(), bucket.gradients(), strict=True)]
    if sum(g.numel() for _, g in grads) != buffer.numel():
        raise RuntimeError("the DDP bucket's buffer is not its gradients laid end to end")
    future: torch.futures.Future[Tensor] = torch.futures.Future()
    future.set_result(state.allreduce(grads).to(buffer.dtype))
    return future
