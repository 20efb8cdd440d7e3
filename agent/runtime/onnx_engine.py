"""ONNX Runtime behind the :class:`~agent.runtime.engine.Engine` interface.

Importing this module imports onnxruntime, so only :func:`agent.runtime.load_engine` (or an
explicit import) should bring it in; the daemon starts without it.

Invariants:

* specs are read once from the session at load: ORT type strings map to numpy dtype names and
  symbolic or unknown dims to ``None``; a model whose inputs or outputs are not plain tensors
  (sequences, maps, strings) is refused at load rather than failing on the first request;
* every onnxruntime exception, at load or at run, is re-raised as ``EngineError`` from the
  original by :func:`_translate_errors`, the single boundary with the backend;
* providers are checked against the installed build up front, because ORT would otherwise
  only warn and silently fall back to CPU.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from onnxruntime.capi import onnxruntime_pybind11_state as _ort_state

from agent.runtime.engine import Engine, EngineError, TensorSpec, translate_errors
from agent.runtime.options import check_providers

__all__ = ["DEFAULT_PROVIDERS", "OnnxEngine"]

DEFAULT_PROVIDERS: tuple[str, ...] = ("CPUExecutionProvider",)

_ORT_DTYPES: dict[str, str] = {
    "tensor(float)": "float32",
    "tensor(double)": "float64",
    "tensor(float16)": "float16",
    "tensor(int8)": "int8",
    "tensor(int16)": "int16",
    "tensor(int32)": "int32",
    "tensor(int64)": "int64",
    "tensor(uint8)": "uint8",
    "tensor(uint16)": "uint16",
    "tensor(uint32)": "uint32",
    "tensor(uint64)": "uint64",
    "tensor(bool)": "bool",
}

# The binding's own exception classes (Fail, InvalidArgument, NoSuchFile, ...; the set grows
# between releases) plus what its Python wrapper raises directly.
_ORT_ERRORS: tuple[type[Exception], ...] = (
    *(
        obj
        for obj in vars(_ort_state).values()
        if isinstance(obj, type) and issubclass(obj, Exception)
    ),
    RuntimeError,
    ValueError,
)


_Runner = Callable[[list[str], dict[str, np.ndarray], Any], list[np.ndarray]]


def _runner_for(session: ort.InferenceSession, providers: Sequence[str]) -> _Runner:
    """The binding's own ``run`` when the session is CPU-only, else the public one.

    ``InferenceSession.run`` first re-checks what :class:`Engine` has already checked (input
    names, OrtValue ownership, graph capture) and then calls the binding: ~1 us per call,
    1% of a 100 us inference. Its one other job, retrying on the CPU when an accelerator's
    provider fails, cannot arise with the CPU provider alone. ``_sess`` is not public API,
    so its absence (another onnxruntime) just means the public path."""
    binding = getattr(session, "_sess", None)
    if list(providers) == ["CPUExecutionProvider"] and callable(getattr(binding, "run", None)):
        return binding.run  # type: ignore[union-attr]
    return session.run


def _translate_errors(action: str):
    return translate_errors(_ORT_ERRORS, action)


class OnnxEngine(Engine):
    """A model loaded into an ``onnxruntime.InferenceSession``.

    ``intra_op_threads`` / ``inter_op_threads`` of ``None`` keep ORT's defaults (all cores).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        providers: Sequence[str] | None = None,
        intra_op_threads: int | None = None,
        inter_op_threads: int | None = None,
    ) -> None:
        self.path = Path(path)
        chosen = list(providers) if providers else list(DEFAULT_PROVIDERS)
        check_providers(chosen)
        if not self.path.is_file():
            raise EngineError(f"cannot load ONNX model {self.path}: no such file")

        options = ort.SessionOptions()
        options.log_severity_level = 3  # errors only; failures reach the caller as EngineError
        if intra_op_threads is not None:
            options.intra_op_num_threads = intra_op_threads
        if inter_op_threads is not None:
            options.inter_op_num_threads = inter_op_threads

        with _translate_errors(f"cannot load ONNX model {self.path}"):
            session = ort.InferenceSession(str(self.path), options, providers=chosen)
        self._session: ort.InferenceSession | None = session
        self._runner: _Runner | None = _runner_for(session, chosen)
        super().__init__(
            [_spec(arg) for arg in session.get_inputs()],
            [_spec(arg) for arg in session.get_outputs()],
        )
        self._output_names = [spec.name for spec in self._outputs]

    @property
    def providers(self) -> list[str]:
        """The providers the session actually uses, in priority order."""
        return list(self._live_session().get_providers())

    def _run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        runner = self._runner  # a local reference keeps a concurrent close() harmless
        if runner is None:
            raise RuntimeError("OnnxEngine is closed")
        names = self._output_names
        try:  # not _translate_errors: a context manager costs a microsecond on the hot path
            values = runner(names, feeds, None)
        except _ORT_ERRORS as exc:
            raise EngineError(f"inference failed for {self.path.name}: {exc}") from exc
        if len(values) == 1:  # a dict display, not dict(zip()): see Engine.infer on cold code
            return {names[0]: values[0]}
        return dict(zip(names, values, strict=True))

    def _close(self) -> None:
        self._runner = None  # ORT has no close(); dropping the last references frees it
        self._session = None

    def _live_session(self) -> ort.InferenceSession:
        session = self._session
        if session is None:
            raise RuntimeError("OnnxEngine is closed")
        return session


def _spec(arg: Any) -> TensorSpec:
    """``arg`` is an ``onnxruntime.NodeArg``."""
    dtype = _ORT_DTYPES.get(arg.type)
    if dtype is None:
        raise EngineError(f"{arg.name!r} has type {arg.type}, which OnnxEngine does not support")
    shape = tuple(dim if isinstance(dim, int) and dim >= 0 else None for dim in (arg.shape or ()))
    return TensorSpec(name=arg.name, dtype=dtype, shape=shape)
