"""`--offload`: the transformer blocks' weights live in pinned host memory and are copied to the device one
block ahead of use, on a side CUDA stream, so the copy of block i+1 overlaps the compute of block i.

Exact: the same tensors, the same kernels; only where the weights sit between calls changes. Pinned (page-locked)
memory is what lets `non_blocking` copies run asynchronously at full PCIe/NVLink bandwidth; a host where pinning
is impossible (no CUDA driver) keeps pageable copies and says so once.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
from torch import nn

logger = logging.getLogger(__name__)

Slot = tuple[dict, str, torch.Tensor]  # (module._parameters or _buffers, name, host tensor)


def pin(tensor: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """A page-locked copy of a host tensor, or the tensor itself where this host cannot pin memory."""
    if tensor.device.type != "cpu" or tensor.is_pinned():
        return tensor, tensor.device.type == "cpu"
    try:
        return tensor.pin_memory(), True
    except RuntimeError:  # no CUDA driver: pinning needs one
        return tensor, False


@dataclass
class _Copy:
    tensors: list[torch.Tensor]
    event: torch.cuda.Event | None


class BlockOffloader:
    """Streams `blocks` (run in this order, every forward) to `device`, prefetching the next one."""

    def __init__(self, blocks: list[nn.Module], device: torch.device) -> None:
        self.device = torch.device(device)
        self.blocks = blocks
        self.index = {id(block): i for i, block in enumerate(blocks)}
        self.slots: list[list[Slot]] = []
        pinned_all = True
        for block in blocks:
            slots = []
            for module in block.modules():
                for store in (module._parameters, module._buffers):
                    for name, tensor in store.items():
                        if tensor is None:
                            continue
                        host, pinned = pin(tensor.detach().cpu())
                        pinned_all &= pinned
                        # the module keeps the (pinned) host tensor between calls
                        store[name] = nn.Parameter(host, tensor.requires_grad) if isinstance(tensor, nn.Parameter) else host
                        slots.append((store, name, store[name]))
            self.slots.append(slots)
        self.pinned = pinned_all
        if not pinned_all and self.device.type == "cuda":
            logger.warning("--offload: host memory could not be pinned; weight copies will not overlap compute")
        self.stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self._ahead: dict[int, _Copy] = {}
        self.copied_bytes = 0

    def _issue(self, i: int) -> None:
        """Start copying block i to the device (on the side stream where there is one)."""
        context = torch.cuda.stream(self.stream) if self.stream is not None else nullcontext()
        with context:
            tensors = [tensor.detach().to(self.device, non_blocking=True) for _, _, tensor in self.slots[i]]
            event = self.stream.record_event() if self.stream is not None else None
        self.copied_bytes += sum(t.numel() * t.element_size() for _, _, t in self.slots[i])
        self._ahead[i] = _Copy(tensors, event)

    @contextmanager
    def resident(self, block: nn.Module) -> Iterator[None]:
        """`block`'s weights on the device for the duration (waiting for its prefetch), the next block's copy
        started meanwhile; the host tensors are put back afterwards."""
        i = self.index[id(block)]
        if i not in self._ahead:
            self._issue(i)
        copy = self._ahead.pop(i)
        if copy.event is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_event(copy.event)
            for tensor in copy.tensors:  # allocated on the side stream, used on this one
                tensor.record_stream(current)
        for (store, name, host), moved in zip(self.slots[i], copy.tensors, strict=True):
            store[name] = nn.Parameter(moved, host.requires_grad) if isinstance(host, nn.Parameter) else moved
        following = (i + 1) % len(self.blocks)  # wraps: the next forward's first block
        if following not in self._ahead:
            self._issue(following)
        try:
            yield
        finally:
            for store, name, host in self.slots[i]:
                store[name] = host
