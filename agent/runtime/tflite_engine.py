"""TFLite behind the :class:`~agent.runtime.engine.Engine` interface.

The interpreter comes from ``ai-edge-litert`` (``ai_edge_litert.interpreter``, numpy 2) or,
failing that, ``tflite-runtime`` (``tflite_runtime.interpreter``, older devices on numpy<2),
whichever imports first. Importing this module imports neither: the runtime is imported when
the first model is loaded, and its absence is an ``EngineError`` naming both packages.

Invariants:

* specs are read once at load from the primary subgraph: the numpy dtype's name, and the
  ``shape_signature`` with ``-1`` read as ``None`` (dynamic), so a model converted with a
  dynamic batch accepts any batch; a non-numeric tensor (strings, resources) is refused at load;
* the interpreter's tensors are always allocated for the shapes of the last feed: a feed of
  another shape is first resized (strictly: only the dims the model declared dynamic) and
  re-allocated, so alternating batch sizes on one engine work, at the cost of one
  re-allocation per change of shape;
* one inference runs at a time per engine (see :class:`TfliteEngine`);
* every runtime exception (``ValueError``/``RuntimeError``), at load or at run, is re-raised as
  ``EngineError`` from the original by :func:`_translate_errors`, the single boundary with the
  backend; a failure to prepare the model for a new input shape, once the engine has answered
  another input, is the input's (``RejectedInputError``, see :meth:`TfliteEngine._fit`).
  Outputs are detached copies, never views into interpreter memory;
* a model that needs a custom operator the runtime lacks is refused at load in one line
  naming the operator.

Quantized tensors are exchanged raw: a uint8/int8 input takes the integers the model sees, and
(de)quantizing with the tensor's scale and zero point is the caller's job.
"""

from __future__ import annotations

import logging
import os
import re
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from agent.runtime.engine import (
    Engine,
    EngineError,
    RejectedInputError,
    TensorSpec,
    translate_errors,
)
from agent.runtime.native_log import native_stderr_to_log

__all__ = ["TfliteEngine"]

log = logging.getLogger(__name__)

_INSTALL_HINT = "install edgefleet[tflite] (ai-edge-litert) or tflite-runtime"

_SUPPORTED_DTYPES = frozenset(
    {
        "float16",
        "float32",
        "float64",
        "int8",
        "int16",
        "int32",
        "int64",
        "uint8",
        "uint16",
        "uint32",
        "uint64",
        "bool",
    }
)

# What the interpreter (and its pybind wrapper) raises: ValueError for a bad model file or a
# rejected tensor, RuntimeError for failed resizes and for the wrapper's own safety checks.
_RUNTIME_ERRORS: tuple[type[Exception], ...] = (ValueError, RuntimeError)


_CUSTOM_OP = re.compile(r"unresolved custom op: (\S+?)\.?\s")
_SOURCE_PREFIX = re.compile(r"\S+\.(?:cc|h):\d+ ")


def _translate_errors(action: str):
    return translate_errors(_RUNTIME_ERRORS, action)


def _one_line(message: str) -> str:
    """The interpreter's multi-line report, on one line and without source paths."""
    return " ".join(_SOURCE_PREFIX.sub("", message).split())


def _interpreter_class() -> type[Any]:
    """The first TFLite ``Interpreter`` that imports: ai-edge-litert, then tflite-runtime."""
    failures = []
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError as exc:
        failures.append(f"ai_edge_litert: {exc}")
    else:
        return Interpreter
    try:
        from tflite_runtime.interpreter import Interpreter  # type: ignore[import-not-found]
    except ImportError as exc:
        failures.append(f"tflite_runtime: {exc}")
    else:
        return Interpreter
    raise EngineError(f"no TFLite runtime can be imported ({'; '.join(failures)}): {_INSTALL_HINT}")


class TfliteEngine(Engine):
    """A model loaded into a TFLite ``Interpreter``.

    ``num_threads`` is the interpreter's CPU thread count; ``None`` keeps the runtime's
    default, which in ai-edge-litert is one thread (not all cores, unlike onnxruntime).

    Inference is serialized by a lock, unlike :class:`~agent.runtime.onnx_engine.OnnxEngine`:
    an ``InferenceSession.run`` is self-contained and thread-safe, but a TFLite interpreter is
    one mutable set of tensors driven by a sequence of calls (resize, allocate, set_tensor,
    invoke, get_tensor). Two threads interleaving those calls would run one request on another's
    inputs, read another's outputs, or re-allocate the buffers under an ``invoke`` that has
    released the GIL, which the runtime documents as unsupported (in practice ai-edge-litert's
    wrapper mostly fails such calls with "There is at least 1 reference to internal data").
    Requests on one engine therefore queue; for parallelism, raise ``num_threads`` or load one
    engine per worker.
    """

    def __init__(self, path: str | os.PathLike[str], *, num_threads: int | None = None) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise EngineError(f"cannot load TFLite model {self.path}: no such file")
        interpreter_class = _interpreter_class()
        try:
            with native_stderr_to_log(log):
                interpreter = interpreter_class(model_path=str(self.path), num_threads=num_threads)
                interpreter.allocate_tensors()
                input_details = interpreter.get_input_details()
                output_details = interpreter.get_output_details()
        except _RUNTIME_ERRORS as exc:
            custom = _CUSTOM_OP.search(str(exc) + " ")
            if custom is not None:
                raise EngineError(
                    f"cannot load TFLite model {self.path.name}: it needs the custom operator "
                    f"{custom.group(1)!r}, which this TFLite runtime does not provide (use a "
                    "runtime built with that operator, or convert the model without it)"
                ) from exc
            raise EngineError(
                f"cannot load TFLite model {self.path}: {_one_line(str(exc))}"
            ) from exc

        # Which package runs the model: "ai_edge_litert" or "tflite_runtime".
        self.runtime: str = interpreter_class.__module__.partition(".")[0]
        self._interpreter: Any | None = interpreter
        self._lock = threading.Lock()
        # Shapes the interpreter is allocated for, in input order; None after a resize
        # failed half-way, so the next request resizes every input again.
        self._allocated: tuple[tuple[int, ...], ...] | None = tuple(
            tuple(int(dim) for dim in d["shape"]) for d in input_details
        )
        inputs = [_spec(detail) for detail in input_details]
        if len({spec.name for spec in inputs}) != len(inputs):
            raise EngineError(
                f"cannot load TFLite model {self.path}: input names are not unique "
                f"{[spec.name for spec in inputs]}"
            )
        super().__init__(inputs, [_spec(detail) for detail in output_details])
        # (name, tensor index) pairs, so the hot path does no lookups beyond the feed's.
        self._input_slots = tuple(
            (spec.name, int(d["index"])) for spec, d in zip(inputs, input_details, strict=True)
        )
        self._output_slots = tuple(
            (spec.name, int(d["index"]))
            for spec, d in zip(self._outputs, output_details, strict=True)
        )

    def _run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        with self._lock:
            interpreter = self._interpreter
            if interpreter is None:
                raise RuntimeError("TfliteEngine is closed")
            # Not _translate_errors: a generator context manager costs ~1.5 us per call,
            # more than set_tensor and get_tensor together at batch 1. Plain loops, not
            # comprehensions (each one a function call on Python 3.11): see Engine.infer.
            try:
                fed = []
                for name, _ in self._input_slots:
                    fed.append(feeds[name].shape)
                shapes = tuple(fed)
                if shapes != self._allocated:
                    self._fit(interpreter, shapes)
                for name, index in self._input_slots:
                    interpreter.set_tensor(index, feeds[name])
                interpreter.invoke()
                outputs = {}
                for name, index in self._output_slots:
                    value = interpreter.get_tensor(index)
                    # get_tensor copies; copy again only if a runtime ever hands out a view
                    outputs[name] = value if value.flags.owndata else value.copy()
                self._answered = True
                return outputs
            except RejectedInputError:  # from _fit; a ValueError, so said before the next
                raise
            except _RUNTIME_ERRORS as exc:
                raise EngineError(f"inference failed for {self.path.name}: {exc}") from exc

    def _fit(self, interpreter: Any, shapes: tuple[tuple[int, ...], ...]) -> None:
        """Resize the inputs whose shape differs from the feed's, then re-allocate once.

        TFLite kernels check their shapes when tensors are allocated (each op's Prepare),
        not when they run. So once this engine has answered another input, a failure here
        is the new shape's: the model cannot compute at that size (a reshape whose element
        counts no longer agree), and the request is refused as the caller's
        (``RejectedInputError``). Before any answer it is the model's."""
        allocated = self._allocated
        self._allocated = None  # until the allocation below has succeeded
        changed = []
        try:
            for position, (name, index) in enumerate(self._input_slots):
                if allocated is None or allocated[position] != shapes[position]:
                    changed.append(name)
                    # strict: only dims declared -1 may change (prepare_inputs already checked)
                    interpreter.resize_tensor_input(index, list(shapes[position]), strict=True)
            interpreter.allocate_tensors()
        except _RUNTIME_ERRORS as exc:
            if not self._answered:
                raise
            raise RejectedInputError(
                _one_line(str(exc)), changed[0] if len(changed) == 1 else None
            ) from exc
        self._allocated = shapes

    def _close(self) -> None:
        with self._lock:  # waits for an inference in flight
            self._interpreter = None  # no close(); dropping the last reference frees it


def _spec(detail: dict[str, Any]) -> TensorSpec:
    """``detail`` is one entry of ``get_input_details()`` / ``get_output_details()``."""
    name = str(detail["name"])
    dtype = np.dtype(detail["dtype"]).name
    if dtype not in _SUPPORTED_DTYPES:
        raise EngineError(f"{name!r} has type {dtype}, which TfliteEngine does not support")
    signature: Sequence[int] = detail.get("shape_signature", detail["shape"])
    if len(signature) != len(detail["shape"]):  # an unranked tensor: fall back to its shape
        signature = detail["shape"]
    shape = tuple(int(dim) if dim >= 0 else None for dim in signature)
    return TensorSpec(name=name, dtype=dtype, shape=shape)

