"""Precision and speed options of one stage's model: attention kernel, memory format,
``torch.compile``, and the batch-size buckets a compiled loop pads its steps to.

``args.performance`` (:class:`serve.settings.PerformanceSettings`) resolves to one
:class:`ModelOptions` per stage; the model classes take it without Ray.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

DEFAULT_BUCKETS = (1, 2, 4, 8, 16)
RECOMPILE_LIMIT = 64
"""Compiled graphs kept per compiled function (buckets x latent sizes)."""


@dataclass(frozen=True)
class ModelOptions:
    """How one stage's networks run (its dtype travels on its own, as ``dtype``)."""

    attention: str = "sdpa"
    """``sdpa``: torch's ``scaled_dot_product_attention``; ``eager``: the plain math path. Also
    transformers' ``attn_implementation`` names, passed to the CLIP encoders as they are."""
    channels_last: bool = False
    """Convolutional networks (U-Net, MOVQ) and their inputs in NHWC memory format."""
    compile: bool = False
    """``torch.compile`` the U-Net (or the MOVQ decoder) with ``dynamic=False``."""
    compile_mode: str = "default"
    batch_buckets: tuple[int, ...] = DEFAULT_BUCKETS
    """With ``compile``: a loop's step batch is padded up to the next of these sizes, so
    compiled graphs are reused instead of recompiled for every batch size."""
    decode_chunk: int = 0
    """MOVQ: at most this many images per decoder forward (0: a batch's images of one size in
    one forward). On CUDA the chunks run on a stream of their own and the next chunk is queued
    before the previous one's images are encoded, so PNG encoding on the CPU overlaps the GPU."""


def padded_size(rows: int, buckets: Sequence[int] | None) -> int:
    """The smallest bucket holding ``rows``; ``rows`` itself without buckets or above the largest."""
    return next((size for size in sorted(buckets or ()) if size >= rows), rows)


def pad_rows(tensor: torch.Tensor, size: int) -> torch.Tensor:
    """``tensor`` with copies of its first row appended up to ``size`` rows. Copies of a real
    row, not zeros: a padded row then runs the same numbers as real ones (no NaN or overflow
    from inputs a network never sees), and its outputs are dropped."""
    missing = size - tensor.shape[0]
    if missing <= 0:
        return tensor
    return torch.cat([tensor, tensor[:1].expand(missing, *tensor.shape[1:])])


# diffusers' processor for each of its attention kinds, per ``attention`` option.
_PROCESSORS = {
    "AttnProcessor": ("AttnProcessor2_0", "AttnProcessor"),
    "AttnProcessor2_0": ("AttnProcessor2_0", "AttnProcessor"),
    "AttnAddedKVProcessor": ("AttnAddedKVProcessor2_0", "AttnAddedKVProcessor"),
    "AttnAddedKVProcessor2_0": ("AttnAddedKVProcessor2_0", "AttnAddedKVProcessor"),
}


def set_attention(module: torch.nn.Module, attention: str) -> None:
    """Give every diffusers ``Attention`` in ``module`` the processor of ``attention`` for its kind.

    diffusers already picks the SDPA processors when torch has SDPA; setting them makes the
    choice explicit. Per module, not ``set_attn_processor`` on the model: the Kandinsky U-Net's
    attention adds key/value projections and needs the added-KV processors, the MOVQ has no
    ``attn_processors`` at all.
    """
    from diffusers.models import attention_processor
    from diffusers.models.attention_processor import Attention

    column = ("sdpa", "eager").index(attention)
    for name, child in module.named_modules():
        if isinstance(child, Attention):
            kind = type(child.processor).__name__
            if kind not in _PROCESSORS:
                raise ValueError(f"{name}: attention processor {kind} has no {attention} counterpart here")
            child.set_processor(getattr(attention_processor, _PROCESSORS[kind][column])())


def prepare_convolutional(module: torch.nn.Module, options: ModelOptions) -> torch.nn.Module:
    """Attention kernel and memory format of a U-Net or MOVQ, in place."""
    set_attention(module, options.attention)
    if options.channels_last:
        module.to(memory_format=torch.channels_last)
    return module


def compiled(module: torch.nn.Module, options: ModelOptions, backend: Any = "inductor") -> torch.nn.Module:
    """``module`` compiled in place when ``options.compile`` (its attributes stay reachable).
    ``backend="eager"`` (or a callable backend) traces with Dynamo but generates no code: the
    tests' fast path."""
    if options.compile:
        import torch._dynamo.config

        # One graph per batch bucket and latent size: past Dynamo's default of 8 graphs per
        # function it would fall back to eager for new shapes with only a warning.
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
        mode = options.compile_mode if backend == "inductor" else None  # modes are Inductor's
        module.compile(mode=mode, dynamic=False, backend=backend)
    return module


def cuda_graphs(options: ModelOptions) -> bool:
    """Whether the compiled network replays CUDA graphs (Inductor's ``reduce-overhead``)."""
    return options.compile and options.compile_mode == "reduce-overhead"


def graph_step(forward: Callable[..., Any], replayed: bool) -> Callable[..., Any]:
    """``forward`` made safe for CUDA graph replays when ``replayed``: each call starts a new
    graph step (no earlier call's outputs are read again) and its tensor outputs are cloned
    out of the graph's buffers, which the next replay overwrites. ``forward`` itself otherwise."""
    if not replayed:
        return forward

    def step(*args: Any, **kwargs: Any) -> Any:
        torch.compiler.cudagraph_mark_step_begin()
        output = forward(*args, **kwargs)
        if isinstance(output, torch.Tensor):
            return output.clone()
        return type(output)(item.clone() if isinstance(item, torch.Tensor) else item for item in output)

    return step


def to_memory_format(tensor: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """A 4-D input in the network's memory format."""
    return tensor.contiguous(memory_format=torch.channels_last) if channels_last and tensor.dim() == 4 else tensor
