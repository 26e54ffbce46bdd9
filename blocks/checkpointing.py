"""Activation checkpointing of a model's blocks: full, or selective.

Full (`True`, timm's convention): torch.utils.checkpoint keeps only the block's inputs and reruns the whole block
in the backward. Selective (`"selective"`): the block's matrix products and the zoo's own kernels (WKV, Bi-WKV)
keep their outputs, and the elementwise work between them (norms, token shifts, mixes, gates, casts) is redone in
the backward, through torch.utils.checkpoint's selective policies. Products that widen their input, such as the
channel mix's C -> 4C key, are redone as well: a product costs flops in proportion to its input width for each
byte of output it would keep, so these are the cheapest to recompute. Under torch.compile a model's stack of
blocks (run_stack) is one selective region, so the compiler places each recomputation where the backward needs it;
each block's output (the residual stream) is kept there, so that no block's recomputation reaches back into the
blocks before it.
"""

from __future__ import annotations

import functools
from typing import Callable

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

__all__ = ["GRAD_CHECKPOINTING", "GradCheckpointing", "check_grad_checkpointing", "keep_products_and_kernels",
           "keep", "run_block", "run_stack", "run_blocks"]

GRAD_CHECKPOINTING = (False, True, "selective")
"""What `set_grad_checkpointing` and the recipes' `grad_checkpointing` take: off, full, selective."""

PRODUCTS = (torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default)

IN_REGION = "in-region"
"""The block mode run_stack gives the blocks inside its one selective region: run the block, keep its output."""


@torch.library.custom_op("zoo::keep", mutates_args=())
def keep(x: Tensor) -> Tensor:
    """A copy of x that the selective policy keeps (a zoo op): marks a block's output inside run_stack's region."""
    return x.clone()


keep.register_fake(torch.empty_like)
keep.register_autograd(lambda ctx, grad: grad)


def check_grad_checkpointing(mode: bool | str) -> bool | str:
    """`mode` if it is one of GRAD_CHECKPOINTING, else a ValueError naming them."""
    if not (isinstance(mode, bool) or mode == "selective"):
        raise ValueError(f"grad checkpointing must be False, True (full) or 'selective', got {mode!r}")
    return mode


class GradCheckpointing:
    """timm's `set_grad_checkpointing` for a model whose block loop passes `self.grad_checkpointing` to run_block,
    run_stack or run_blocks."""

    grad_checkpointing: bool | str = False

    def set_grad_checkpointing(self, enable: bool | str = True) -> None:
        """Recompute each block's activations in the backward instead of keeping them; "selective" keeps the
        products' and kernels' outputs and recomputes the rest."""
        self.grad_checkpointing = check_grad_checkpointing(enable)


def keep_products_and_kernels(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    """The selective policy: keep the outputs of the zoo's kernels and of products that do not widen their input
    (mm / addmm / bmm: input width args[-2].shape[-1], output width args[-1].shape[-1]); recompute the rest."""
    if getattr(op, "namespace", None) == "zoo":
        return CheckpointPolicy.MUST_SAVE
    if op in PRODUCTS and args[-1].shape[-1] <= args[-2].shape[-1]:
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


def _selective(fn, *inputs):
    """fn(*inputs) as one selective region (keep_products_and_kernels)."""
    context = functools.partial(create_selective_checkpoint_contexts, keep_products_and_kernels)
    return checkpoint(fn, *inputs, use_reentrant=False, context_fn=context)


def run_block(mode: bool | str, block: nn.Module, *inputs):
    """block(*inputs), its activations kept as `mode` says (GRAD_CHECKPOINTING, or IN_REGION) when autograd records.
    A block returns the residual stream, or a tuple that starts with it."""
    if not mode or not torch.is_grad_enabled():
        return block(*inputs)
    if mode == IN_REGION:
        out = block(*inputs)
        return (keep(out[0]), *out[1:]) if isinstance(out, tuple) else keep(out)
    if mode == "selective":
        return _selective(block, *inputs)
    return checkpoint(block, *inputs, use_reentrant=False)


def run_stack(mode: bool | str, stack: Callable, *inputs):
    """stack(block_mode, *inputs), a function that runs a model's blocks through run_block(block_mode, ...).
    block_mode is `mode`, except that selective checkpointing under torch.compile makes the whole stack one region
    (block_mode IN_REGION inside it): the compiler then places each recomputation where the backward uses it, where a
    region per block costs step time, and each block's output is kept, so recomputing a block needs nothing from the
    blocks before it (on vrwkv_tiny at 2048 px this is both faster and smaller than rebuilding the residual stream).
    Eager keeps a region per block (an eager region is recomputed whole at its first use in the backward)."""
    if mode == "selective" and torch.is_grad_enabled() and torch.compiler.is_compiling():
        return _selective(functools.partial(stack, IN_REGION), *inputs)
    return stack(mode, *inputs)


def run_blocks(mode: bool | str, blocks: nn.ModuleList, x: Tensor, *args) -> Tensor:
    """x through every block(x, *args), kept as run_stack says."""
    def stack(block_mode: bool | str, x: Tensor) -> Tensor:
        for block in blocks:
            x = run_block(block_mode, block, x, *args)
        return x
    return run_stack(mode, stack, x)
