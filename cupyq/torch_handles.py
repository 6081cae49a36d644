"""Handles: the int keys by which ``torch.ops.cupyq.qgemm`` names a quantized matrix, and the module plumbing that
keeps a module's handle in step with the matrix it holds.

A handle is an int key into a module-level registry of weak references: registering never keeps a
matrix alive, the owner (``QuantizedLinear``, ``cupyq.exllamav2.QuantLinear``) does. Once the matrix
is garbage collected its handle is gone and calling the op with it raises ``ValueError``. A handle
names a matrix in one process only: the modules hold their matrix in a :class:`QMatrixAttribute`,
which registers whatever matrix it is given, and :class:`QMatrixModule` registers it again when a
module is unpickled or deep-copied, so a module always computes with the matrix it holds.
"""

from __future__ import annotations

import copy
import itertools
import threading
import weakref

__all__ = ["QMatrixAttribute", "QMatrixModule", "lookup_qmatrix", "register_qmatrix", "registered_handles",
           "unregister_qmatrix"]

_lock = threading.Lock()
_counter = itertools.count(1)  # handles are never reused, so a stale int can never name a new matrix
_by_handle: dict[int, weakref.ref] = {}
_by_object: dict[int, int] = {}  # id(qm) -> handle, valid while the weak reference is alive


class _StrongRef:
    """Callable holding a plain reference, for objects that cannot be weakly referenced."""

    __slots__ = ("obj",)

    def __init__(self, obj):
        self.obj = obj

    def __call__(self):
        return self.obj


def _forget(handle: int, key: int) -> None:
    with _lock:
        _by_handle.pop(handle, None)
        if _by_object.get(key) == handle:
            del _by_object[key]


def register_qmatrix(qm) -> int:
    """Register a quantized matrix and return its int handle (the same handle on every call for one object).

    qm: a ``cupyq.QMatrix`` (anything with ``in_features``/``out_features`` and accepted by
    ``cupyq.gemm``). Only a weak reference is kept: the caller must keep ``qm`` alive for as long as
    it uses the handle. The entry disappears when ``qm`` is garbage collected.
    """
    for attr in ("in_features", "out_features"):
        if not isinstance(getattr(qm, attr, None), int):
            raise TypeError(f"qm: expected a cupyq.QMatrix with an int {attr!r}, got {type(qm).__name__}")
    key = id(qm)
    with _lock:
        handle = _by_object.get(key)
        if handle is not None:
            ref = _by_handle.get(handle)
            if ref is not None and ref() is qm:
                return handle
        handle = next(_counter)
        try:
            ref = weakref.ref(qm, lambda _ref, h=handle, k=key: _forget(h, k))
        except TypeError:  # an object without weak-reference support stays registered until unregistered
            ref = _StrongRef(qm)
        _by_handle[handle] = ref
        _by_object[key] = handle
    return handle


def unregister_qmatrix(handle: int) -> None:
    """Drop ``handle`` from the registry (no error if it is already gone)."""
    with _lock:
        ref = _by_handle.pop(int(handle), None)
        obj = ref() if ref is not None else None
        if obj is not None and _by_object.get(id(obj)) == handle:
            del _by_object[id(obj)]


def lookup_qmatrix(handle: int):
    """The matrix registered under ``handle``; ``ValueError`` if unknown or already garbage collected."""
    ref = _by_handle.get(int(handle))
    qm = ref() if ref is not None else None
    if qm is None:
        raise ValueError(
            f"handle: no live quantized matrix is registered under handle {int(handle)} "
            "(its QMatrix was garbage collected or never registered)"
        )
    return qm


def registered_handles() -> list[int]:
    """Handles whose matrices are still alive (for diagnostics and tests)."""
    with _lock:
        return [h for h, ref in _by_handle.items() if ref() is not None]


class QMatrixAttribute:
    """A module attribute holding a QMatrix (or None) that keeps the module's handle attribute in step with it.

    handle_attr: the name of the plain attribute, read by ``forward``, that holds the handle of the matrix
    held. Assigning a matrix registers it (:func:`register_qmatrix`; TypeError for anything else, nothing
    changed) and stores its handle there; assigning None stores None in both. Reading returns the matrix.
    """

    def __init__(self, handle_attr: str):
        self.handle_attr = handle_attr
        self.key = None

    def __set_name__(self, owner, name):
        self.key = "_" + name

    def __get__(self, obj, owner=None):
        if obj is None:
            return self
        return obj.__dict__.get(self.key)

    def __set__(self, obj, qm):
        handle = None if qm is None else register_qmatrix(qm)
        obj.__dict__[self.key] = qm
        obj.__dict__[self.handle_attr] = handle


class QMatrixModule:
    """Pickling and deep copies for torch modules holding their matrices in :class:`QMatrixAttribute` attributes
    (a base placed before ``torch.nn.Module``).

    A handle names a matrix in one process only, so no handle leaves the module: unpickling (``torch.load``)
    and ``copy.deepcopy`` register the held matrices again. A CPU matrix pickles with its NumPy arrays; a GPU
    matrix refuses with TypeError (save the checkpoint instead). A deep copy shares the matrices (never
    modified) with the original, so either module may outlive the other, and shares the attributes named in
    ``_shared_on_copy`` (such as a scratch buffer); everything else is copied.
    """

    _shared_on_copy: tuple = ()

    @classmethod
    def _qmatrix_attributes(cls) -> list:
        found = {}
        for klass in reversed(cls.__mro__):
            found.update({name: a for name, a in vars(klass).items() if isinstance(a, QMatrixAttribute)})
        return list(found.values())

    def __getstate__(self):
        state = super().__getstate__()
        for attr in self._qmatrix_attributes():
            state[attr.handle_attr] = None  # registered again where the state is restored
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        for attr in self._qmatrix_attributes():
            attr.__set__(self, self.__dict__.get(attr.key))

    def __deepcopy__(self, memo):
        shared = [self.__dict__.get(attr.key) for attr in self._qmatrix_attributes()]
        shared += [self.__dict__.get(name) for name in self._shared_on_copy]
        for value in shared:
            if value is not None:
                memo.setdefault(id(value), value)
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        new.__setstate__(copy.deepcopy(self.__getstate__(), memo))
        return new
