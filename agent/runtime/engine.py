"""The inference engine interface, and the one place requests are validated.

Every backend (ONNX Runtime, TFLite) sits behind :class:`Engine`, whose single backend
hook is :meth:`Engine._run`. :meth:`Engine.infer` passes the caller's data to the backend
only once it is a complete feed of C-contiguous arrays with the model's dtypes and shapes:
an array that already is one (checked inline, the common request) as it is, anything else
through :func:`prepare_inputs`, which converts or refuses. That gives three invariants:

* a bad request raises :class:`InputError` naming expected vs given, never a numpy or backend
  stack trace, and the message does not depend on which backend is loaded;
* casts are only ever safe or same-kind (int -> float, float64 -> float32), or integer ->
  integer when every value fits the target (JSON ints for a uint8 image input); a cast that
  would change meaning (float -> int, text or objects -> numbers) is refused, not truncated;
* backend failures surface as :class:`EngineError`, raised ``from`` the backend's exception,
  so callers catch one hierarchy whatever the backend.

Lifecycle is explicit: an engine is open from construction until :meth:`Engine.close`; using a
closed engine is a programmer error and raises ``RuntimeError``. This module must not import a
backend: the agent daemon imports it on devices where a backend may not be installed.
"""

from __future__ import annotations

import contextlib
import enum
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import cached_property
from math import isnan
from types import TracebackType
from typing import Any, NamedTuple, NoReturn, Self, TypeAlias

import numpy as np
from numpy.typing import ArrayLike

__all__ = [
    "Engine",
    "EngineError",
    "InputData",
    "InputError",
    "RejectedInputError",
    "TensorSpec",
    "prepare_inputs",
    "translate_errors",
]

InputData: TypeAlias = ArrayLike | Mapping[str, ArrayLike]
"""One array-like (single-input models) or a mapping of input name -> array-like."""

# Kinds numpy would happily cast to numbers with casting="unsafe", and which we never do.
_REFUSED_KINDS = frozenset("USOVMm")


class EngineError(Exception):
    """The model cannot be loaded or run; raised ``from`` the backend's own exception."""


@contextlib.contextmanager
def translate_errors(backend_errors: tuple[type[Exception], ...], action: str) -> Iterator[None]:
    """The one boundary with a backend: its exceptions become :class:`EngineError`."""
    try:
        yield
    except backend_errors as exc:
        raise EngineError(f"{action}: {exc}") from exc


class InputError(EngineError, ValueError):
    """The caller's data does not fit the model's inputs (names, dtype or shape)."""


class RejectedInputError(InputError):
    """The data fits the schema, but the runtime refused to compute on it: the model only
    takes some of the values the schema allows (an OCR detector whose height and width
    must be multiples of 32, a VAD whose sample rate must be 8000 or 16000).

    Each backend decides what counts (see ``OnnxEngine`` and ``TfliteEngine``); the rule
    both share is that the same engine has already answered another input, so the model
    itself runs. ``reason`` is the runtime's own words without its source paths;
    ``input`` names the input when the runtime's message does, else ``None``.
    """

    def __init__(self, reason: str, input_name: str | None = None) -> None:
        where = f"input {input_name!r}: " if input_name else ""
        super().__init__(f"{where}the model refused this input: {reason}")
        self.reason = reason
        self.input = input_name


class ExactFit(NamedTuple):
    """What an array that needs no conversion looks like, precomputed per spec."""

    dtype: np.dtype[Any]
    rank: int
    leading: int | None  # the first dim, None when dynamic (the batch)
    tail: tuple[int, ...] | None  # the other dims when all are fixed, else None
    scan_nan: bool  # a float input whose schema refuses NaN


@dataclass(frozen=True)
class TensorSpec:
    """A model input or output: ``dtype`` is a numpy dtype name, dynamic dims are ``None``."""

    name: str
    dtype: str
    shape: tuple[int | None, ...]
    allow_nan: bool = True  # a bundle's schema may forbid NaN (see Engine.refuse_nan)
    # The model's names for its dynamic dims where it has them (ONNX ``dim_param``: dims
    # named alike are the same size), else empty; only used to make build-time samples.
    dim_names: tuple[str | None, ...] = field(default=(), compare=False)

    @property
    def has_batch_dim(self) -> bool:
        """The leading dim is dynamic, which by convention is the batch dimension."""
        return len(self.shape) > 0 and self.shape[0] is None

    @cached_property
    def numpy_dtype(self) -> np.dtype[Any]:
        return np.dtype(self.dtype)

    @cached_property
    def exact_fit(self) -> ExactFit:
        rest = self.shape[1:]
        return ExactFit(
            dtype=self.numpy_dtype,
            rank=len(self.shape),
            leading=self.shape[0] if self.shape else None,
            tail=None if None in rest else tuple(d for d in rest if d is not None),
            scan_nan=not self.allow_nan and self.numpy_dtype.kind == "f",
        )

    def describe_shape(self) -> str:
        """Shape for messages: a dynamic leading dim reads ``batch``, other dynamic dims ``?``."""
        dims = [
            ("batch" if i == 0 else "?") if dim is None else str(dim)
            for i, dim in enumerate(self.shape)
        ]
        return f"({dims[0]},)" if len(dims) == 1 else f"({', '.join(dims)})"


_FastPath: TypeAlias = tuple[str, np.dtype[Any], tuple[int, ...], int, bool]
"""(input name, dtype, dims after the batch, rank, scan for NaN with one BLAS dot)."""


def _fast_path(specs: Sequence[TensorSpec]) -> _FastPath | None:
    """What an already-right request looks like, for :meth:`Engine.infer`'s inline check.

    Only for the common model: one input whose first dim is the batch and whose other dims
    are fixed, and whose NaN scan, if its schema asks for one, is the BLAS dot (float32 and
    float64). Other models take :func:`prepare_inputs` for every request."""
    if len(specs) != 1:
        return None
    spec = specs[0]
    fit = spec.exact_fit
    if not spec.has_batch_dim or fit.tail is None:
        return None
    if fit.scan_nan and fit.dtype.char not in "fd":
        return None
    return (spec.name, fit.dtype, fit.tail, fit.rank, fit.scan_nan)


class _State(enum.Enum):
    OPENED = enum.auto()
    CLOSED = enum.auto()


class Engine(ABC):
    """A loaded model. Subclasses load in ``__init__`` and implement ``_run`` and ``_close``.

    ``infer`` may be called from several threads if the backend's ``_run`` allows it (ONNX
    Runtime does); ``close`` should only be called once no inference is in flight.
    """

    def __init__(self, inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec]) -> None:
        self._inputs = tuple(inputs)
        self._outputs = tuple(outputs)
        self._state = _State.OPENED
        self._fast = _fast_path(self._inputs)
        # Set by a backend's _run once a run succeeded: from then on the model is known to
        # work, and a failure on another input may be the input's (RejectedInputError).
        self._answered = False

    @property
    def inputs(self) -> list[TensorSpec]:
        return list(self._inputs)

    @property
    def outputs(self) -> list[TensorSpec]:
        return list(self._outputs)

    @property
    def closed(self) -> bool:
        return self._state is _State.CLOSED

    @property
    def metadata(self) -> dict[str, str]:
        """The model file's own key/value metadata (ONNX ``metadata_props``); empty when
        the format or backend has none."""
        return {}

    def refuse_nan(self, names: Sequence[str]) -> None:
        """From now on, requests with NaN in these float inputs are an InputError (a model fed
        NaN answers garbage, not an error; the bundle's schema says which inputs may)."""
        refused = set(names)
        self._inputs = tuple(
            replace(spec, allow_nan=spec.name not in refused) for spec in self._inputs
        )
        if self._state is _State.OPENED:
            self._fast = _fast_path(self._inputs)

    def infer(self, inputs: InputData) -> dict[str, np.ndarray]:
        """Validate ``inputs`` against :attr:`inputs`, run the model, return outputs by name.

        The common request, one C-contiguous array of the right dtype and shape for a
        single-input model, is checked inline against :attr:`_fast` (one tuple compare per
        property) and goes straight to the backend. Everything else, including every
        request that will be refused, takes :func:`prepare_inputs`, which converts or
        explains. Inline, not a helper: between two runs of the native runtime the CPU's
        caches hold the runtime's code, and every distinct Python or numpy path touched on
        the way costs several times its warm price (bench/infer.py; docs/architecture.md).
        """
        fast = self._fast
        if fast is not None and type(inputs) is np.ndarray:
            name, dtype, tail, rank, scan = fast
            shape = inputs.shape
            if (
                inputs.dtype is dtype
                and shape[1:] == tail
                and len(shape) == rank
                and inputs.flags.c_contiguous
            ):
                if scan:
                    flat = inputs.ravel()  # a view: C-contiguous
                    if isnan(flat.dot(flat)):  # see _has_nan
                        _refuse_nan(self._inputs[0], inputs)
                return self._run({name: inputs})
        self._ensure_open()
        return self._run(prepare_inputs(self._inputs, inputs))

    def warmup(self) -> None:
        """Run one all-zeros batch of size 1, so the first real request is not the slow one."""
        self._ensure_open()
        feeds = {
            spec.name: np.zeros(tuple(1 if dim is None else dim for dim in spec.shape), spec.dtype)
            for spec in self._inputs
        }
        self._run(feeds)

    def close(self) -> None:
        """Release the backend. Idempotent."""
        if self._state is _State.CLOSED:
            return
        self._state = _State.CLOSED
        self._fast = None  # every call now takes the checked path, which raises
        self._close()

    def __enter__(self) -> Self:
        self._ensure_open()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _ensure_open(self) -> None:
        if self._state is _State.CLOSED:
            raise RuntimeError(f"{type(self).__name__} is closed")

    @abstractmethod
    def _run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run one validated feed. Backend exceptions must be raised as :class:`EngineError`."""

    @abstractmethod
    def _close(self) -> None:
        """Release backend resources; called at most once."""


def prepare_inputs(specs: Sequence[TensorSpec], data: InputData) -> dict[str, np.ndarray]:
    """Turn caller data into a feed matching ``specs`` exactly, or raise :class:`InputError`.

    ``data`` is one array-like when the model has one input, else a mapping name -> array-like.
    A single sample (rank one less than a spec whose leading dim is the batch) gets a batch
    dim of 1.
    """
    if len(specs) == 1 and type(data) is np.ndarray and _fits_exactly(specs[0], data):
        spec = specs[0]
        if spec.exact_fit.scan_nan and data.size and _has_nan(data):
            _refuse_nan(spec, data)
        return {spec.name: data}  # already right, nothing to convert
    expected = [spec.name for spec in specs]
    if isinstance(data, Mapping):
        given: dict[Any, Any] = dict(data)
    elif len(specs) == 1:
        given = {specs[0].name: data}
    else:
        raise InputError(
            f"model has {len(specs)} inputs {expected}: pass a mapping of input name to array"
        )
    if set(given) != set(expected):
        given_names = sorted(str(name) for name in given)
        unknown = sorted(str(name) for name in given if name not in expected)
        missing = [name for name in expected if name not in given]
        details = [f"unknown {unknown}"] if unknown else []
        details += [f"missing {missing}"] if missing else []
        raise InputError(
            f"input names: expected {expected}, given {given_names} ({', '.join(details)})"
        )
    return {spec.name: _coerce(spec, given[spec.name]) for spec in specs}


def _fits_exactly(spec: TensorSpec, array: np.ndarray) -> bool:
    """The array can go to the backend as it is: dtype, rank and fixed dims match, and it
    is C-contiguous (NaN is the caller's to scan for). False sends it the slow way, which
    converts or explains. Every call on the hot path pays for this, so the checks compare
    precomputed tuples (:attr:`TensorSpec.exact_fit`) rather than loop."""
    dtype, rank, leading, tail, _ = spec.exact_fit
    shape = array.shape
    if array.dtype != dtype or len(shape) != rank or not array.flags.c_contiguous:
        return False
    if tail is None:  # a dynamic dim after the first: compare dim by dim
        return all(want is None or want == got for want, got in zip(spec.shape, shape, strict=True))
    return shape[1:] == tail and (leading is None or shape[0] == leading)


def _coerce(spec: TensorSpec, value: Any) -> np.ndarray:
    prefix = f"input {spec.name!r}"
    try:
        array = np.asarray(value)
    except (ValueError, TypeError) as exc:  # ragged nested lists, unconvertible objects
        raise InputError(
            f"{prefix}: expected shape {spec.describe_shape()}, given nested lists of uneven "
            "length (or values that are not numbers)"
        ) from exc

    target = np.dtype(spec.dtype)
    _check_cast(prefix, array, target)

    given_shape = array.shape
    if spec.has_batch_dim and array.ndim == len(spec.shape) - 1:
        array = array[np.newaxis, ...]
    if array.ndim != len(spec.shape):
        raise InputError(
            f"{prefix}: expected shape {spec.describe_shape()}, given {given_shape}: "
            f"rank {len(given_shape)}, expected {len(spec.shape)}"
        )
    for axis, (want, got) in enumerate(zip(spec.shape, array.shape, strict=True)):
        if want is not None and want != got:
            what = "feature count" if axis == array.ndim - 1 else f"dim {axis}"
            raise InputError(
                f"{prefix}: expected shape {spec.describe_shape()}, given {given_shape}: "
                f"{what} {got}, expected {want}"
            )
    # np.require, not np.ascontiguousarray: that one makes a 0-d (scalar) input 1-d, and
    # the prepared input would no longer match its own spec.
    result = np.require(array, dtype=target, requirements="C")
    if not spec.allow_nan and target.kind == "f" and result.size and _has_nan(result):
        _refuse_nan(spec, result)
    return result


def _refuse_nan(spec: TensorSpec, array: np.ndarray) -> NoReturn:
    nans = int(np.count_nonzero(np.isnan(array)))
    raise InputError(
        f"input {spec.name!r}: {nans} NaN value(s) given; this model's schema forbids NaN"
    )


def _has_nan(array: np.ndarray) -> bool:
    """NaN anywhere in a non-empty float array, in one pass with no temporary.

    float32/float64: the sum of squares (one BLAS dot) is NaN exactly when an element is:
    every term is >= 0 or +inf, so no inf - inf can appear, and overflow gives +inf, never
    NaN. It costs half a ``minimum`` reduce (a ufunc's fixed cost is ~1 us). Squares
    overflow only past 1.8e19 (float32), and numpy then warns once per process.
    Other floats (float16, no BLAS; its squares overflow past 256): ``minimum``, which
    propagates NaN and cannot overflow."""
    flat = array.ravel()  # a view: the array is C-contiguous here
    if array.dtype.char in "fd":
        return isnan(flat.dot(flat))
    return isnan(np.minimum.reduce(flat))


def _check_cast(prefix: str, array: np.ndarray, target: np.dtype[Any]) -> None:
    given = array.dtype
    if given.kind in "iu" and target.kind in "iu" and not np.can_cast(given, target):
        bounds = np.iinfo(target)
        if array.size and (array.min() < bounds.min or array.max() > bounds.max):
            raise InputError(
                f"{prefix}: expected dtype {target}, given {given} with values outside "
                f"[{bounds.min}, {bounds.max}]"
            )
        return
    if given.kind in _REFUSED_KINDS or not np.can_cast(given, target, "same_kind"):
        raise InputError(f"{prefix}: expected dtype {target}, given {_given(given)}")


def _given(given: np.dtype[Any]) -> str:
    """What the caller sent, in its terms: numpy's ``<U21`` is text to a JSON client."""
    if given.kind in "US":
        return "text"
    if given.kind == "O":
        return "values that are not numbers"
    return str(given)
