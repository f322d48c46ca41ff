"""KV cache buffers that follow the conversation, not the model's maximum context.

``KVCache`` (the fast graph): one buffer per layer for K and one for V, shaped ``[1, kv_heads, capacity,
head_dim]``. ``capacity`` starts at what the first prompt needs plus a margin and grows in chunks
(amortised: a copy every ``chunk`` tokens at most, never per step). For the GroupQueryAttention graph the
same buffer is bound as the past input and the present output, so the kernel appends in place and nothing
is concatenated. Rewinding (to reuse a shared chat prefix) is just moving ``length`` back: the stale tail is
overwritten by the next tokens.

``ConcatKVCache`` (the portable graph): standard ops compute ``present = Concat(past, new)``, a new tensor
of ``length + n`` tokens. Two flat buffers per tensor take turns: the past is read from one as a
contiguous ``[1, kv_heads, length, head_dim]`` prefix while onnxruntime writes the present into the other,
then they swap. The copy is the graph's; no step allocates. Both caches expose ``bind(binding, io, n)``
before a run and ``advance(n)`` after it, so the decode loop does not care which graph it drives.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort


def grown_capacity(total: int, chunk: int, max_capacity: int) -> int:
    """Capacity for ``total`` tokens: whole chunks with at least half a chunk of headroom, capped."""
    new_cap = min(max_capacity, -(-(total + chunk // 2) // chunk) * chunk)
    if new_cap < total:
        raise ValueError(f"KV cache needs {total} tokens, above its maximum {max_capacity}")
    return new_cap


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
        new_cap = grown_capacity(total, self.chunk, self.max_capacity)
        shape = (*self.shape_head, new_cap, self.head_dim)
        keys = [np.zeros(shape, self.dtype) for _ in range(self.num_layers)]
        values = [np.zeros(shape, self.dtype) for _ in range(self.num_layers)]
        n = self.length
        for old, new in zip(self.keys + self.values, keys + values):
            new[:, :, :n] = old[:, :, :n]
        key_ort = [ort.OrtValue.ortvalue_from_numpy(a) for a in keys]
        value_ort = [ort.OrtValue.ortvalue_from_numpy(a) for a in values]
        # one assignment: an interrupt before it leaves the old buffers and bindings whole
        self.keys, self.values, self.key_ort, self.value_ort, self.capacity, self.generation = (
            keys, values, key_ort, value_ort, new_cap, self.generation + 1)
        return True

    def rewind(self, length: int) -> None:
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot rewind KV cache of length {self.length} to {length}")
        self.length = length

    def reset(self) -> None:
        self.length = 0

    def bind(self, binding: ort.IOBinding, io, n: int) -> None:
        """Bind past/present for a run of ``n`` new tokens (once per allocation: the buffers do not move)."""
        self.ensure(self.length + n)
        if self._bound != (id(binding), self.generation):
            for i in range(self.num_layers):
                k, v = self.key_ort[i], self.value_ort[i]
                binding.bind_ortvalue_input(io.past_key % i, k)
                binding.bind_ortvalue_input(io.past_value % i, v)
                binding.bind_ortvalue_output(io.present_key % i, k)
                binding.bind_ortvalue_output(io.present_value % i, v)
            self._bound = (id(binding), self.generation)

    def advance(self, n: int) -> None:
        self.length += n

    _bound: tuple = (None, -1)


class ConcatKVCache:
    """Ping-pong buffers for graphs whose present output is a fresh ``past + new`` tensor."""

    def __init__(self, num_layers: int, kv_heads: int, head_dim: int, *, dtype=np.float32,
                 max_capacity: int, chunk: int = 256):
        self.num_layers, self.kv_heads, self.head_dim = num_layers, kv_heads, head_dim
        self.dtype = np.dtype(dtype)
        self.max_capacity, self.chunk = max_capacity, chunk
        self.length = 0
        self.capacity = 0
        # [side][tensor] flat arrays; tensor 2*i is layer i's K, 2*i+1 its V. ``side`` holds the valid past.
        self.flat: list[list[np.ndarray]] = [[], []]
        self.side = 0
        self.generation = 0  # bumps on every reallocation (as KVCache's)

    def nbytes(self) -> int:
        return sum(a.nbytes for side in self.flat for a in side)

    def _view(self, side: int, t: int, length: int) -> np.ndarray:
        per = self.kv_heads * self.head_dim
        return self.flat[side][t][: per * length].reshape(1, self.kv_heads, length, self.head_dim)

    def ensure(self, total: int) -> bool:
        if total <= self.capacity:
            return False
        new_cap = grown_capacity(total, self.chunk, self.max_capacity)
        size = self.kv_heads * new_cap * self.head_dim
        fresh = [[np.zeros(size, self.dtype) for _ in range(2 * self.num_layers)] for _ in range(2)]
        used = self.kv_heads * self.length * self.head_dim
        for t, old in enumerate(self.flat[self.side]):
            fresh[0][t][:used] = old[:used]  # same length, so the same contiguous layout
        self.flat, self.side, self.capacity = fresh, 0, new_cap
        self.generation += 1
        return True

    def rewind(self, length: int) -> None:
        """Keep the first ``length`` tokens. The layout depends on the length, so this is a copy."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot rewind KV cache of length {self.length} to {length}")
        if length < self.length and length > 0:
            other = 1 - self.side
            for t in range(2 * self.num_layers):
                self._view(other, t, length)[...] = self._view(self.side, t, self.length)[:, :, :length]
            self.side = other
        self.length = length

    def reset(self) -> None:
        self.length = 0

    def bind(self, binding: ort.IOBinding, io, n: int) -> None:
        self.ensure(self.length + n)
        past, total = self.length, self.length + n
        shape_in = (1, self.kv_heads, past, self.head_dim)
        shape_out = (1, self.kv_heads, total, self.head_dim)
        for i in range(self.num_layers):
            for t, past_name, present_name in ((2 * i, io.past_key % i, io.present_key % i),
                                               (2 * i + 1, io.past_value % i, io.present_value % i)):
                binding.bind_input(past_name, "cpu", 0, self.dtype, shape_in,
                                   self.flat[self.side][t].ctypes.data)
                binding.bind_output(present_name, "cpu", 0, self.dtype, shape_out,
                                    self.flat[1 - self.side][t].ctypes.data)

    def advance(self, n: int) -> None:
        self.length += n
        self.side = 1 - self.side
