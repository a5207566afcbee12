"""Host arrays to the device: packed into one pinned buffer, sent in one asynchronous copy.

Why pinned: a copy from pageable memory goes through the driver's staging buffer, and one larger
than that buffer (a prefill step's token ids, a wide block table) makes the host wait until the
stream reaches the copy, which with a step in flight means until the device finishes that step.
The host then launches the rest of the next step while the device sits idle. Pinned memory is
read by DMA when the stream gets there, so the host goes on launching at once.

Why one buffer: each copy costs the host tens of microseconds to issue, which adds up at
small batches where the host bounds the step. PyTorch's caching host allocator keeps a pinned
block from reuse until its copy is done, so the buffer needs no lifetime management here.
"""

from __future__ import annotations

import functools

import numpy as np
import torch

# Each array starts at a multiple of this many bytes, so that every dtype's view is aligned.
_ALIGN = 16


def upload(arrays: list[np.ndarray], device: torch.device) -> list[torch.Tensor]:
    """The arrays as device tensors of the same dtypes and shapes, in one copy. On the CPU they
    share the arrays' memory, as `torch.from_numpy` does."""
    if device.type != "cuda":
        return [torch.from_numpy(np.ascontiguousarray(a)) for a in arrays]
    offsets = np.zeros(len(arrays) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([aligned(a.nbytes) for a in arrays])
    host = torch.empty(max(int(offsets[-1]), 1), dtype=torch.uint8, pin_memory=True)
    host_bytes = host.numpy()
    for array, start in zip(arrays, offsets):
        host_bytes[start:start + array.nbytes] = np.ascontiguousarray(array).reshape(-1).view(np.uint8)
    packed = host.to(device, non_blocking=True)
    return [packed[start:start + a.nbytes].view(torch_dtype(a.dtype)).view(a.shape)
            for a, start in zip(arrays, offsets)]


def aligned(num_bytes: int) -> int:
    """num_bytes rounded up so that what follows starts aligned for any dtype."""
    return -(-num_bytes // _ALIGN) * _ALIGN


@functools.cache
def torch_dtype(dtype: np.dtype) -> torch.dtype:
    return torch.from_numpy(np.empty(0, dtype)).dtype
