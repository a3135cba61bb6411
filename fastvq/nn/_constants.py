"""Constant buffers: tensors that a layer's constructor arguments fix (levels, scales, weights)."""

import torch
from torch import nn


class ConstantBuffers(nn.Module):
    """A module whose constants live in non-persistent buffers: they follow .to(device) as any
    buffer, but stay float32 under a cast of the module (a bf16 ResidualFSQ quantized with
    rounded scales: other tokens than the float32 checkpoint it came from) and keep their values
    under module.to_empty() after a build on the meta device, where load_state_dict cannot give
    them back (they are not in the state dict) and they held uninitialized memory. Each is
    restored from a CPU copy after every _apply."""

    def register_constant(self, name: str, value) -> None:
        """value: None, or numbers / a CPU tensor, kept as float32. Made on the CPU whatever the
        default device: under `with torch.device("meta")` a factory function gives a meta tensor,
        which has no values to keep."""
        if value is not None:
            value = torch.as_tensor(value, dtype=torch.float32, device="cpu")
        self.__dict__.setdefault("_constants", {})[name] = value
        self.register_buffer(name, value, persistent=False)

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        for name, value in self.__dict__.get("_constants", {}).items():
            if value is not None:
                self._buffers[name] = value.to(self._buffers[name].device)
        return self
