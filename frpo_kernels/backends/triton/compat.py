"""Differences between the triton versions the kernels run under (3.6, on the lent GPU machine,
to 3.9), kept out of the kernels themselves.

Interpreter: a scalar is a 1-element, 1-D numpy array there, and a loop bound (`range(0, V, ...)`)
becomes a Python int through tensor.__index__. triton <= 3.6 does that with int(array), which
numpy >= 2.4 refuses for arrays with ndim > 0 (TypeError 'only 0-dimensional arrays can be
converted to Python scalars'; numpy 2.3 only warned); triton 3.9 squeezes the array first.
fix_interpreter_index() gives an interpreter that has the problem 3.9's conversion. It changes
nothing the compiler sees: the compiled kernels are identical with or without it.
"""
from __future__ import annotations

import types


def _index_fails(patch_lang_tensor, scope_cls):
    """Whether the interpreter's tensor.__index__ fails on a 1-element, 1-D array (here)."""
    import numpy as np

    class Probe:
        pass

    scope = scope_cls()
    try:
        patch_lang_tensor(Probe, scope)
        probe = Probe()
        probe.handle = types.SimpleNamespace(data=np.ones(1, dtype=np.int32))
        try:
            return probe.__index__() != 1
        except TypeError:
            return True
    finally:
        scope.restore()


def fix_interpreter_index():
    """Makes triton's interpreter convert 1-element scalar tensors to int as triton 3.9 does, when
    the installed triton and numpy need it. Returns True if it patched. Idempotent; any surprise in
    triton's internals (other versions) leaves the interpreter as it is."""
    try:
        from triton.runtime import interpreter
    except ImportError:
        return False
    original = getattr(interpreter, "_patch_lang_tensor", None)
    scope_cls = getattr(interpreter, "_LangPatchScope", None)
    if original is None or scope_cls is None or getattr(original, "frpo_index_fix", False):
        return False
    try:
        if not _index_fails(original, scope_cls):
            return False
    except Exception:  # another signature or layout: not the version this fix is for
        return False

    def patch_lang_tensor(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    patch_lang_tensor.frpo_index_fix = True
    interpreter._patch_lang_tensor = patch_lang_tensor
    return True
