"""`--offload`: the transformer blocks' weights live in page-locked host memory and are copied to the device one
block ahead of use, on a side CUDA stream, so the copy of block i+1 overlaps the compute of block i.

Exact: the same tensors, the same kernels; only where the weights sit between calls changes. Each block's tensors
are packed into one flat host buffer (the parameters become views of it), so a block moves in one copy. The
buffer is page-locked in place with cudaHostRegister: exactly its own bytes. PyTorch's pinned allocator
(`Tensor.pin_memory`) rounds every block up to the next power of two, which for FLUX's 18-72 MiB weights would
pin ~1.5x the weights; it is only the fallback. A host that cannot pin (no CUDA driver) keeps pageable copies and
says so once.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
from torch import nn

logger = logging.getLogger(__name__)

ALIGN = 256  # bytes: every tensor of a packed block starts on this boundary (any dtype's view is aligned)


@dataclass(frozen=True)
class Slot:
    store: dict  # module._parameters or module._buffers
    name: str
    host: torch.Tensor  # the view of the block's host buffer the module keeps between calls
    offset: int
    dtype: torch.dtype
    shape: torch.Size


def _register(buffer: torch.Tensor) -> bool:
    """Page-lock `buffer`'s own bytes in place (cudaHostRegister), unregistered when the buffer is freed."""
    nbytes = buffer.numel() * buffer.element_size()
    if not torch.cuda.is_available() or nbytes == 0 or not buffer.is_contiguous():
        return False
    cudart = torch.cuda.cudart()
    pointer = buffer.data_ptr()
    if int(cudart.cudaHostRegister(pointer, nbytes, 0)) != 0:
        return False
    # on the tensor the offloader keeps for its lifetime (a storage's Python wrapper is made anew on each access)
    weakref.finalize(buffer, cudart.cudaHostUnregister, pointer)
    return True


def pin(tensor: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """A page-locked copy of a host tensor (or the tensor itself, locked in place), and whether it is locked."""
    if tensor.device.type != "cpu" or tensor.is_pinned():
        return tensor, tensor.device.type == "cpu"
    locked, kind = pin_buffer(tensor)
    return locked, kind != "none"


def pin_buffer(buffer: torch.Tensor) -> tuple[torch.Tensor, str]:
    """A page-locked host buffer and how it was locked: "registered" (in place, exact size), "allocator" (PyTorch's
    pinned allocator, power-of-two rounded) or "none" (this host cannot pin: no CUDA driver)."""
    if _register(buffer):
        return buffer, "registered"
    try:
        return buffer.pin_memory(), "allocator"
    except RuntimeError:  # no CUDA driver: pinning needs one
        return buffer, "none"


def pack_block(block: nn.Module) -> tuple[torch.Tensor, list[tuple[dict, str, torch.Tensor, int]]]:
    """One flat uint8 host buffer holding every parameter and buffer of `block` (ALIGN-spaced), and where each is."""
    entries, offset = [], 0
    for module in block.modules():
        for store in (module._parameters, module._buffers):
            for name, tensor in store.items():
                if tensor is None:
                    continue
                entries.append((store, name, tensor, offset))
                offset += -(-tensor.numel() * tensor.element_size() // ALIGN) * ALIGN
    flat = torch.empty(offset, dtype=torch.uint8)
    for _store, _name, tensor, start in entries:
        nbytes = tensor.numel() * tensor.element_size()
        flat[start:start + nbytes].copy_(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8))
    return flat, entries


def _view(flat: torch.Tensor, offset: int, dtype: torch.dtype, shape: torch.Size) -> torch.Tensor:
    nbytes = shape.numel() * dtype.itemsize
    return flat[offset:offset + nbytes].view(dtype).view(shape)


def _as_store_value(view: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return nn.Parameter(view, like.requires_grad) if isinstance(like, nn.Parameter) else view


@dataclass
class _Copy:
    flat: torch.Tensor
    event: torch.cuda.Event | None


class BlockOffloader:
    """Streams `blocks` (run in this order, every forward) to `device`, prefetching the next one."""

    def __init__(self, blocks: list[nn.Module], device: torch.device) -> None:
        self.device = torch.device(device)
        self.blocks = blocks
        self.index = {id(block): i for i, block in enumerate(blocks)}
        self.buffers: list[torch.Tensor] = []
        self.slots: list[list[Slot]] = []
        kinds = set()
        for block in blocks:
            flat, entries = pack_block(block)
            flat, kind = pin_buffer(flat)
            kinds.add(kind)
            slots = []
            for store, name, tensor, offset in entries:
                host = _as_store_value(_view(flat, offset, tensor.dtype, tensor.shape), tensor)
                store[name] = host  # the module keeps the (pinned) host view between calls
                slots.append(Slot(store, name, host, offset, tensor.dtype, tensor.shape))
            self.buffers.append(flat)
            self.slots.append(slots)
        self.pinning = "none" if "none" in kinds else "allocator" if "allocator" in kinds else "registered"
        self.pinned = self.pinning != "none"
        if not self.pinned and self.device.type == "cuda":
            logger.warning("--offload: host memory could not be pinned; weight copies will not overlap compute")
        self.stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self._ahead: dict[int, _Copy] = {}
        self.copied_bytes = 0

    @property
    def host_bytes(self) -> int:
        """Bytes of the packed host buffers (what is page-locked when `pinning` is "registered")."""
        return sum(flat.numel() for flat in self.buffers)

    def _issue(self, i: int) -> None:
        """Start copying block i to the device (on the side stream where there is one): one copy per block."""
        context = torch.cuda.stream(self.stream) if self.stream is not None else nullcontext()
        with context:
            flat = self.buffers[i].to(self.device, non_blocking=True)
            event = self.stream.record_event() if self.stream is not None else None
        self.copied_bytes += self.buffers[i].numel()
        self._ahead[i] = _Copy(flat, event)

    @contextmanager
    def resident(self, block: nn.Module) -> Iterator[None]:
        """`block`'s weights on the device for the duration (waiting for its prefetch), the next block's copy
        started meanwhile; the host views are put back afterwards."""
        i = self.index[id(block)]
        if i not in self._ahead:
            self._issue(i)
        copy = self._ahead.pop(i)
        if copy.event is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_event(copy.event)
            copy.flat.record_stream(current)  # allocated on the side stream, used on this one
        for slot in self.slots[i]:
            slot.store[slot.name] = _as_store_value(_view(copy.flat, slot.offset, slot.dtype, slot.shape), slot.host)
        following = (i + 1) % len(self.blocks)  # wraps: the next forward's first block
        if following not in self._ahead:
            self._issue(following)
        try:
            yield
        finally:
            for slot in self.slots[i]:
                slot.store[slot.name] = slot.host
