"""The native layer: llama.cpp models, contexts and batches through
llama-cpp-python's low-level ctypes API.

Every native handle has exactly one Python owner that frees it (``close()``,
also a context manager). C return codes are checked and turned into
ModelError / MtpError naming the file or the call. Nothing here prints:
llama.cpp's log goes to the ``mtpcode.llama`` logger, and its last lines are
quoted in error messages.
"""

from __future__ import annotations

import abc
import collections
import contextlib
import ctypes
import functools
import importlib
import logging
import os
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import llama_cpp
import numpy as np

from mtpcode.config import EXTRA_BUFTS_POLICIES
from mtpcode.errors import ModelError, MtpError
from mtpcode.signals import on_signals

log = logging.getLogger("mtpcode.llama")

LIB_DIR = Path(llama_cpp.__file__).resolve().parent / "lib"

# ---------------------------------------------------------------------------
# ggml pieces llama-cpp-python does not bind


class _TensorHeader(ctypes.Structure):
    """The leading fields of ``struct ggml_tensor`` (ggml.h, GGML_MAX_SRC=10,
    GGML_MAX_OP_PARAMS=64, GGML_MAX_NAME=64), enough to read shape and name."""

    _fields_ = [
        ("type", ctypes.c_int),
        ("buffer", ctypes.c_void_p),
        ("ne", ctypes.c_int64 * 4),
        ("nb", ctypes.c_size_t * 4),
        ("op", ctypes.c_int),
        ("op_params", ctypes.c_int32 * 16),
        ("flags", ctypes.c_int32),
        ("src", ctypes.c_void_p * 10),
        ("view_src", ctypes.c_void_p),
        ("view_offs", ctypes.c_size_t),
        ("data", ctypes.c_void_p),
        ("name", ctypes.c_char * 64),
    ]


_NAME_OFFSET = _TensorHeader.name.offset
_string_at = ctypes.string_at
_NE1_OFFSET = _TensorHeader.ne.offset + 8
_TYPE_F32 = 0


@functools.cache
def _logits_address() -> Any:
    """``llama_get_logits`` returning the address as an int (llama-cpp-python's binding returns a
    float pointer, which costs a cast per call on the decoding path)."""
    fn = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_void_p)(("llama_get_logits", llama_cpp.llama_cpp._lib))
    return fn


@functools.cache
def _logits_ith_address() -> int:
    """The address of ``llama_get_logits_ith``, for the C greedy pick (mtpcode/_capture.c)."""
    return ctypes.cast(llama_cpp.llama_cpp._lib.llama_get_logits_ith, ctypes.c_void_p).value or 0


@functools.cache
def _ggml_base() -> ctypes.CDLL:
    lib = ctypes.CDLL(str(LIB_DIR / "libggml-base.so"))
    lib.ggml_backend_tensor_get.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t]
    lib.ggml_backend_tensor_get.restype = None
    lib.ggml_get_name.argtypes = [ctypes.c_void_p]
    lib.ggml_get_name.restype = ctypes.c_char_p
    for fn in (lib.ggml_nrows, lib.ggml_nbytes, lib.ggml_element_size):
        fn.argtypes = [ctypes.c_void_p]
        fn.restype = ctypes.c_int64 if fn is lib.ggml_nrows else ctypes.c_size_t
    return lib


# ---------------------------------------------------------------------------
# process-wide setup

_LOG_TAIL: collections.deque[tuple[int, str]] = collections.deque(maxlen=16)
_GGML_LOG_ERROR = 4  # enum ggml_log_level (ggml.h): NONE, DEBUG, INFO, WARN, ERROR, CONT


@llama_cpp.llama_log_callback
def _log_callback(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
    msg = text.decode("utf-8", errors="replace").rstrip()
    if msg:
        _LOG_TAIL.append((level, msg))
        log.debug("%s", msg)


def _recent_log() -> str:
    """llama.cpp's error lines since the last clear (the reason a call failed), else its last line."""
    errors = [msg for level, msg in _LOG_TAIL if level == _GGML_LOG_ERROR]
    if errors:
        return "; ".join(errors[-3:])
    return _LOG_TAIL[-1][1] if _LOG_TAIL else "no detail from llama.cpp"


@functools.cache
def init_backend() -> None:
    """Initialise llama.cpp once per process and route its log away from stderr."""
    llama_cpp.llama_log_set(_log_callback, ctypes.c_void_p(0))
    llama_cpp.llama_backend_init()


def cpu_has_amx(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """True when the CPU reports Intel AMX (amx_tile / amx_int8 / amx_bf16)."""
    try:
        text = Path(cpuinfo).read_text(encoding="ascii", errors="replace")
    except OSError:
        return False
    for line in text.splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[-1].split())
            return bool(flags & {"amx_tile", "amx_int8", "amx_bf16"})
    return False


def use_extra_bufts(policy: str) -> bool:
    """Resolve the ``extra_bufts`` policy to llama_model_params.use_extra_bufts.

    "auto" turns llama.cpp's extra CPU buffer types (AMX tiles, CPU_REPACK)
    off on CPUs with AMX: with them on, decoding a quantized model segfaults
    there (docs/design.md §6). "on"/"off" force the setting. "repack" turns them
    off too, but the caller routes Q4_0/Q4_K block weights to CPU_REPACK
    explicitly (``repack_pattern``, ``Model(repack=...)``): the repacked
    kernels without the AMX buffer type (opt-in; see docs/runtime.md).
    """
    if policy not in EXTRA_BUFTS_POLICIES:
        raise MtpError(f"extra_bufts must be one of {', '.join(EXTRA_BUFTS_POLICIES)}, not {policy!r}")
    if policy == "auto":
        return not cpu_has_amx()
    return policy == "on"


# Weight types whose block matrices may be routed to CPU_REPACK. Q8_0 is not
# among them: it crashed at load with the override (docs/design.md §6).
REPACK_TYPES = ("Q4_0", "Q4_K")


def repack_pattern(gguf_path: str | os.PathLike[str], types: Sequence[str] = REPACK_TYPES) -> str:
    """A regex matching exactly the block weights of ``gguf_path`` stored in one of ``types`` ("" if none)."""
    import gguf  # (a GGUF reader of its own: only --extra-bufts repack needs one)

    reader = gguf.GGUFReader(str(gguf_path))
    names = [t.name for t in reader.tensors
             if t.name.startswith("blk.") and t.name.endswith(".weight") and t.tensor_type.name in types]
    return "^(" + "|".join(re.escape(n) for n in names) + ")$" if names else ""


class _BuftOverride(ctypes.Structure):
    _fields_ = [("pattern", ctypes.c_char_p), ("buft", ctypes.c_void_p)]


@functools.cache
def cpu_repack_buft() -> int:
    """The CPU device's "CPU_REPACK" buffer type, or 0 if this build has none.

    The device comes from libggml's registry (ggml_backend_dev_by_type), the
    instance llama.cpp uses; a buffer type from libggml-cpu's own registry is a
    different instance and aborts at context creation.
    """
    init_backend()
    ggml = ctypes.CDLL(str(LIB_DIR / "libggml.so"))
    base = _ggml_base()
    ggml.ggml_backend_dev_by_type.argtypes = [ctypes.c_int]
    ggml.ggml_backend_dev_by_type.restype = ctypes.c_void_p
    ggml.ggml_backend_dev_backend_reg.argtypes = [ctypes.c_void_p]
    ggml.ggml_backend_dev_backend_reg.restype = ctypes.c_void_p
    base.ggml_backend_reg_get_proc_address.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    base.ggml_backend_reg_get_proc_address.restype = ctypes.c_void_p
    base.ggml_backend_buft_name.argtypes = [ctypes.c_void_p]
    base.ggml_backend_buft_name.restype = ctypes.c_char_p
    dev = ggml.ggml_backend_dev_by_type(0)  # GGML_BACKEND_DEVICE_TYPE_CPU
    reg = ggml.ggml_backend_dev_backend_reg(dev) if dev else None
    addr = base.ggml_backend_reg_get_proc_address(reg, b"ggml_backend_dev_get_extra_bufts") if reg else None
    if not addr:
        return 0
    arr = ctypes.CFUNCTYPE(ctypes.POINTER(ctypes.c_void_p), ctypes.c_void_p)(addr)(dev)
    i = 0
    while arr and arr[i]:
        if base.ggml_backend_buft_name(arr[i]) == b"CPU_REPACK":
            return int(arr[i])
        i += 1
    return 0


def model_params(*, n_gpu_layers: int = 0, extra_bufts: bool = True,
                 repack: str = "") -> tuple[llama_cpp.llama_model_params, ctypes.Array | None]:
    """llama_model_params for a model whose weights go where ``extra_bufts`` and ``repack`` say.

    Returns the params and the buffer-override array they point to (None when
    nothing is overridden), which the caller must keep alive while the model is
    loaded. ``repack``: a regex of tensor names for CPU_REPACK
    (:func:`repack_pattern`), ignored when this build has no such buffer type.
    """
    params = llama_cpp.llama_model_default_params()
    params.n_gpu_layers = int(n_gpu_layers)
    params.use_extra_bufts = bool(extra_bufts)
    buft = cpu_repack_buft() if repack else 0
    if not buft:
        return params, None
    overrides = (_BuftOverride * 2)(_BuftOverride(repack.encode(), buft), _BuftOverride(None, None))  # NULL-terminated
    params.tensor_buft_overrides = ctypes.addressof(overrides)
    return params, overrides


def reference_llama(path: str | os.PathLike[str], *, extra_bufts: bool, repack: str = "",
                    **kwargs: object) -> llama_cpp.Llama:
    """llama-cpp-python's own high-level ``Llama`` on ``path``, with its weights in the
    same buffers as ``Model(path, extra_bufts=..., repack=...)``.

    ``Llama`` has no parameter for the buffer types and always loads with
    llama.cpp's default (extra buffer types on), while the engine turns them off
    on AMX CPUs. Kernels differ per buffer type, and so does rounding (F16 on
    AMX CPUs parts from the other modes within a few tokens), so a comparison
    with ``Llama`` is like for like only when both load alike: this builds the
    params with :func:`model_params` for the duration of the constructor.
    ``kwargs`` go to ``Llama``.
    """
    import llama_cpp.llama as high_level  # (llama-cpp-python's own Llama: only the comparisons with it)

    params, overrides = model_params(extra_bufts=extra_bufts, repack=repack)
    native = high_level.llama_cpp
    original = native.llama_model_default_params

    def same_buffers() -> llama_cpp.llama_model_params:
        return params

    native.llama_model_default_params = same_buffers
    try:
        llm = llama_cpp.Llama(model_path=str(path), **kwargs)  # type: ignore[arg-type]
    finally:
        native.llama_model_default_params = original
    llm._mtpcode_buffer_overrides = overrides  # type: ignore[attr-defined]  # alive as long as the model
    return llm


def backend_info(n_gpu_layers: int = 0) -> dict[str, object]:
    """What llama.cpp computes on, for benchmark records: offload support, the layers asked to offload,
    and llama.cpp's system line (CPU features; the GPU backend when built with one)."""
    init_backend()
    info = llama_cpp.llama_print_system_info()
    return {
        "gpu_offload_supported": bool(llama_cpp.llama_supports_gpu_offload()),
        "gpu_layers": int(n_gpu_layers),
        "system_info": info.decode("utf-8", "replace").strip() if isinstance(info, bytes) else str(info),
    }


# Below this many parameters one llama.cpp thread is the default: a graph node
# does microseconds of work, less than the threads' synchronisation at every
# node costs, and a second thread that the OS deschedules stalls all others
# (measured with the 3.9M-parameter built-in model on 2 cores while another
# process used one: 301 tokens/s on 1 thread, 31 on 2).
SMALL_MODEL_PARAMS = 50_000_000


def physical_cores(sysfs: str = "/sys/devices/system/cpu") -> int:
    """Physical cores among the CPUs this process may use.

    llama.cpp's threads each keep a core's arithmetic units busy, so two
    threads on the hyperthreads of one core slow each other down (llama.cpp's
    own tools default to physical cores too). Linux: CPUs whose
    ``topology/thread_siblings_list`` is the same share a core; elsewhere, or
    without that file, every usable CPU counts.
    """
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)
    cores = set()
    for cpu in cpus:
        try:
            cores.add(Path(sysfs, f"cpu{cpu}", "topology", "thread_siblings_list").read_text().strip())
        except OSError:
            cores.add(f"cpu{cpu}")
    return max(1, len(cores))


def default_threads(n_params: int | None = None) -> int:
    """Threads for one-row forwards (decoding steps, head drafts) when the caller gives none.

    One per physical core this process may use (:func:`physical_cores`), or 1
    for a model under SMALL_MODEL_PARAMS parameters (``n_params``; None:
    unknown, treated as large): a small model's step is too short to share.
    """
    if n_params is not None and n_params < SMALL_MODEL_PARAMS:
        return 1
    return physical_cores()


# ---------------------------------------------------------------------------
# native handles

_H = TypeVar("_H", bound="_Handle")


class _Handle(abc.ABC):
    """Owner of one native llama.cpp handle: ``close()`` frees it (idempotently);
    also a context manager, and freed when garbage-collected."""

    @abc.abstractmethod
    def close(self) -> None:
        """Free the handle; calling it again does nothing."""

    def __enter__(self: _H) -> _H:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown: llama_cpp may already be torn down
            pass


# ---------------------------------------------------------------------------
# model


class Model(_Handle):
    """A loaded GGUF model (``llama_model*``) and its vocabulary."""

    def __init__(self, path: str | os.PathLike[str], *, n_gpu_layers: int = 0, extra_bufts: bool | None = None,
                 repack: str = "") -> None:
        """``extra_bufts``: llama.cpp's extra CPU buffer types on or off; None (the default) follows
        the "auto" policy of :func:`use_extra_bufts` (off on CPUs with AMX, where decoding a
        quantized model with them segfaults). ``repack``: a regex of tensor names to place in the
        CPU_REPACK buffer type (``repack_pattern``); ignored when this build has no such buffer type."""
        if extra_bufts is None:
            extra_bufts = use_extra_bufts("auto")
        init_backend()
        self.path = Path(path)
        params, self._overrides = model_params(n_gpu_layers=n_gpu_layers, extra_bufts=extra_bufts, repack=repack)
        self.repacked = self._overrides is not None
        self.n_gpu_layers = int(n_gpu_layers)
        _LOG_TAIL.clear()
        ptr = llama_cpp.llama_model_load_from_file(str(self.path).encode(), params)
        if not ptr:
            raise ModelError(f"{self.path}: llama.cpp could not load the model ({_recent_log()})")
        self._ptr = ptr
        self.vocab = llama_cpp.llama_model_get_vocab(ptr)
        self.n_embd = int(llama_cpp.llama_model_n_embd(ptr))
        self.n_layer = int(llama_cpp.llama_model_n_layer(ptr))
        self.n_params = int(llama_cpp.llama_model_n_params(ptr))
        self.n_vocab = int(llama_cpp.llama_vocab_n_tokens(self.vocab))
        self.bos = int(llama_cpp.llama_vocab_bos(self.vocab))
        self.eos = int(llama_cpp.llama_vocab_eos(self.vocab))
        self._piece_buf = ctypes.create_string_buffer(256)
        self._bytes: dict[int, bytes] = {}  # token_bytes and is_eog, per token (ctypes calls on the decoding path)
        self._eog: dict[int, bool] = {}
        self._tok_buf = (llama_cpp.llama_token * 0)()

    @property
    def ptr(self) -> llama_cpp.llama_model_p:
        if self._ptr is None:
            raise MtpError(f"{self.path}: model used after close()")
        return self._ptr

    def meta(self, key: str) -> str | None:
        """A GGUF metadata value as a string, or None when the key is absent."""
        buf = ctypes.create_string_buffer(512)
        n = llama_cpp.llama_model_meta_val_str(self.ptr, key.encode(), buf, len(buf))
        if n < 0:
            return None
        if n >= len(buf):
            buf = ctypes.create_string_buffer(n + 1)
            llama_cpp.llama_model_meta_val_str(self.ptr, key.encode(), buf, len(buf))
        return buf.value.decode("utf-8", errors="replace")

    def tokenize(self, text: str, *, add_bos: bool = True) -> list[int]:
        data = text.encode("utf-8")
        # Usually fewer tokens than bytes, but not always: SentencePiece turns each
        # space into "▁" (3 bytes), which a small vocabulary may spell in byte tokens.
        cap = len(data) + 8
        for _ in range(2):
            if len(self._tok_buf) < cap:
                self._tok_buf = (llama_cpp.llama_token * cap)()
            n = llama_cpp.llama_tokenize(self.vocab, data, len(data), self._tok_buf, cap, add_bos, False)
            if n >= 0:
                return list(self._tok_buf[:n])
            cap = -n  # too small: llama.cpp says how many tokens it needs
        raise MtpError(f"llama_tokenize failed on {len(data)} bytes of text (needed {-n} tokens)")

    def token_bytes(self, token: int) -> bytes:
        """The raw bytes of one token as it continues a text (byte-fallback tokens give single bytes)."""
        data = self._bytes.get(token)
        if data is None:
            data = self._bytes[token] = self._piece(token)
        return data

    def _piece(self, token: int) -> bytes:
        buf = self._piece_buf
        n = llama_cpp.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, False)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = llama_cpp.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, False)
        return buf.raw[:n]

    def is_eog(self, token: int) -> bool:
        eog = self._eog.get(token)
        if eog is None:
            eog = self._eog[token] = bool(llama_cpp.llama_vocab_is_eog(self.vocab, token))
        return eog

    def close(self) -> None:
        if getattr(self, "_ptr", None) is not None:
            llama_cpp.llama_model_free(self._ptr)
            self._ptr = None


# ---------------------------------------------------------------------------
# batch


class Batch:
    """A ``llama_batch`` over numpy arrays this object owns, filled one segment at a time.

    ``n_embd == 0``: a batch of token ids (``token_ids``); otherwise of
    embeddings (``embeddings``, shape (capacity, n_embd)). Every row belongs to
    one sequence (``seq_ids``). A segment is a run of rows of one sequence at
    consecutive positions (:meth:`add`); the caller fills its tokens or
    embeddings. Nothing here is allocated by llama.cpp, so nothing needs freeing:
    the struct only points into the arrays, which live as long as this object.
    """

    def __init__(self, capacity: int, n_embd: int = 0) -> None:
        self.capacity = int(capacity)
        self.n_embd = int(n_embd)
        cap = self.capacity
        self.tokens = None if self.n_embd else np.zeros(cap, dtype=np.int32)
        self.embd = np.zeros((cap, self.n_embd), dtype=np.float32) if self.n_embd else None
        self.pos = np.zeros(cap, dtype=np.int32)
        self.seq_ids = np.zeros(cap, dtype=np.int32)
        self.logits = np.zeros(cap, dtype=np.int8)
        self._n_seq_id = np.ones(cap, dtype=np.int32)
        seq_base = self.seq_ids.ctypes.data
        seq_type = ctypes.POINTER(llama_cpp.llama_seq_id)
        self._seq_ptrs = (seq_type * cap)(*(ctypes.cast(seq_base + 4 * i, seq_type) for i in range(cap)))
        self._arange = np.arange(cap, dtype=np.int32)
        self._batch = llama_cpp.llama_batch(
            n_tokens=0,
            token=(self.tokens.ctypes.data_as(ctypes.POINTER(llama_cpp.llama_token))
                   if self.tokens is not None else None),
            embd=self.embd.ctypes.data_as(ctypes.POINTER(ctypes.c_float)) if self.embd is not None else None,
            pos=self.pos.ctypes.data_as(ctypes.POINTER(llama_cpp.llama_pos)),
            n_seq_id=self._n_seq_id.ctypes.data_as(ctypes.POINTER(ctypes.c_int32)),
            seq_id=self._seq_ptrs,
            logits=self.logits.ctypes.data_as(ctypes.POINTER(ctypes.c_int8)),
        )
        self.n = 0  # rows filled
        self.n_outputs = 0  # rows with logits

    def clear(self) -> None:
        self.n = self.n_outputs = 0

    def add(self, seq_id: int, start_pos: int, n: int, logits: int) -> int:
        """Add a segment of ``n`` rows of sequence ``seq_id`` at positions start_pos..; returns its first row.

        ``logits``: 0 for none, 1 for the last row's, 2 for every row's (a verify).
        """
        i = self.n
        if i + n > self.capacity:
            raise MtpError(f"internal: batch of {i + n} rows exceeds capacity {self.capacity}")
        end = i + n
        if n == 1:  # a decoding step: scalars cost less than slices
            self.pos[i] = start_pos
            self.seq_ids[i] = seq_id
            self.logits[i] = 1 if logits else 0
            self.n_outputs += 1 if logits else 0
            self.n = end
            return i
        np.add(self._arange[:n], start_pos, out=self.pos[i:end])
        self.seq_ids[i:end] = seq_id
        if logits == 2:
            self.logits[i:end] = 1
            self.n_outputs += n
        else:
            self.logits[i:end] = 0
            if logits == 1 and n:
                self.logits[end - 1] = 1
                self.n_outputs += 1
        self.n = end
        return i

    def set(self, start_pos: int, n: int, last_logits_only: bool) -> None:
        """A batch of one segment of sequence 0: positions start_pos.. for ``n`` rows."""
        self.clear()
        self.add(0, start_pos, n, 1 if last_logits_only else 2)

    @property
    def struct(self) -> llama_cpp.llama_batch:
        self._batch.n_tokens = self.n
        return self._batch

    @property
    def token_ids(self) -> np.ndarray:
        """The token-id rows of a batch of tokens (MtpError for a batch of embeddings)."""
        if self.tokens is None:
            raise MtpError("internal: this batch is fed embeddings, not token ids")
        return self.tokens

    @property
    def embeddings(self) -> np.ndarray:
        """The embedding rows of a batch of embeddings (MtpError for a batch of token ids)."""
        if self.embd is None:
            raise MtpError("internal: this batch is fed token ids, not embeddings")
        return self.embd


# ---------------------------------------------------------------------------
# trunk capture


_native_capture: Any  # the extension module, or None
try:  # the C callback (mtpcode/_capture.c), built at install time when a C compiler is there
    _native_capture = importlib.import_module("mtpcode._capture")
except ImportError:  # pragma: no cover - exercised on machines without a compiler
    _native_capture = None


def native_capture_available() -> bool:
    """Whether the C trunk-capture callback was built (else the Python one is used)."""
    return _native_capture is not None


class _NativeCapture(ctypes.Structure):
    """``struct mtp_capture`` of mtpcode/_capture.c."""

    _fields_ = [
        ("get_name", ctypes.c_void_p),
        ("nrows", ctypes.c_void_p),
        ("nbytes", ctypes.c_void_p),
        ("element_size", ctypes.c_void_p),
        ("tensor_get", ctypes.c_void_p),
        ("dst", ctypes.c_void_p),
        ("row_bytes", ctypes.c_int64),
        ("capacity", ctypes.c_int64),
        ("write_pos", ctypes.c_int64),
        ("rows_seen", ctypes.c_int64),
        ("error", ctypes.c_int32),
        ("name", ctypes.c_char * 64),
        ("active", ctypes.c_int32),
    ]


def _c_address(fn: Any) -> int:
    return ctypes.cast(fn, ctypes.c_void_p).value or 0


class TrunkCapture:
    """An eval callback that copies one named tensor's rows into a numpy array.

    llama.cpp calls it for every graph node (``ask=True``: "do you want this
    one?") and again after computing a wanted node (``ask=False``); rows are
    appended at ``write_pos``, which the owner sets before each decode.

    ``native`` (default: when built) uses the C callback of mtpcode/_capture.c:
    the per-node calls then cost nanoseconds instead of a Python call each
    (about a third of a small model's forward). The Python callback is the
    fallback on installs without a C compiler; both write the same rows.
    The callback objects live as long as this object does.
    """

    def __init__(self, tensor_name: str, out: np.ndarray, *, native: bool | None = None) -> None:
        if out.dtype != np.float32 or not out.flags.c_contiguous or out.ndim != 2:
            raise MtpError("internal: trunk buffer must be a 2-D C-contiguous float32 array")
        if native and _native_capture is None:
            raise MtpError("the C trunk-capture callback is not built in this install "
                           "(reinstall mtpcode with a C compiler)")
        self.native = _native_capture is not None if native is None else bool(native)
        self.name = tensor_name
        self.out = out
        self.row_bytes = out.shape[1] * 4
        self.capacity = out.shape[0]
        self.pending: BaseException | None = None
        self.write_start = 0
        self._active = True
        if self.native:
            base = _ggml_base()
            want = tensor_name.encode()
            if len(want) >= 64:
                raise MtpError(f"trunk tensor name {tensor_name!r} is longer than ggml's 63 characters")
            self._state = _NativeCapture(
                get_name=_c_address(base.ggml_get_name), nrows=_c_address(base.ggml_nrows),
                nbytes=_c_address(base.ggml_nbytes), element_size=_c_address(base.ggml_element_size),
                tensor_get=_c_address(base.ggml_backend_tensor_get), dst=out.ctypes.data,
                row_bytes=self.row_bytes, capacity=self.capacity, name=want, active=1)
            self.callback = llama_cpp.ggml_backend_sched_eval_callback(_native_capture.callback_address)
            self.user_data: int | None = ctypes.addressof(self._state)
        else:
            self._want = tensor_name.encode() + b"\0"
            self._want_len = len(self._want)
            self._py_pos = 0
            self._py_active = True
            self._py_error: str | None = None
            self._base = out.ctypes.data
            self._get = _ggml_base().ggml_backend_tensor_get
            self.callback = llama_cpp.ggml_backend_sched_eval_callback(self._on_eval)
            self.user_data = None

    @property
    def write_pos(self) -> int:
        return int(self._state.write_pos) if self.native else self._py_pos

    @property
    def active(self) -> bool:
        """Whether forwards capture: off, the callback wants no node and llama.cpp computes
        each forward as one graph (decoding without drafts needs no trunk rows)."""
        return self._active

    @active.setter
    def active(self, on: bool) -> None:
        if self.native:
            if self._active != on:
                self._state.active = int(on)
        else:
            self._py_active = bool(on)
        self._active = bool(on)

    @property
    def error(self) -> str | None:
        if not self.native:
            return self._py_error
        code = self._state.error
        if code == _native_capture.BAD_TENSOR:
            return (f"tensor {self.name} is not {self._state.rows_seen} F32 rows of {self.row_bytes // 4} "
                    "(wrong trunk tensor for this model?)")
        if code == _native_capture.OVERFLOW:
            return f"trunk capture overflow ({self.write_pos}+{self._state.rows_seen} > {self.capacity})"
        return None

    def reset(self, write_pos: int) -> None:
        """The next forward writes its rows from row ``write_pos`` of the target on."""
        self.pending = None
        self.write_start = write_pos
        if self.native:
            self._state.write_pos = write_pos
            self._state.error = 0
        else:
            self._py_pos = write_pos
            self._py_error = None

    def _on_eval(self, tensor: int, ask: bool, user_data: int) -> bool:
        # Called for every node of every graph: keep the common path to one C call.
        try:
            if not self._py_active or _string_at(tensor + _NAME_OFFSET, self._want_len) != self._want:
                return False  # not ours (only wanted nodes are ever called with ask=False)
            return True if ask else self._copy(tensor)
        except BaseException as exc:
            # Ctrl-C during llama_decode is delivered here (the only Python code
            # running then); ctypes would print and swallow it. Keep it, let the
            # decode finish, and let the owner re-raise it afterwards.
            self.pending = exc
            return not ask

    def _copy(self, tensor: int) -> bool:
        hdr = _TensorHeader.from_address(tensor)
        rows = int(hdr.ne[1])
        if hdr.type != _TYPE_F32 or hdr.ne[0] * 4 != self.row_bytes:
            self._py_error = (f"tensor {self.name} has type {hdr.type} and shape {list(hdr.ne)}, "
                              f"expected F32 rows of {self.row_bytes // 4}")
            return True
        if self._py_pos + rows > self.capacity:
            self._py_error = f"trunk capture overflow ({self._py_pos}+{rows} > {self.capacity})"
            return True
        self._get(tensor, self._base + self._py_pos * self.row_bytes, 0, rows * self.row_bytes)
        self._py_pos += rows
        return True

    def raise_pending(self) -> None:
        """Re-raise an exception (KeyboardInterrupt) that arrived inside the Python callback."""
        exc, self.pending = self.pending, None
        if exc is not None:
            raise exc


@contextlib.contextmanager
def _sigint_deferred() -> Iterator[None]:
    """Record Ctrl-C instead of raising it while llama_decode runs Python callbacks, and raise it
    once llama_decode returns.

    Python runs signal handlers at the next bytecode boundary, which during
    llama_decode is inside the eval callback, even before its ``try``; ctypes
    then prints the KeyboardInterrupt and drops it. Only the default handler
    is replaced: an application's own (a front end's cancel) is left alone.
    """
    hit: list[int] = []
    with on_signals(lambda signum, frame: hit.append(signum), only_default=True):
        yield
    if hit:
        raise KeyboardInterrupt


# ---------------------------------------------------------------------------
# context


class Context(_Handle):
    """A ``llama_context*`` on a Model, with one preallocated batch.

    ``capture`` (main context only) installs the trunk eval callback.
    ``n_threads`` computes one-row forwards, ``n_threads_batch`` (default: the
    same) larger ones. ``n_seq`` sequences share the context's ``n_ctx`` KV
    cells in one unified cache, so that a batch may mix rows of any sequences
    in any numbers (with a cache per sequence, llama.cpp splits such a batch
    into several forwards of equal rows per sequence).
    """

    def __init__(self, model: Model, *, n_ctx: int, n_batch: int, n_threads: int, embd_input: bool = False,
                 capture: TrunkCapture | None = None, flash_attn: bool = False,
                 n_threads_batch: int | None = None, n_seq: int = 1) -> None:
        self.model = model
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = int(n_ctx)
        params.n_batch = int(n_batch)
        params.n_ubatch = int(n_batch)
        params.n_seq_max = int(n_seq)
        params.kv_unified = n_seq > 1
        params.n_threads = int(n_threads)
        # llama.cpp runs a one-row batch on n_threads and any larger one on n_threads_batch
        params.n_threads_batch = int(n_threads_batch or n_threads)
        params.no_perf = True
        # Flash attention changes the summation order of attention, so outputs compared
        # token for token (plain vs speculative, mtpcode vs Llama) must use the same
        # setting. Off here unless asked for; the Engine asks (docs/runtime.md).
        params.flash_attn_type = (llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED if flash_attn
                                  else llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED)
        self.capture = capture
        if capture is not None:
            params.cb_eval = capture.callback
            params.cb_eval_user_data = capture.user_data
        _LOG_TAIL.clear()
        ptr = llama_cpp.llama_init_from_model(model.ptr, params)
        if not ptr:
            raise ModelError(f"{model.path}: llama.cpp could not create a context of {n_ctx} tokens ({_recent_log()})")
        self._ptr = ptr
        self._params = params  # keeps the callback pointer the context was made with alive
        self.n_ctx = int(llama_cpp.llama_n_ctx(ptr))
        self.n_seq = int(n_seq)
        self.n_vocab = model.n_vocab
        self._mem = llama_cpp.llama_get_memory(ptr)
        self.batch = Batch(n_batch, model.n_embd if embd_input else 0)
        self.serial = 0  # forwards run: logits read after a forward are valid while it is unchanged
        self._offloaded = bool(model.n_gpu_layers)
        self._get_logits = _logits_address()
        self._ctx_addr = ctypes.cast(ptr, ctypes.c_void_p).value or 0  # for the C greedy pick
        self._logits_addr = 0
        self._logits_view: np.ndarray | None = None

    @property
    def ptr(self) -> llama_cpp.llama_context_p:
        if self._ptr is None:
            raise MtpError(f"{self.model.path}: context used after close()")
        return self._ptr

    def decode(self, n: int, start_pos: int, *, last_logits_only: bool) -> None:
        """Run the first ``n`` rows of ``self.batch`` (tokens or embeddings already filled) as
        sequence 0 at positions start_pos.."""
        self.batch.set(start_pos, n, last_logits_only)
        if self.capture is not None:
            self.capture.reset(start_pos)
        self.forward()

    def forward(self) -> None:
        """Run the segments ``self.batch`` holds (:meth:`Batch.add`) in one llama_decode.

        With an active capture, the batch's trunk rows are written in batch order
        from the row that ``capture.reset`` set before the call (:meth:`decode`
        sets it to ``start_pos``).
        """
        batch = self.batch
        capture = self.capture if self.capture is not None and self.capture.active else None
        self.serial += 1
        if self.capture is not None and not self.capture.native:
            # Python code runs inside llama_decode: the callback is asked about every node even
            # while the capture is off (it then wants none)
            with _sigint_deferred():
                rc = llama_cpp.llama_decode(self.ptr, batch.struct)
            self.capture.raise_pending()
        else:
            rc = llama_cpp.llama_decode(self.ptr, batch.struct)
        if rc:
            what = {1: "no free KV slot (context full)", 2: "aborted", -1: "invalid batch"}.get(rc, "fatal error")
            raise MtpError(f"llama_decode on {self.model.path.name} failed: {what} (rc={rc}, {batch.n} rows at "
                           f"{int(batch.pos[0]) if batch.n else 0})")
        if self._offloaded:
            # an offloaded decode returns before the device finishes: wait, so that every caller's
            # clock (the policy's costs, the bench) sees the forward, as on a CPU
            llama_cpp.llama_synchronize(self.ptr)
        if capture is not None:
            start, n = capture.write_start, batch.n
            if capture.error:
                raise MtpError(f"{self.model.path.name}: {capture.error}")
            if capture.write_pos != start + n:
                raise MtpError(
                    f"{self.model.path.name}: captured {capture.write_pos - start} trunk rows of "
                    f"{capture.name} for a batch of {n}: this main.gguf does not have that tensor"
                )

    def logits(self, n_rows: int) -> np.ndarray:
        """The logits of the last decode's output rows, shape (n_rows, n_vocab), a view (valid until next decode)."""
        addr = self._get_logits(self.ptr)
        view = self._logits_view
        if addr == self._logits_addr and view is not None and n_rows <= len(view):
            return view[:n_rows]
        if not addr:
            raise MtpError(f"llama_get_logits on {self.model.path.name} returned NULL (used after close?)")
        rows = max(n_rows, self.batch.capacity)
        view = np.ctypeslib.as_array(ctypes.cast(addr, ctypes.POINTER(ctypes.c_float)), shape=(rows, self.n_vocab))
        self._logits_addr, self._logits_view = addr, view
        return view[:n_rows]

    def argmax(self, row: int) -> int:
        """The most likely token of batch row ``row`` of the last forward (a row that asked for
        logits; the first one on ties)."""
        if _native_capture is not None:
            return int(_native_capture.argmax(_logits_ith_address(), self._ctx_addr, row, self.n_vocab))
        ptr = llama_cpp.llama_get_logits_ith(self.ptr, row)
        return int(np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).argmax())

    def trim(self, n_keep: int, seq_id: int = 0) -> None:
        """Drop every KV position >= n_keep of sequence ``seq_id`` (llama_memory_seq_rm)."""
        if not llama_cpp.llama_memory_seq_rm(self._mem, int(seq_id), int(n_keep), -1):
            raise MtpError(f"llama_memory_seq_rm({seq_id}, {n_keep}, -1) on {self.model.path.name} failed")

    def close(self) -> None:
        if getattr(self, "batch", None) is not None:
            self.batch = None  # type: ignore[assignment]  # closed: a use after close is a bug
        if getattr(self, "_ptr", None) is not None:
            self._logits_view = None
            self._ctx_addr = 0
            llama_cpp.llama_free(self._ptr)
            self._ptr = None


