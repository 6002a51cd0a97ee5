"""Interrupt checks inside a network's passes, so that a user's Cancel acts within a layer or so: one forward +
backward through a UNet can take seconds on a CPU, and the host's own check runs only between sampler steps."""
from __future__ import annotations

from contextlib import contextmanager


@contextmanager
def interruptible(check_interrupt):
    """A context in which `check_interrupt()` (which raises to stop) runs before every module's forward (a global
    forward pre-hook, removed on exit: only the calling node runs models meanwhile) and at every tensor autograd
    saves or reads back, i.e. throughout each backward pass. None: no checks."""
    if check_interrupt is None:
        yield
        return
    import torch

    def checked(tensor):
        check_interrupt()
        return tensor

    handle = torch.nn.modules.module.register_module_forward_pre_hook(lambda _module, _args: check_interrupt())
    try:
        with torch.autograd.graph.saved_tensors_hooks(checked, checked):
            yield
    finally:
        handle.remove()
