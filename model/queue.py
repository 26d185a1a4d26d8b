"""The MoCo dictionary: a preallocated ring buffer of K keys with a write pointer.

The reference code keeps a (dim, K) queue and refuses ``K % batch_size != 0``; here
the buffer is (K, dim), row i is one key, and a write that runs past the end wraps
around, so any K and any batch size work. Keys may be stored in half precision to
halve the memory and bandwidth of the K x dim read each step; they are read back as
float32. Buffer and pointer are registered buffers, so they are in the module's state
dict and a resumed run keeps its dictionary.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["KeyQueue"]


class KeyQueue(nn.Module):
    """Ring buffer of l2-normalised keys.

    Args:
        K: number of keys (negatives) held.
        dim: key dimension.
        dtype: storage dtype (float32 default; float16 / bfloat16 to save memory).
        seed: seed of the random unit vectors it starts with; the same seed on every
            rank gives every rank the same initial queue without a broadcast.
    """

    def __init__(self, K: int, dim: int, dtype: torch.dtype = torch.float32, seed: int = 0):
        super().__init__()
        if K < 1 or dim < 1:
            raise ValueError(f"queue size K and dim must be positive, got K={K}, dim={dim}")
        generator = torch.Generator().manual_seed(seed)
        keys = nn.functional.normalize(torch.randn(K, dim, generator=generator), dim=1)
        self.register_buffer("queue", keys.to(dtype))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))

    @property
    def K(self) -> int:
        return self.queue.shape[0]

    def keys(self) -> torch.Tensor:
        """A float32 copy of all K keys, in storage order (the order changes no loss).

        A copy, because autograd keeps it for the gradient of the negative logits
        while the enqueue that follows overwrites the buffer in place.
        """
        return self.queue.to(torch.float32, copy=True)

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor) -> None:
        """Write ``keys`` (n, dim) over the oldest entries, wrapping past the end.

        The pointer stays on the device, so enqueueing never waits for the GPU.
        """
        n = keys.shape[0]
        if n > self.K:
            raise ValueError(
                f"cannot enqueue {n} keys into a queue of K={self.K}; use K >= the global batch"
            )
        positions = (self.queue_ptr + torch.arange(n, device=self.queue.device)) % self.K
        self.queue.index_copy_(0, positions, keys.detach().to(self.queue.dtype))
        self.queue_ptr.copy_((self.queue_ptr + n) % self.K)

    def oldest_first(self) -> torch.Tensor:
        """The keys from oldest to newest, the order of the paper's FIFO queue."""
        return torch.roll(self.queue, -int(self.queue_ptr), dims=0)
