"""Parameters as views of one flat buffer, so that an elementwise update of all of them (the
optimizer's, the evaluation EMA's, the target network's) is one op on one tensor instead of one
op per parameter (about 200 in the embedded default's U-Net).

    flatten_(params) -> buffer     params moved, in place, into consecutive views of one 1-D
                                   buffer, each with its own shape and strides (channels-last
                                   weights stay channels-last); the buffer they share already
                                   when they do; None when they cannot share one
    Flat(params).buffer            the buffer the parameters share (flatten_ at the start),
                                   looked up again after a parameter moved
    lerp_(a, b, weight)            a <- lerp(a, b, weight) for two Flats: one op
    shared(params) -> buffer       the 1-D buffer ``params`` are consecutive views of, else None
    pieces(buffer, params)         ``buffer`` cut into views shaped and strided as ``params``
    memory_order(t) -> 1-D view    a dense tensor's elements in the order they lie in memory
    dense(t)                       whether t's elements fill numel() consecutive places

A parameter's element sits in the buffer where it sits in the parameter's own memory, so a
buffer and the per-parameter tensors hold the same numbers in the same places; an elementwise
op computes each element alike wherever it sits, so one op on the buffer gives bitwise what the
op on every parameter gives (tests/test_fast_step.py).
"""

import torch


def dense(t):
    """Whether ``t``'s elements fill ``t.numel()`` consecutive places of its storage."""
    expected = 1
    for size, stride in sorted(zip(t.shape, t.stride(), strict=True), key=lambda d: d[1]):
        if size != 1 and stride != expected:
            return False
        expected *= size
    return True


def memory_order(t):
    """The 1-D view of a dense tensor ``t`` in its memory order (a contiguous one: its
    reshape(-1); a channels-last one: its NHWC order)."""
    return t.as_strided((t.numel(),), (1,))


def pieces(buffer, params):
    """``buffer`` cut into consecutive views shaped and strided as ``params`` (dense ones)."""
    views, offset = [], buffer.storage_offset()
    for p in params:
        views.append(buffer.as_strided(p.shape, p.stride(), offset))
        offset += p.numel()
    return views


def shared(params):
    """The 1-D buffer whose consecutive views ``params`` are (in this order, filling it), or
    None."""
    if not params:
        return None
    first = params[0].detach()
    storage, offset = first.untyped_storage(), first.storage_offset()
    size = 0
    for p in params:
        if (p.untyped_storage().data_ptr() != storage.data_ptr() or p.dtype != first.dtype
                or p.storage_offset() != offset + size or not dense(p)):
            return None
        size += p.numel()
    if storage.nbytes() != size * first.element_size():
        return None
    return first.as_strided((size,), (1,), offset)


def flatten_(params):
    """Move ``params`` (their .data) into consecutive views of one new 1-D buffer, values,
    shapes and strides kept, and return it; the buffer they share when they already do. None
    (and nothing moved) for mixed dtypes or devices, or a parameter that is not dense."""
    params = list(params)
    buffer = shared(params)
    if buffer is not None or not params:
        return buffer
    first = params[0]
    if any(p.dtype != first.dtype or p.device != first.device or not dense(p)
           for p in params):
        return None
    buffer = torch.empty(sum(p.numel() for p in params), dtype=first.dtype, device=first.device)
    with torch.no_grad():
        for p, view in zip(params, pieces(buffer, params), strict=True):
            view.copy_(p)
            p.data = view
    return buffer


class Flat:
    """A network's parameters ``params`` and the buffer they are consecutive views of
    (``shared``; flatten_ moves them into one first unless ``move`` is false): ``buffer`` is
    it, looked up again whenever a parameter's data moved (as by module.to): None while they
    share none."""

    def __init__(self, params, move=True):
        self.params = list(params)
        self._buffer = flatten_(self.params) if move else shared(self.params)
        self._pointers, self._layout = self._data(), self._strides()

    def _data(self):
        return tuple(p.data_ptr() for p in self.params)

    def _strides(self):
        return tuple((p.shape, p.stride()) for p in self.params)

    @property
    def buffer(self):
        pointers = self._data()
        if pointers != self._pointers:
            self._buffer, self._pointers, self._layout = shared(self.params), pointers, \
                self._strides()
        return self._buffer

    @property
    def layout(self):
        """The parameters' (shape, stride) when ``buffer`` was last looked up."""
        return self._layout


def lerp_(a, b, weight):
    """a <- lerp(a, b, weight) = a + weight (b - a) for Flat ``a`` and ``b``: one op on their
    buffers when both have one and their parameters are laid out alike, else one _foreach_ op
    over the parameters."""
    x, y = a.buffer, b.buffer  # first: they refresh the layouts after a move
    if x is not None and y is not None and a.layout == b.layout:
        x.lerp_(y, weight)
    else:
        torch._foreach_lerp_(a.params, b.params, weight)

