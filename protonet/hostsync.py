"""Host copies of device tensors for pycaffe's `.data`/`.diff` off the CPU.

numpy cannot view GPU memory, so a Net on a GPU shows each blob or param through
a persistent host buffer, as Caffe's SyncedMemory does: reading `.data` copies the
device values into that buffer if the device has newer ones, and leaves the head
at the host (the script may write into it); the next pass, update, copy_from or
save copies host values back to the device first, then takes the head there.
Only tensors a script has looked at get a buffer, so nothing is copied for the rest.
"""
from __future__ import annotations

import os
import weakref
from typing import Callable

import numpy as np
import torch

AT_HOST, AT_DEVICE, SYNCED = "host", "device", "synced"

# Buffers whose host side may hold writes the device has not seen yet. One set for
# all nets: a param shared by two nets (a solver's test nets) has one buffer.
_pending: set["HostCopy"] = set()


def forced() -> bool:
    """Test hook: PROTONET_PYCAFFE_SYNCED=1 shows CPU nets through host buffers
    separate from their tensors too, so this path runs where there is no GPU."""
    return os.environ.get("PROTONET_PYCAFFE_SYNCED") == "1"


class HostCopy:
    """One tensor's host buffer and where its newest values are (Caffe's head).

    `get()` gives the device tensor as it is now (it may be replaced between
    calls); `put(host_tensor)` makes the host values the device's."""

    __slots__ = ("host", "head", "_get", "_put", "__weakref__")

    def __init__(self, get: Callable[[], torch.Tensor],
                 put: Callable[[torch.Tensor], None]):
        self.host: np.ndarray | None = None
        self.head = AT_DEVICE
        self._get, self._put = get, put

    def show(self) -> np.ndarray:
        """Caffe's mutable_cpu_data: the host buffer, current, head at the host."""
        if self.head == AT_DEVICE or self.host is None:
            tensor = self._get().detach()
            shape = tuple(tensor.shape)
            if self.host is None or self.host.shape != shape:   # a reshape reallocates
                self.host = np.empty(shape, dtype=np.float32)
            torch.from_numpy(self.host).copy_(tensor)
        self.head = AT_HOST
        _pending.add(self)
        return self.host

    def push(self) -> None:
        """Caffe's to_gpu: host writes reach the device tensor."""
        if self.head == AT_HOST:
            self._put(torch.from_numpy(self.host))
            self.head = SYNCED
        _pending.discard(self)

    def refresh(self) -> None:
        """Copy the device values into the host buffer now, for an op Caffe runs
        where the head is (Blob::Update on host memory a script holds)."""
        if self.host is not None:
            torch.from_numpy(self.host).copy_(self._get().detach().reshape(self.host.shape))
            self.head = SYNCED
        _pending.discard(self)

    def changed(self) -> None:
        """The device wrote the tensor (a pass, an update): the host copy is stale.
        Host writes were pushed when the pass began (push_pending)."""
        _pending.discard(self)
        self.head = AT_DEVICE

    def drop(self) -> None:
        """The tensor is gone (a reshape gave the blob new memory)."""
        _pending.discard(self)
        self.host, self.head = None, AT_DEVICE


def push_pending() -> None:
    """Before the device reads anything: every host write goes to its tensor."""
    while _pending:
        _pending.pop().push()


# Param buffers, by (id(param), diff): one per Parameter, whichever net shows it
# (solver test nets, share_with share Parameters). Held here rather than on the
# Parameter so that pickling or copying a module never meets them; an entry goes
# when its Parameter does.
_params: dict[tuple[int, bool], HostCopy] = {}


def param_copy(leaf: torch.Tensor, diff: bool) -> HostCopy:
    """The host buffer of a param's data or diff."""
    key = (id(leaf), diff)
    copy = _params.get(key)
    if copy is None:
        ref = weakref.ref(leaf)
        if diff:
            copy = HostCopy(lambda: _grad(ref()), lambda host: _put_grad(ref(), host))
        else:
            copy = HostCopy(lambda: ref(), lambda host: _put_data(ref(), host))
        _params[key] = copy
        weakref.finalize(leaf, _forget, key)
    return copy


def _forget(key: tuple[int, bool]) -> None:
    copy = _params.pop(key, None)
    if copy is not None:
        _pending.discard(copy)


def held(leaves, diff: bool) -> list[HostCopy]:
    """The param buffers among `leaves` a script read or wrote since the last pass
    (head at the host)."""
    copies = (_params.get((id(leaf), diff)) for leaf in leaves)
    return [c for c in copies if c is not None and c.head == AT_HOST]


def params_changed(leaves, data: bool = False, diff: bool = False) -> None:
    """Mark the shown params among `leaves` as written on the device."""
    if not _params:
        return
    for leaf in leaves:
        for want, kind in ((data, False), (diff, True)):
            copy = _params.get((id(leaf), kind)) if want else None
            if copy is not None:
                copy.changed()


def _grad(leaf: torch.Tensor) -> torch.Tensor:
    if leaf.grad is None:
        leaf.grad = torch.zeros_like(leaf)
    return leaf.grad


def _put_data(leaf: torch.Tensor, host: torch.Tensor) -> None:
    """Into the Parameter itself (solvers and shared layers hold it); weights a
    script only read are left alone, so a forward's graph stays usable."""
    new = host.reshape(leaf.shape).to(leaf.device, leaf.dtype)
    if not torch.equal(leaf.detach(), new):
        with torch.no_grad():
            leaf.copy_(new)


def _put_grad(leaf: torch.Tensor, host: torch.Tensor) -> None:
    with torch.no_grad():
        if leaf.grad is None or leaf.grad.shape != leaf.shape:
            leaf.grad = host.reshape(leaf.shape).to(leaf.device, leaf.dtype, copy=True)
        else:
            leaf.grad.copy_(host.reshape(leaf.shape))
