"""Products with weights kept in their packed bytes: genforge's C++ kernels, and the pure-torch
path they fall back to.

A decode step is memory bound: each token streams every weight once, so an INT8 weight
(1 byte) can be read up to 4x faster than fp32 and an INT4 one (half a byte plus its group's
scale and zero) up to about 7x. That only happens if the product reads the packed bytes
themselves. torch's own weight-only kernels (`_weight_int8pack_mm`, `_weight_int4pack_mm_for_cpu`)
are far slower than an fp32 product on a one-row decode (benchmarks/quantize_kernels.py), so
genforge compiles its own (`weight_only.cpp`): codes become fp32 in registers next to the fp32
multiply-adds, rows of x share each converted weight, output rows are split over threads.

- `int8_linear(x, codes, scale, bias)`: W = codes * scale[:, None] (int8, one scale per row).
- `lut4_linear(x, packed, levels, scales, zeros, group_size, high_nibble_first, bias)`: 4-bit
  codes, two per byte, W[n, k] = (levels[code] - zeros[n, g]) * scales[n, g]: INT4 with
  levels 0..15 and its zero points, NF4 with the NF4 table and no zeros.

The extension is built by `torch.utils.cpp_extension.load` at first use (6-30 s here)
into `$TORCH_EXTENSIONS_DIR` or `~/.cache/genforge/kernels`, and loaded from there afterwards.
Without a C++ compiler or ninja, or if the build fails, one line says so and every product
takes the pure-torch path: dequantize at most `CHUNK_VALUES` weights at a time and multiply
(`onednn.linear`). Which path serves a product is chosen by `path_for` from what
benchmarks/quantize_kernels.py measured: the kernels for up to `NATIVE_MAX_ROWS` rows of x on
an AVX2 or AVX-512 CPU, dequantize-and-multiply for more rows (a prefill, where the product is
compute bound and oneDNN's blocked fp32 product wins) and everywhere else (GPU, half precision,
a product that needs a gradient of x).

`GENFORGE_QUANT_KERNELS` (read at first use) or `set_kernel_path` forces a path: "auto" (the
default), "torch" (the pure-torch path), or one kernel build: "portable" (plain C++),
"avx2", "avx512". Tests force each one to check them all against the dequantized weight.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import threading
from pathlib import Path

import torch

from ...onednn import linear as onednn_linear

__all__ = [
    "CHUNK_VALUES",
    "KERNEL_PATHS",
    "NATIVE_MAX_ROWS",
    "build_directory",
    "compiled_path",
    "int8_linear",
    "kernel_path",
    "lut4_linear",
    "native_available",
    "path_for",
    "set_kernel_path",
]

SOURCE = Path(__file__).with_name("weight_only.cpp")
KERNEL_PATHS = ("auto", "torch", "portable", "avx2", "avx512")
_ISA = {"portable": 1, "avx2": 2, "avx512": 3}
ENVIRONMENT_VARIABLE = "GENFORGE_QUANT_KERNELS"

# The most rows of x a kernel serves, per format and torch CPU capability; more rows take the
# dequantize-and-multiply path. Measured by benchmarks/quantize_kernels.py on a 2-core AVX-512
# EPYC, 2 threads (docs/compression.md, "Weight-only INT8 and INT4"): up to 64 rows the AVX-512 kernels beat
# dequantize + oneDNN on GPT-2's MLP and head shapes (INT8 1833 against 2234 us at 64 rows on
# 768 -> 3072, INT4 2682 against 3038). Their AVX2 build, timed on the same machine, keeps
# INT8 ahead at 64 rows but INT4 only up to 32 (3149 against 3038 us at 64). Beyond 64 rows
# was not measured, so it goes to the product that is compute bound by design.
NATIVE_MAX_ROWS = {
    "AVX512": {"int8": 64, "lut4": 64},
    "AVX2": {"int8": 64, "lut4": 32},
}
# The pure-torch path dequantizes at most this many weights at a time (64 MiB of fp32).
CHUNK_VALUES = 1 << 24

_lock = threading.Lock()
_state: dict = {"path": None, "ops": None, "tried": False, "capability": None}


def build_directory() -> Path:
    """Where the extension is built and cached: `$TORCH_EXTENSIONS_DIR/genforge_quant` if set, else
    `~/.cache/genforge/kernels/torch-<version>` (a new torch gets a build of its own)."""
    if os.environ.get("TORCH_EXTENSIONS_DIR"):
        return Path(os.environ["TORCH_EXTENSIONS_DIR"]) / "genforge_quant"
    return Path.home() / ".cache" / "genforge" / "kernels" / f"torch-{torch.__version__}"


def set_kernel_path(path: str) -> None:
    """Force every product onto `path` ("auto", "torch", "portable", "avx2" or "avx512")."""
    if path not in KERNEL_PATHS:
        raise ValueError(f"kernel path must be one of {KERNEL_PATHS}; got {path!r}")
    _state["path"] = path


@contextlib.contextmanager
def kernel_path(path: str):
    """`set_kernel_path(path)` for the duration of a `with` block."""
    before = _current_path()
    set_kernel_path(path)
    try:
        yield
    finally:
        _state["path"] = before


def _current_path() -> str:
    if _state["path"] is None:
        chosen = os.environ.get(ENVIRONMENT_VARIABLE, "auto").strip().lower() or "auto"
        if chosen not in KERNEL_PATHS:
            raise ValueError(f"{ENVIRONMENT_VARIABLE} must be one of {KERNEL_PATHS}; got {chosen!r}")
        _state["path"] = chosen
    return _state["path"]


def _say(message: str) -> None:
    print(f"genforge: {message}", file=sys.stderr)


def _build():
    """Compile (or load from the cache) the extension: its ops, or None with one line saying why."""
    from torch.utils import cpp_extension

    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        _say(f"no C++ compiler ({compiler}) found; quantized layers use the slower pure-torch path")
        return None
    if not cpp_extension.is_ninja_available():
        _say("ninja is not installed (pip install ninja); quantized layers use the slower pure-torch path")
        return None
    directory = build_directory()
    try:
        directory.mkdir(parents=True, exist_ok=True)
        cpp_extension.load(
            name="genforge_quant_kernels",
            sources=[str(SOURCE)],
            extra_cflags=["-O3", "-fopenmp"],
            extra_ldflags=["-fopenmp"],
            build_directory=str(directory),
            is_python_module=False,
            verbose=False,
        )
    except Exception as err:  # a failed build must not stop decoding: the torch path computes the same
        first_line = (str(err).strip().splitlines() or [type(err).__name__])[0]
        _say(f"building the quantized kernels in {directory} failed ({first_line}); using the pure-torch path")
        return None
    return torch.ops.genforge_quant


def native_ops():
    """The compiled ops (`torch.ops.genforge_quant`), built at first call; None if they cannot be."""
    if not _state["tried"]:
        with _lock:
            if not _state["tried"]:
                _state["ops"] = _build()
                _state["tried"] = True
    return _state["ops"]


def native_available() -> bool:
    """Whether the compiled kernels load on this machine (builds them on first call)."""
    return native_ops() is not None


def _capability() -> str:
    if _state["capability"] is None:
        _state["capability"] = torch.backends.cpu.get_cpu_capability()
    return _state["capability"]


def path_for(x: torch.Tensor, kind: str) -> str:
    """Which path computes a product of `x` (rows, in) by a `kind` ("int8" or "lut4") weight:
    "torch", or a kernel build ("portable", "avx2", "avx512")."""
    path = _current_path()
    if path == "torch":
        return "torch"
    usable = x.device.type == "cpu" and x.dtype == torch.float32 and not (torch.is_grad_enabled() and x.requires_grad)
    if path != "auto":
        if not usable:
            return "torch"
        if native_ops() is None:
            raise RuntimeError(f"kernel path {path!r} was forced, but the quantized kernels could not be built")
        return path
    capability = _capability()
    limits = NATIVE_MAX_ROWS.get("AVX512" if capability.startswith("AVX512") else capability)
    if not usable or limits is None or x.shape[0] > limits[kind] or native_ops() is None:
        return "torch"
    return "avx512" if capability.startswith("AVX512") else "avx2"


def compiled_path(x: torch.Tensor, kind: str) -> bool:
    """Whether a product of `x` (..., in) would run on a compiled kernel (not the torch path)."""
    return x.dim() > 0 and path_for(x.reshape(-1, x.shape[-1]), kind) != "torch"


def _rows_of(x: torch.Tensor, in_features: int) -> torch.Tensor:
    if x.dim() == 0 or x.shape[-1] != in_features:
        raise ValueError(f"expected an input of shape (..., {in_features}); got {tuple(x.shape)}")
    return x.reshape(-1, in_features)


def _chunked_product(x2d: torch.Tensor, out_features: int, rows_of_weight, bias: torch.Tensor | None) -> torch.Tensor:
    """x W^T + b with W produced `rows_of_weight(start, stop)` at most CHUNK_VALUES weights at a time."""
    in_features = x2d.shape[1]
    step = max(1, CHUNK_VALUES // max(1, in_features))
    parts = []
    for start in range(0, out_features, step):
        stop = min(start + step, out_features)
        weight = rows_of_weight(start, stop).to(x2d.dtype)
        parts.append(onednn_linear(x2d, weight, None if bias is None else bias[start:stop].to(x2d.dtype)))
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)


def int8_linear(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x W^T + b for W = codes * scale[:, None] (codes int8, out x in; scale fp32, one per row);
    x of any leading shape (..., in)."""
    out_features, in_features = codes.shape
    x2d = _rows_of(x, in_features)
    path = path_for(x2d, "int8")
    if path == "torch":
        y = _chunked_product(x2d, out_features, lambda a, b: codes[a:b].float() * scale[a:b, None], bias)
    else:
        x2d = x2d.contiguous()
        y = x2d.new_empty(x2d.shape[0], out_features)
        native_ops().int8_linear.default(x2d, codes, scale, bias, y, _ISA[path])
    return y.reshape(*x.shape[:-1], out_features)


def dequantize_lut4(
    packed: torch.Tensor,
    levels: torch.Tensor | None,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    group_size: int,
    high_nibble_first: bool,
) -> torch.Tensor:
    """The fp32 weight (out x in) that `lut4_linear` multiplies by: (levels[code] - zeros) * scales,
    with `levels` None standing for the codes themselves (INT4), which skips a gather."""
    out_features = packed.shape[0]
    first, second = (packed >> 4, packed & 0xF) if high_nibble_first else (packed & 0xF, packed >> 4)
    codes = torch.stack([first, second], dim=-1).reshape(out_features, -1, group_size)
    values = codes.float() if levels is None else levels.to(packed.device)[codes.long()]
    if zeros is not None:
        values = values - zeros[..., None].float()
    return (values * scales[..., None]).reshape(out_features, -1)


def lut4_linear(
    x: torch.Tensor,
    packed: torch.Tensor,
    levels: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    group_size: int,
    high_nibble_first: bool,
    bias: torch.Tensor | None,
    levels_are_codes: bool = False,
) -> torch.Tensor:
    """x W^T + b for a 4-bit W (see `dequantize_lut4`); x of any leading shape (..., in).
    `levels_are_codes` says `levels` is 0..15 (INT4), so the pure-torch path needs no gather."""
    out_features, in_features = packed.shape[0], packed.shape[1] * 2
    x2d = _rows_of(x, in_features)
    path = path_for(x2d, "lut4")
    if path == "torch":

        def rows(a: int, b: int) -> torch.Tensor:
            return dequantize_lut4(
                packed[a:b],
                None if levels_are_codes else levels,
                scales[a:b],
                None if zeros is None else zeros[a:b],
                group_size,
                high_nibble_first,
            )

        y = _chunked_product(x2d, out_features, rows, bias)
    else:
        x2d = x2d.contiguous()
        y = x2d.new_empty(x2d.shape[0], out_features)
        native_ops().lut4_linear.default(
            x2d, packed, levels, scales, zeros, group_size, high_nibble_first, bias, y, _ISA[path]
        )
    return y.reshape(*x.shape[:-1], out_features)
