"""KV cache buffers that follow the conversation, not the model's maximum context.

One buffer per layer for K and one for V, shaped ``[1, kv_heads, capacity, head_dim]``. ``capacity`` starts at
what the first prompt needs plus a margin and grows in chunks (amortised: a copy every ``chunk`` tokens at
most, never per step). For the GroupQueryAttention graph the same buffer is bound as the past input and the
present output, so the kernel appends in place and nothing is concatenated. Rewinding (to reuse a shared
chat prefix) is just moving ``length`` back: the stale tail is overwritten by the next tokens.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort


class KVCache:
    def __init__(self, num_layers: int, kv_heads: int, head_dim: int, *, dtype=np.float32,
                 max_capacity: int, chunk: int = 256):
        self.num_layers = num_layers
        self.shape_head = (1, kv_heads)
        self.head_dim = head_dim
        self.dtype = np.dtype(dtype)
        self.max_capacity = max_capacity
        self.chunk = chunk
        self.length = 0  # tokens whose K/V are valid
        self.capacity = 0
        self.keys: list[np.ndarray] = []
        self.values: list[np.ndarray] = []
        self.key_ort: list[ort.OrtValue] = []
        self.value_ort: list[ort.OrtValue] = []
        self.generation = 0  # bumps whenever buffers are reallocated, so bindings know to refresh

    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.keys) + sum(a.nbytes for a in self.values)

    def ensure(self, total: int) -> bool:
        """Make room for ``total`` tokens; returns True when buffers were (re)allocated."""
        if total <= self.capacity:
            return False
        new_cap = min(self.max_capacity, -(-(total + self.chunk // 2) // self.chunk) * self.chunk)
        if new_cap < total:
            raise ValueError(f"KV cache needs {total} tokens, above its maximum {self.max_capacity}")
        shape = (*self.shape_head, new_cap, self.head_dim)
        keys = [np.zeros(shape, self.dtype) for _ in range(self.num_layers)]
        values = [np.zeros(shape, self.dtype) for _ in range(self.num_layers)]
        n = self.length
        for old, new in zip(self.keys + self.values, keys + values):
            new[:, :, :n] = old[:, :, :n]
        self.keys, self.values, self.capacity = keys, values, new_cap
        self.key_ort = [ort.OrtValue.ortvalue_from_numpy(a) for a in keys]
        self.value_ort = [ort.OrtValue.ortvalue_from_numpy(a) for a in values]
        self.generation += 1
        return True

    def rewind(self, length: int) -> None:
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot rewind KV cache of length {self.length} to {length}")
        self.length = length

    def reset(self) -> None:
        self.length = 0
