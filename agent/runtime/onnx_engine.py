"""ONNX Runtime behind the :class:`~agent.runtime.engine.Engine` interface.

Importing this module imports onnxruntime, so only :func:`agent.runtime.load_engine` (or an
explicit import) should bring it in; the daemon starts without it.

Invariants:

* specs are read once from the session at load: ORT type strings map to numpy dtype names and
  symbolic or unknown dims to ``None``; a model whose inputs or outputs are not plain tensors
  (sequences, maps, strings) is refused at load rather than failing on the first request;
* every onnxruntime exception, at load or at run, is re-raised as ``EngineError`` from the
  original by :func:`_translate_errors`, the single boundary with the backend; at run, the
  ones that are the input's fault become ``RejectedInputError`` (:func:`_refused_input`);
* providers are checked against the installed build up front, because ORT would otherwise
  only warn and silently fall back to CPU.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from onnxruntime.capi import onnxruntime_pybind11_state as _ort_state

from agent.runtime.engine import (
    Engine,
    EngineError,
    RejectedInputError,
    TensorSpec,
    translate_errors,
)
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


# "... while running Gather node. Name:'check' Status Message: <what the kernel said>"
_KERNEL_FAILURE = re.compile(
    r"while running (?P<op>\S+) node\. Name:'(?P<node>[^']*)' Status Message: (?P<said>.*)",
    re.DOTALL,
)
# ORT_ENFORCE's prefix: "/onnxruntime_src/.../file.h:563 void f(...) cond was false. "
_ENFORCE_PREFIX = re.compile(r"^\S+:\d+ .*? was false\. ", re.DOTALL)


def _refused_input(
    exc: Exception, answered: bool, input_names: Sequence[str]
) -> RejectedInputError | None:
    """The caller's input, not the model, when ONNX Runtime failed this way; else None.

    A schema can only say dtype, rank and fixed dims. A model may take fewer values than
    that: Silero VAD computes only at 8000 or 16000 Hz, PP-OCR's detector only at heights
    and widths that are multiples of 32, inputs sharing a symbolic batch dim must agree.
    ORT then fails inside a kernel, and the question is whose fault it is: a 422 for the
    caller (counted as a client error) or a 500 for the model (counted as a model error,
    which halts rollouts). The rule:

    * ORT's own check of a feed against the graph's declared inputs (``INVALID_ARGUMENT``
      not raised by a kernel) is always about the input.
    * A kernel's refusal (``INVALID_ARGUMENT``: bad indices, values; ``FAIL``: its shape
      checks, ``ORT_ENFORCE``: broadcasting, reshape sizes) is the input's only once this
      engine has answered another input. The model then loads, binds and runs the same
      graph with the same kernels: what changed is the data. Before any answer (a bundle
      without health-check samples) nothing shows the model works, so it is the model's.
    * Everything else is the model's or the device's: a failed memory allocation, an
      execution provider's failure, ``RUNTIME_EXCEPTION``, ``NOT_IMPLEMENTED``, ...

    The cost of the rule: a model that fails on inputs its schema allows (a batch of 2
    through a graph with batch 1 baked into a Reshape) is reported by its callers' 422s and
    the ``client_error_count`` of heartbeats, not by the model error rate.
    """
    message = str(exc)
    kernel = _KERNEL_FAILURE.search(message)
    if isinstance(exc, _ort_state.InvalidArgument) and kernel is None:
        reason = message.partition("INVALID_ARGUMENT : ")[2] or message
    elif (
        kernel is not None
        and answered
        and isinstance(exc, _ort_state.InvalidArgument | _ort_state.Fail)
        and "allocate" not in message.lower()
    ):
        reason = _said(exc)
    else:
        return None
    return RejectedInputError(" ".join(reason.split()), _named_input(message, input_names))


def _said(exc: Exception) -> str:
    """ORT's message on one line: a kernel's failure as "Op node 'name': what it said",
    without ORT's status prefix and source paths; anything else as it is."""
    message = str(exc)
    kernel = _KERNEL_FAILURE.search(message)
    if kernel is None:
        return " ".join(message.split())
    said = _ENFORCE_PREFIX.sub("", kernel["said"].strip())
    node = f" {kernel['node']!r}" if kernel["node"] else ""
    return " ".join(f"{kernel['op']} node{node}: {said}".split())


def _named_input(message: str, input_names: Sequence[str]) -> str | None:
    """The one input the runtime's message names ("input: state", "input 'sr'"), if any."""
    named = [
        name for name in input_names
        if re.search(rf"(?:\binput:? *'?|')({re.escape(name)})(?:'|\b)", message)
    ]
    return named[0] if len(named) == 1 else None


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
        # Fatal only: every failure reaches the caller as EngineError, and a client sending
        # inputs the model refuses must not write a runtime error line per request.
        options.log_severity_level = 4
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
        self._input_names = tuple(spec.name for spec in self._inputs)
        self._metadata = dict(session.get_modelmeta().custom_metadata_map)

    @property
    def metadata(self) -> dict[str, str]:
        """The model's ``metadata_props`` (ORT's ``custom_metadata_map``), e.g. an OCR
        recogniser's character dictionary."""
        return dict(self._metadata)

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
            refused = _refused_input(exc, self._answered, self._input_names)
            if refused is not None:
                raise refused from exc
            raise EngineError(f"inference failed for {self.path.name}: {_said(exc)}") from exc
        self._answered = True
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
    dims = arg.shape or ()
    shape = tuple(dim if isinstance(dim, int) and dim >= 0 else None for dim in dims)
    names = tuple(dim if isinstance(dim, str) and dim else None for dim in dims)
    return TensorSpec(name=arg.name, dtype=dtype, shape=shape, dim_names=names)
