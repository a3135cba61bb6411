"""Triton kernels and their host launchers, imported as fastvq.kernels (never `import kernels`)."""

import functools

import torch


def on_input_device(launcher):
    """Run a host launcher with its first tensor's GPU as the current device. Triton launches on
    the current device, not the tensors': with inputs on cuda:1 while cuda:0 is current, the
    kernel ran on cuda:0 with cuda:1's pointers (an illegal address, or another GPU's memory)."""

    @functools.wraps(launcher)
    def launch(x, *args, **kwargs):
        if not x.is_cuda:
            return launcher(x, *args, **kwargs)
        with torch.cuda.device(x.device):
            return launcher(x, *args, **kwargs)

    return launch
