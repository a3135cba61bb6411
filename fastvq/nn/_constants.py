"""Constant buffers: tensors that a layer's constructor arguments fix (levels, scales, weights)."""

import torch
from torch import nn


class ConstantBuffers(nn.Module):
    """A module whose constants live in non-persistent buffers: they follow .to(device) as any
    buffer, but stay float32 under a cast of the module (a bf16 ResidualFSQ quantized with
    rounded scales: other tokens than the float32 checkpoint it came from) and keep their values
    under module.to_empty() after a build on the meta device, where load_state_dict cannot give
    them back (they are not in the state dict) and they held uninitialized memory.

    Each has a float32 CPU copy: refreshed before an _apply from a buffer the user assigned or
    edited in place since it was installed (a device-to-host copy only then), and installed
    after the _apply wherever the function replaced the buffer or it is not float32 (a .to() to
    the same device keeps it, as for any buffer)."""

    def register_constant(self, name: str, value) -> None:
        """value: None, or numbers / a CPU tensor, kept as float32. Made on the CPU whatever the
        default device: under `with torch.device("meta")` a factory function gives a meta tensor,
        which has no values to keep."""
        if value is not None:
            value = torch.as_tensor(value, dtype=torch.float32, device="cpu")
        self.__dict__.setdefault("_constants", {})[name] = value
        self.register_buffer(name, None if value is None else value.clone(), persistent=False)
        self._installed(name)

    def _installed(self, name: str) -> None:
        buf = self._buffers[name]
        self.__dict__.setdefault("_constant_state", {})[name] = (
            None if buf is None else (buf, _version(buf))
        )

    def _apply(self, fn, recurse=True):
        constants = self.__dict__.get("_constants", {})
        state = self.__dict__.get("_constant_state", {})
        before = {}
        for name in constants:
            buf = before[name] = self._buffers.get(name)
            seen = state.get(name)
            changed = seen is None or seen[0] is not buf or seen[1] != _version(buf)
            if buf is not None and not buf.is_meta and changed:
                constants[name] = buf.detach().to("cpu", torch.float32, copy=True)
        super()._apply(fn, recurse)
        for name, value in constants.items():
            new = self._buffers.get(name)
            replaced = new is not before[name] or new.dtype != torch.float32
            if value is not None and new is not None and replaced:
                self._buffers[name] = value.to(new.device, copy=True)
            self._installed(name)
        return self


def _version(t: torch.Tensor) -> int | None:
    """t's version counter; None for an inference tensor (made under torch.inference_mode,
    which tracks none: it cannot have been edited in place since outside that mode)."""
    return None if t.is_inference() else t._version
