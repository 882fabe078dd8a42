"""The training step's GPU speed-ups, applied to a prepared model from outside (the model stays plain).

- channels_last: the visual extractor's convolutions run in NHWC, the layout cuDNN's bf16/fp16
  tensor-core kernels use (NCHW makes them transpose every activation); cudnn_benchmark lets cuDNN
  time its algorithms once per shape and keep the fastest.
- CUDA graphs of the model's training forward and backward: at the batches researchers use (16-64)
  the step is launch-bound (ResNet-101's ~1,000 kernels per view, the memory-driven Transformer's
  small ones). `CudaGraphed` captures R2GenModel.forward (images, targets -> log-probabilities; the
  visual extractor included) and its backward once per micro-batch shape and replays them:
  thousands of launches become two. (`CudaGraphed.install(model, "forward_features")` captures the
  encoder-decoder alone, from patch features: bench/profile_step.py times the parts that way.)
  Targets are padded to the model's max_seq_length so every batch has one shape; trailing padding
  changes nothing (the decoder is causal and padded keys are masked), and the outputs are sliced back
  to the batch's width. Inside the graphs the relational memory runs on a second stream, beside the
  visual extractor (`overlapped_forward`). Every captured shape shares one memory pool (their steps never overlap), so
  an epoch's shorter last batch adds its own graphs, not a second set of activations; BatchNorm's
  running statistics are put back after a capture's warm-up passes.
- the fused relational memory (r2gen.fused_memory): the memory's 59-token loop in five Triton
  kernels per token forward and six backward instead of a few dozen PyTorch operations each; every
  engine (FP8's swapped layers fall back to the plain loop, said once).
- the fused Adam (one kernel for the whole update, on a GPU or the CPU) is chosen in
  r2gen.build.build_optimizer.

Which of them an engine allows, it says with its capabilities (r2gen.engine.TrainingEngine:
`cuda_graphs`, `flat_parameters`); this module never asks for an engine's name.

Each is numerically the same function as the plain path (tests/test_speedups.py); dropout draws
other random numbers inside a graph, so training runs are compared by their loss curves.
"""

from __future__ import annotations

import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial

import torch
import torch.nn.functional as F

from r2gen.fused_memory import install_fused_memory

MAX_GRAPHS = 2
"""Captured shapes kept per model: the micro-batch and an epoch's shorter last batch."""

WARMUP_STEPS = 3
"""Eager forward+backward passes on a side stream before a capture (cuBLAS/cuDNN workspaces, as
torch.cuda.make_graphed_callables does)."""


def planned_speedups(cfg, engine, device_type: str, world_size: int) -> list[str]:
    """The speed-ups that cfg (a TrainConfig) asks for and this engine (its capabilities: an adapter or
    its class), device and process count allow, in the order speed_up applies them (fused Adam is
    build_optimizer's choice, not listed here)."""
    if device_type != "cuda":
        return []
    wanted = [("channels_last", cfg.channels_last and not engine.flat_parameters),
              ("cudnn_benchmark", cfg.cudnn_benchmark),
              ("fused_memory", cfg.fused_memory),
              ("cuda_graphs", cfg.cuda_graphs and engine.cuda_graphs and world_size == 1)]
    return [name for name, allowed in wanted if allowed]


def speed_up(model: torch.nn.Module, backend, cfg) -> list[str]:
    """Apply planned_speedups to the (unwrapped) model; the names of those applied."""
    device = getattr(backend, "device", torch.device("cpu"))
    applied = planned_speedups(cfg, backend, device.type, backend.world_size)
    if "channels_last" in applied:
        model.visual_extractor.to(memory_format=torch.channels_last)
    if device.type == "cuda":  # process-wide, and set either way: the run's choice (its plan's), whatever ran before
        torch.backends.cudnn.benchmark = "cudnn_benchmark" in applied  # the crop gives every batch one image shape
    if "fused_memory" in applied and (why := install_fused_memory(model)):
        applied.remove("fused_memory")
        warnings.warn(f"the fused relational memory is off for this run ({why}); it runs as PyTorch operations",
                      stacklevel=2)
    if "cuda_graphs" in applied:
        CudaGraphed.install(model, graphed_method(cfg))
    return applied


def graphed_method(cfg) -> str:
    """What the CUDA graphs capture: the whole model (`forward`: the visual extractor too, the relational
    memory beside it on a second stream; the default) where cfg.graph_visual_extractor asks, else the
    encoder-decoder from patch features (`forward_features`)."""
    return "forward" if cfg.graph_visual_extractor else "forward_features"


@contextmanager
def cudnn_autotuning(on: bool) -> Iterator[None]:
    """cuDNN's autotuning (cudnn_benchmark) only where `on` and already enabled; its heuristics otherwise.

    Autotuning a new shape of the step costs ~9-17 s on an H200 (measured by bench/profile_step.py
    --new-shapes) and saves at most ~20 ms per step: worth it for the micro-batch, which every step
    has, not for an epoch's shorter last batch (one step per epoch), generation batches or the
    probe's warm-up. Blocks nest: the inner one cannot turn autotuning back on."""
    before = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = before and on
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = before


def release_graphs(model: torch.nn.Module) -> None:
    """Drop a model's captured graphs, if any (after an out-of-memory error, between probe sizes)."""
    for graphed in CudaGraphed.all_installed(model):
        graphed.release()


_SIDE_STREAMS: dict[torch.device, "torch.cuda.Stream"] = {}


def _side_stream(device: torch.device) -> "torch.cuda.Stream":
    """One warm-up stream per device for every capture. cuBLAS keeps a workspace (32 MiB on an
    H200) per stream it has run on, for the life of the process: a new stream per capture left one
    behind each time (~0.4 GiB after the probe's six sizes, seen on an H200)."""
    if device not in _SIDE_STREAMS:
        _SIDE_STREAMS[device] = torch.cuda.Stream(device)
    return _SIDE_STREAMS[device]


def release_workspaces() -> None:
    """cuBLAS's workspaces back to the allocator once no captured graph is left (a live graph
    replays into the workspace it was captured with); the next product allocates one again."""
    if _Captured.live == 0 and hasattr(torch._C, "_cuda_clearCublasWorkspaces"):
        torch.cuda.synchronize()
        torch._C._cuda_clearCublasWorkspaces()


@contextmanager
def eager_path(model: torch.nn.Module) -> Iterator[None]:
    """The model's own methods inside the block (FLOP counting: the model's FLOPs, not a capture's
    warm-up passes or padded tokens); its captured graphs stay for afterwards."""
    graphed = CudaGraphed.all_installed(model)
    CudaGraphed.uninstall(model)
    try:
        yield
    finally:
        for g in graphed:
            model.__dict__[g.method] = g


_MEMORY_STREAMS: dict[torch.device, "torch.cuda.Stream"] = {}


def overlapped_forward(model: torch.nn.Module, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """R2GenModel.forward with the relational memory on a second CUDA stream, beside the visual extractor:
    the memory reads only the targets, and its token loop is a chain of small kernels that leaves most
    of the GPU to ResNet's convolutions. Joined before the decoder reads the states; autograd runs each
    backward operation on its forward's stream, so the memory's backward overlaps the ResNet's too.
    The same operations as the model's forward (its dropout masks drawn in another order: graphs draw
    other random numbers anyway)."""
    device = images.device
    if device not in _MEMORY_STREAMS:
        _MEMORY_STREAMS[device] = torch.cuda.Stream(device)
    main, side = torch.cuda.current_stream(device), _MEMORY_STREAMS[device]
    side.wait_stream(main)
    with torch.cuda.stream(side):
        memory = model.memory_states(targets)
    att_feats, _ = model.extract(images)
    main.wait_stream(side)
    # Read on main: its block must not be reused by the side stream before main's reads ran. Eagerly the
    # allocator then waits for main; inside a capture it keeps the block until the capture ends.
    memory.record_stream(main)
    return model.forward_features(att_feats, targets, memory)


class _Captured:
    """One captured shape: static inputs, the forward and backward graphs, their static outputs."""

    live = 0
    """Captured shapes alive in this process (their graphs may use cuBLAS's workspaces)."""

    def __init__(self, forward: Callable, params: list[torch.Tensor], x: torch.Tensor,
                 targets: torch.Tensor, autocast_dtype: torch.dtype | None, pool: tuple,
                 buffers: list[torch.Tensor]) -> None:
        """x: the images (whole model) or the patch features (encoder-decoder); `buffers` the model's,
        restored after the warm-up passes (BatchNorm's running statistics)."""
        self.x = x.detach().clone().requires_grad_(x.requires_grad)
        self.targets = targets.clone()
        self.inputs = ([self.x] if x.requires_grad else []) + params

        def run() -> torch.Tensor:
            if autocast_dtype is None:
                return forward(self.x, self.targets)
            # Graphs need autocast's weight-cast cache off: the casts are recorded in the graph.
            with torch.autocast("cuda", dtype=autocast_dtype, cache_enabled=False):
                return forward(self.x, self.targets)

        saved = [b.detach().clone() for b in buffers]
        _Captured.live += 1  # from here on, this object's graphs may hold a workspace
        self._counted = True
        side = _side_stream(x.device)
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(WARMUP_STEPS):
                out = run()
                torch.autograd.grad(out, self.inputs, torch.ones_like(out), allow_unused=True)
            del out
        torch.cuda.current_stream().wait_stream(side)
        # The warm-up's freed blocks would stay reserved beside the graph's own pool: hand them back, so
        # a captured step peaks where an eager one does (the memory probe measures this path).
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        # thread_local: the data loader's pin-memory thread may allocate pinned memory meanwhile.
        self.forward_graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.forward_graph, pool=pool, capture_error_mode="thread_local"):
            self.out = run()
        self.grad_out = torch.empty_like(self.out)
        self.backward_graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.backward_graph, pool=pool, capture_error_mode="thread_local"):
            self.grads = torch.autograd.grad(self.out, self.inputs, self.grad_out, allow_unused=True)
        with torch.no_grad():  # the warm-up's BatchNorm updates undone: the replay of this step makes its own
            for buffer, value in zip(buffers, saved):
                buffer.copy_(value)
        # Let the captured autograd graph go. Kept, it would keep the parameters' AccumulateGrad nodes
        # alive with the capture's side stream as theirs, and every replayed gradient would then be
        # accumulated on that stream while the allocator frees it on this one (a race; torch warns
        # "The AccumulateGrad node's stream does not match"). The graphs keep their memory pool.
        self.out = self.out.detach()

    def __del__(self) -> None:
        if getattr(self, "_counted", False):
            _Captured.live -= 1


class _Replay(torch.autograd.Function):
    @staticmethod
    def forward(ctx, captured: _Captured, x: torch.Tensor, targets: torch.Tensor,
                *params: torch.Tensor) -> torch.Tensor:
        captured.x.copy_(x)
        captured.targets.copy_(targets)
        captured.forward_graph.replay()
        ctx.captured = captured
        # A copy: the next replay (the next micro-batch) overwrites the static output.
        return captured.out.detach().clone()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        captured = ctx.captured
        captured.grad_out.copy_(grad)
        captured.backward_graph.replay()
        # Copies: autograd may keep a returned tensor as a parameter's .grad, which the next replay
        # would overwrite in the middle of an accumulation window.
        grads = [g.clone() if g is not None else None for g in captured.grads]
        grad_x = grads.pop(0) if captured.x.requires_grad else None
        return (None, grad_x, None, *grads)


class CudaGraphed:
    """Replaces a model method (an instance attribute; the class's method stays the eager path) with
    captured CUDA graphs while training with gradients on a GPU: `forward` (images -> log-probabilities,
    the whole model) or `forward_features` (patch features -> log-probabilities, the encoder-decoder).
    Everything else (no gradients, evaluation, CPU, targets wider than max_seq_length, a call inside
    another capture) takes the eager path."""

    METHODS = ("forward", "forward_features")
    capturing = False
    """A capture (or its warm-up) is under way: a graphed method called inside it runs eagerly."""

    def __init__(self, model: torch.nn.Module, method: str) -> None:
        self.method = method
        self.eager = getattr(type(model), method).__get__(model)
        # What the graphs run: the whole model with its relational memory beside the visual extractor.
        self.captured = partial(overlapped_forward, model) if method == "forward" else self.eager
        self.model = model
        self.width = model.max_seq_length
        whole = method == "forward"
        self.params = [p for p in (model if whole else model.encoder_decoder).parameters() if p.requires_grad]
        self.buffers = list(model.buffers()) if whole else []
        self.graphs: OrderedDict[tuple, _Captured] = OrderedDict()
        self.pool: tuple | None = None  # one memory pool for every shape captured
        self.captures = 0
        self.failed = ""  # why capturing failed, once it has (the eager path from then on)

    @classmethod
    def installed(cls, model: torch.nn.Module, method: str = "forward") -> "CudaGraphed | None":
        """The model's graphed method, if one is installed."""
        graphed = model.__dict__.get(method)
        return graphed if isinstance(graphed, cls) else None

    @classmethod
    def all_installed(cls, model: torch.nn.Module) -> list["CudaGraphed"]:
        return [g for g in (cls.installed(model, m) for m in cls.METHODS) if g is not None]

    @classmethod
    def install(cls, model: torch.nn.Module, method: str = "forward") -> "CudaGraphed":
        if method not in cls.METHODS:
            raise ValueError(f"CudaGraphed: method must be one of {', '.join(cls.METHODS)}, got {method!r}")
        graphed = cls.installed(model, method)
        if graphed is None:
            graphed = cls(model, method)
            model.__dict__[method] = graphed  # not a submodule: state_dict is unchanged
        return graphed

    @classmethod
    def uninstall(cls, model: torch.nn.Module) -> None:
        for method in cls.METHODS:
            if cls.installed(model, method) is not None:
                del model.__dict__[method]

    def release(self) -> None:
        """Drop every captured graph (their memory pool goes back to the allocator)."""
        self.graphs.clear()
        self.pool = None
        release_workspaces()

    def __call__(self, x: torch.Tensor, targets: torch.Tensor, *given: torch.Tensor) -> torch.Tensor:
        if given:  # forward_features with memory states computed by the caller (inside a whole-model capture)
            return self.eager(x, targets, *given)
        if not (self.model.training and torch.is_grad_enabled() and x.is_cuda
                and targets.size(1) <= self.width and not CudaGraphed.capturing):
            return self.eager(x, targets)
        width = targets.size(1)
        padded = F.pad(targets, (0, self.width - width)) if width < self.width else targets
        dtype = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else None
        key = (tuple(x.shape), x.dtype, x.requires_grad, tuple(padded.shape), dtype)
        captured = self.graphs.get(key)
        if captured is None:
            if self.failed:
                return self.eager(x, targets)
            while len(self.graphs) >= MAX_GRAPHS:
                self.graphs.popitem(last=False)
            if self.pool is None:
                self.pool = torch.cuda.graph_pool_handle()
            try:
                CudaGraphed.capturing = True
                captured = _Captured(self.captured, self.params, x, padded, dtype, self.pool, self.buffers)
            except torch.OutOfMemoryError:
                raise  # the loop's out-of-memory recovery halves the micro-batch and comes back
            except RuntimeError as err:  # an operation that cannot be captured: the eager path, said once
                self.failed = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
                part = "the model" if self.method == "forward" else "the encoder-decoder"
                warnings.warn(f"CUDA graphs of {part} are off for this run (capture failed: "
                              f"{self.failed}); training continues on the eager path", stacklevel=2)
                return self.eager(x, targets)
            finally:
                CudaGraphed.capturing = False
            self.graphs[key] = captured
            self.captures += 1
        self.graphs.move_to_end(key)
        logprobs = _Replay.apply(captured, x, padded, *self.params)
        return logprobs[:, :width - 1]
