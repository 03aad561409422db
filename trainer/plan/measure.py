"""Counting the bytes a forward and backward pass holds, by watching every op (works on meta tensors).

`LiveBytes` is a `TorchDispatchMode` that sees each op's outputs: an output that aliases no input (a
new allocation, per the op's schema) adds its storage's bytes, and a weak reference takes them off
when the storage dies. Its peak is what an allocator would hold at most for the tensors made inside
the mode (the weights, made before, are not counted), activations and temporaries and gradients
alike, without allocating anything on the meta device. Allocator rounding and workspace buffers
(cuBLAS, attention kernels) are not modelled.
"""

from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class LiveBytes(TorchDispatchMode):
    """Tracks the bytes of tensors created inside the mode: `live` now, `peak` at most."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._seen: set[int] = set()

    def _free(self, key: int, nbytes: int) -> None:
        self._seen.discard(key)
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        returns = func._schema.returns
        flat, _ = tree_flatten(out)
        for i, t in enumerate(flat):
            if not isinstance(t, torch.Tensor):
                continue
            if i < len(returns) and returns[i].alias_info is not None:
                continue  # a view or an in-place result: no new memory
            storage = t.untyped_storage()
            key = id(storage)
            if key in self._seen:
                continue
            nbytes = storage.nbytes()
            self._seen.add(key)
            self.live += nbytes
            self.peak = max(self.peak, self.live)
            weakref.finalize(storage, self._free, key, nbytes)
        return out


class SavedBytes:
    """Bytes autograd saves for the backward pass (activations), counted once per storage and leaving
    out parameters and buffers (they are the weights). A context manager around a forward pass."""

    def __init__(self, *modules: torch.nn.Module) -> None:
        self.total = 0
        self._skip = {id(t.untyped_storage()) for m in modules for t in [*m.parameters(), *m.buffers()]}
        self._seen: set[int] = set()
        self._keep: list = []  # the storages, so that ids stay unique while counting

    def _pack(self, t: torch.Tensor):
        storage = t.untyped_storage()
        key = id(storage)
        if key not in self._skip and key not in self._seen and not isinstance(t, torch.nn.Parameter):
            self._seen.add(key)
            self._keep.append(storage)
            self.total += storage.nbytes()
        return t

    def __enter__(self) -> SavedBytes:
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)
        self._keep.clear()


class GpuAttention:
    """Within the context, attention on meta tensors runs as the GPU's memory-efficient kernel
    (`aten._scaled_dot_product_efficient_attention`: it keeps the output and the log-sum-exp for the
    backward pass, not the (S, S) weights that the math fallback chosen on meta would keep)."""

    def __enter__(self) -> GpuAttention:
        import torch.nn.functional as F

        self._orig = F.scaled_dot_product_attention

        def sdpa(
            query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False
        ):
            q, k, v = query, key, value
            if q.device.type != "meta" or enable_gqa:
                return self._orig(
                    q, k, v, attn_mask, dropout_p, is_causal, scale=scale, enable_gqa=enable_gqa
                )
            if attn_mask is not None and attn_mask.dtype == torch.bool:
                attn_mask = torch.zeros(attn_mask.shape, dtype=q.dtype, device=q.device)
            if attn_mask is not None:
                attn_mask = attn_mask.to(q.dtype).expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2])
            grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
            return torch.ops.aten._scaled_dot_product_efficient_attention(
                q, k, v, attn_mask, grad, dropout_p, is_causal, scale=scale
            )[0]

        F.scaled_dot_product_attention = sdpa
        return self

    def __exit__(self, *exc) -> None:
        import torch.nn.functional as F

        F.scaled_dot_product_attention = self._orig
