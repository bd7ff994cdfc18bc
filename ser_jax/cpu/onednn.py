"""ResNet's convolutions and their gradients run by oneDNN on the CPU, through jax.ffi.

XLA:CPU's convolution gradients are about 1.5x slower than oneDNN's and need layout
transposes of every activation (benchmarks/NOTES.md, experiment 15). Here a float32
NHWC x HWIO convolution is a custom call into oneDNN (`csrc/onednn_conv.cc`) whose VJP
is two more custom calls (input and kernel gradients), all reading JAX's layouts as
they are. Values are those of lax.conv_general_dilated up to the order of float sums.

The library is compiled with the system's C++ compiler against the oneDNN wheel
(`onednn-cpu-gomp`, `onednn-devel-cpu-gomp`) the first time it is needed, and cached
under $SER_JAX_CACHE (default ~/.cache/ser_jax). `available()` says whether it could be
built; whether it computes the right values on this CPU is for ser_jax.cpu.selftest.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import importlib.metadata
import logging
import os
import pathlib
import shutil
import subprocess
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from ser_jax import io_utils
from ser_jax.cache import default_cache_dir
from ser_jax.config import ConfigError
from ser_jax.cpu import kernels

SOURCE = pathlib.Path(__file__).with_name("csrc") / "onednn_conv.cc"
_SYMBOLS = {
  "forward": "SerConvForward",
  "input_grad": "SerConvBackwardData",
  "kernel_grad": "SerConvBackwardWeights",
  "affine": "SerConvAffine",
  "affine_relu": "SerConvAffineRelu",
  "affine_sum_relu": "SerConvAffineSumRelu",
  "pack_affine": "SerPackAffine",
  "pack_affine_relu": "SerPackAffineRelu",
  "pack_affine_sum_relu": "SerPackAffineSumRelu",
}
_KINDS = {"affine": b"a", "affine_relu": b"r", "affine_sum_relu": b"s"}  # Build()'s kind chars
_TARGET_PREFIX = "ser_jax_onednn_"
_WHEELS = ("onednn-cpu-gomp", "onednn-devel-cpu-gomp")
ROOT_ENV = "SER_JAX_ONEDNN_ROOT"  # A prefix with include/oneapi/dnnl and lib/libdnnl.so.


class OneDnnUnavailable(ConfigError):
  """model.lowering='onednn', but the oneDNN convolution library cannot be built or loaded here."""


def onednn_prefixes() -> tuple[pathlib.Path, pathlib.Path]:
  """(include dir, lib dir) of oneDNN: $SER_JAX_ONEDNN_ROOT, else the installed wheels."""
  if os.environ.get(ROOT_ENV):
    root = pathlib.Path(os.environ[ROOT_ENV]).expanduser()
    include, lib = root / "include", root / "lib"
  else:
    include = lib = None
    for wheel in _WHEELS:
      try:
        dist = importlib.metadata.distribution(wheel)
      except importlib.metadata.PackageNotFoundError:
        continue
      for file in dist.files or ():
        path = pathlib.Path(dist.locate_file(file)).resolve()
        if file.name == "dnnl.hpp" and path.parent.name == "dnnl":
          include = path.parents[2]
        elif file.name == "libdnnl.so":
          lib = path.parent
    if include is None or lib is None:
      raise OneDnnUnavailable(
        f"oneDNN is not installed: pip install {' '.join(_WHEELS)} (or set {ROOT_ENV})"
      )
  if not (include / "oneapi" / "dnnl" / "dnnl.hpp").is_file():
    raise OneDnnUnavailable(f"no oneapi/dnnl/dnnl.hpp under {include}")
  if not (lib / "libdnnl.so").exists():
    raise OneDnnUnavailable(f"no libdnnl.so in {lib}")
  return include, lib


def compile_command(cxx: str, output: pathlib.Path, include: pathlib.Path, lib: pathlib.Path):
  return [
    cxx,
    "-O2",
    "-std=c++17",
    "-shared",
    "-fPIC",
    "-fopenmp",
    f"-I{jax.ffi.include_dir()}",
    f"-I{include}",
    str(SOURCE),
    "-o",
    str(output),
    f"-L{lib}",
    "-ldnnl",
    f"-Wl,-rpath,{lib}",
  ]


def build_library(cache_dir: pathlib.Path, cxx: str | None = None) -> pathlib.Path:
  """The compiled library's path; compiled (atomically, under a lock) unless cached.

  The cache key covers the source, the compiler, oneDNN's location and jaxlib's version.
  """
  cxx = cxx or os.environ.get("CXX", "g++")
  compiler = shutil.which(cxx)
  if compiler is None:
    raise OneDnnUnavailable(f"no C++ compiler {cxx!r} on PATH (set CXX, or install g++)")
  include, lib = onednn_prefixes()
  key = hashlib.sha256(
    b"\0".join(
      [
        SOURCE.read_bytes(),
        compiler.encode(),
        str(include).encode(),
        str(lib).encode(),
        importlib.metadata.version("jaxlib").encode(),
      ]
    )
  ).hexdigest()[:16]
  path = cache_dir / f"onednn_conv-{key}.so"
  if path.exists():
    return path
  cache_dir.mkdir(parents=True, exist_ok=True)
  with io_utils.file_lock(cache_dir / "onednn_conv.lock", "the oneDNN build", wait=True):
    if path.exists():
      return path
    with tempfile.TemporaryDirectory(dir=cache_dir) as tmp:
      partial = pathlib.Path(tmp) / path.name
      done = subprocess.run(
        compile_command(compiler, partial, include, lib), capture_output=True, text=True
      )
      if done.returncode != 0:
        logging.info("Compiling %s failed:\n%s", SOURCE.name, done.stderr[-4000:])
        errors = [line for line in done.stderr.splitlines() if "error" in line]
        raise OneDnnUnavailable(
          f"compiling {SOURCE.name} failed: {(errors or ['(no message)'])[0].strip()}"
        )
      os.replace(partial, path)
  logging.info("Built the oneDNN convolution library: %s", path)
  return path


# Loaded with its own dependencies first (RTLD_DEEPBIND): where another oneDNN is in the
# process already (PyTorch's, even with TORCH_USE_RTLD_GLOBAL=1), this library still calls
# the oneDNN it was linked with (tests/test_onednn.py checks it beside torch).
_DLOPEN_MODE = os.RTLD_LOCAL | getattr(os, "RTLD_DEEPBIND", 0)


@functools.cache
def _library() -> ctypes.CDLL | str:
  """Builds, loads and registers the FFI targets once: the library, else why it cannot."""
  try:
    library = ctypes.CDLL(str(build_library(default_cache_dir())), mode=_DLOPEN_MODE)
  except (OneDnnUnavailable, OSError) as error:
    logging.info("oneDNN convolutions unavailable: %s", error)
    return str(error)
  for role, symbol in _SYMBOLS.items():
    jax.ffi.register_ffi_target(
      _TARGET_PREFIX + role, jax.ffi.pycapsule(getattr(library, symbol)), platform="cpu"
    )
  library.SerPackedKernelElements.restype = ctypes.c_int64
  library.SerTrusted.restype = ctypes.c_int
  library.SerOneDnnVersion.restype = ctypes.c_int
  library.SerAtLeastAvx2.restype = ctypes.c_int
  return library


def _registered() -> str:
  """'' once the FFI targets are registered, else why they cannot be."""
  library = _library()
  return library if isinstance(library, str) else ""


def unavailable_reason() -> str:
  """Why oneDNN convolutions cannot run here; '' when they can."""
  return _registered()


def available() -> bool:
  return not _registered()


def runs_avx2() -> bool:
  """Whether oneDNN runs AVX2 code or better on this CPU (after ONEDNN_MAX_CPU_ISA)."""
  return available() and bool(_library().SerAtLeastAvx2())


def library_key() -> str:
  """The built library's file name (it names its build's hash), or why there is none."""
  library = _library()
  return library if isinstance(library, str) else pathlib.Path(library._name).name


def version() -> str:
  """The version of the oneDNN the library calls ('' where it cannot be built)."""
  if not available():
    return ""
  major, rest = divmod(_library().SerOneDnnVersion(), 10000)
  return f"{major}.{rest // 100}.{rest % 100}"


# Every custom call traced while `recording_calls()` is open: (role, operand shapes,
# output shape, int64 attributes); ser_jax.cpu.selftest replays them on random data.
_recorded: list | None = None


@contextlib.contextmanager
def recording_calls():
  """Yields the list that collects the custom calls traced inside the block."""
  global _recorded
  previous, _recorded = _recorded, []
  try:
    yield _recorded
  finally:
    _recorded = previous


def require() -> None:
  reason = _registered()
  if reason:
    raise OneDnnUnavailable(f"oneDNN convolutions (model.lowering='onednn') unavailable: {reason}")


def _call(role: str, out_shape, operands, strides, padding, input_output_aliases=None, **shapes):
  """The custom call `role`; `shapes` are further int64 attributes (kernel_shape, ...)."""
  require()  # Builds and registers the targets on first use.
  if _recorded is not None:
    attributes = {"strides": strides, "padding": np.asarray(padding).ravel(), **shapes}
    _recorded.append(
      (
        role,
        [tuple(o.shape) for o in operands],
        tuple(out_shape),
        {name: [int(v) for v in np.ravel(value)] for name, value in attributes.items()},
      )
    )
  return jax.ffi.ffi_call(
    _TARGET_PREFIX + role,
    jax.ShapeDtypeStruct(out_shape, jnp.float32),
    vmap_method="sequential_unrolled",
    input_output_aliases=input_output_aliases,
  )(
    *operands,
    strides=np.asarray(strides, np.int64),
    padding=np.asarray(padding, np.int64).ravel(),
    **{name: np.asarray(shape, np.int64) for name, shape in shapes.items()},
  )


def _output_shape(x_shape, w_shape, strides, padding):
  return (
    x_shape[0],
    *kernels.output_hw(x_shape[1:3], w_shape[:2], strides, padding),
    w_shape[3],
  )


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def conv(x, w, strides, padding):
  """NHWC float32 x convolved with HWIO w; padding ((top, bottom), (left, right))."""
  return _call(
    "forward", _output_shape(x.shape, w.shape, strides, padding), (x, w), strides, padding
  )


def _conv_fwd(x, w, strides, padding):
  return conv(x, w, strides, padding), (x, w)


def _conv_bwd(strides, padding, residuals, dy):
  x, w = residuals
  xla_vjp = None
  if not (
    trusted("d", x.shape, w.shape, strides, padding)
    and trusted("w", x.shape, w.shape, strides, padding)
  ):
    # oneDNN has only implementations that fail here (csrc/onednn_conv.cc, Trusted).
    _, xla_vjp = jax.vjp(
      lambda x, w: kernels.conv_general_dilated(x, w, strides, padding, dimension_numbers=_NHWC),
      x,
      w,
    )
  if trusted("d", x.shape, w.shape, strides, padding):
    dx = _call("input_grad", x.shape, (dy, w), strides, padding)
  else:
    dx = xla_vjp(dy)[0]
  if trusted("w", x.shape, w.shape, strides, padding):
    dw = _call("kernel_grad", w.shape, (x, dy), strides, padding)
  else:
    dw = xla_vjp(dy)[1]
  return dx, dw


_NHWC = ("NHWC", "HWIO", "NHWC")
_ROLE_KINDS = {"forward": b"f", "input_grad": b"d", "kernel_grad": b"w", **_KINDS}


def trusted(role: str, x_shape, w_shape, strides, padding) -> bool:
  """Whether oneDNN runs convolution `role` ('f', 'd', 'w' or a fused role's name) of these
  shapes with an implementation ser_jax trusts (csrc/onednn_conv.cc, Trusted); where it
  does not, XLA computes it."""
  require()
  kind = _ROLE_KINDS.get(role, role.encode() if isinstance(role, str) else role)
  strides = tuple(int(s) for s in strides)
  padding = tuple((int(lo), int(hi)) for lo, hi in padding)
  return _trusted(kind, tuple(x_shape), tuple(w_shape), strides, padding)


@functools.cache
def _trusted(kind: bytes, x_shape, w_shape, strides, padding) -> bool:
  shapes = [
    np.asarray(s, np.int64)
    for s in (x_shape, w_shape, _output_shape(x_shape, w_shape, strides, padding), strides)
  ]
  shapes.append(np.asarray(padding, np.int64).ravel())
  answer = _library().SerTrusted(
    ctypes.c_char(kind), *(s.ctypes.data_as(ctypes.POINTER(ctypes.c_int64)) for s in shapes)
  )
  if answer < 0:
    raise OneDnnUnavailable(f"oneDNN has no convolution for {x_shape} x {w_shape}")
  return bool(answer)


conv.defvjp(_conv_fwd, _conv_bwd)


def affine_role(relu: bool, residual: bool) -> str:
  if residual and not relu:
    raise ValueError("conv_affine with a residual always applies ReLU")
  return "affine_sum_relu" if residual else "affine_relu" if relu else "affine"


def conv_affine(x, w, scale, shift, strides, padding, relu: bool, residual=None, kernel_shape=None):
  """Inference: relu?(conv(x, w) * scale + shift (+ residual)) in one oneDNN pass.

  scale and shift are per output channel (an inference BatchNorm); with a residual, ReLU
  is always applied. w is an HWIO kernel, or one from `pack_kernel` for this x's shape,
  whose HWIO `kernel_shape` is then needed. Not differentiable.
  """
  role = affine_role(relu, residual is not None)
  kernel_shape = tuple(w.shape if kernel_shape is None else kernel_shape)
  out_shape = _output_shape(x.shape, kernel_shape, strides, padding)
  if residual is None:
    operands, aliases = (x, w, scale, shift), None
  else:  # The output is written over the residual, which the sum post-op reads.
    operands, aliases = (x, w, scale, shift, residual), {4: 0}
  return _call(role, out_shape, operands, strides, padding, aliases, kernel_shape=kernel_shape)


def pack_kernel(w, x_shape, strides, padding, relu: bool, residual: bool):
  """The HWIO kernel w as a flat array in the layout conv_affine's oneDNN primitive reads
  for inputs of x_shape, so that evaluation lays each kernel out once, not every call."""
  role = affine_role(relu, residual)
  y_shape = _output_shape(x_shape, w.shape, strides, padding)
  padding = np.asarray(padding, np.int64).ravel()
  shapes = [np.asarray(s, np.int64) for s in (x_shape, w.shape, y_shape, strides, padding)]
  require()
  elements = _library().SerPackedKernelElements(
    ctypes.c_char(_KINDS[role]), *(s.ctypes.data_as(ctypes.POINTER(ctypes.c_int64)) for s in shapes)
  )
  if elements < 0:
    raise OneDnnUnavailable(f"oneDNN has no {role} convolution for {x_shape} x {w.shape}")
  return _call(
    "pack_" + role, (elements,), (w,), strides, padding, x_shape=x_shape, y_shape=y_shape
  )


def _is_plain(
  lhs,
  rhs,
  lhs_dilation=None,
  rhs_dilation=None,
  dimension_numbers=None,
  feature_group_count=1,
  batch_group_count=1,
  precision=None,
  preferred_element_type=None,
) -> bool:
  """An ungrouped, undilated float32 NHWC x HWIO -> NHWC convolution."""
  del precision  # float32 convolutions in oneDNN are full precision.
  return (
    lhs.ndim == 4
    and lhs.dtype == rhs.dtype == jnp.float32
    and preferred_element_type in (None, jnp.float32)
    and kernels.is_plain_nhwc(
      lhs.shape,
      rhs.shape,
      dimension_numbers,
      lhs_dilation,
      rhs_dilation,
      feature_group_count,
      batch_group_count,
    )
  )


def conv_general_dilated(lhs, rhs, window_strides, padding, **options):
  """lax.conv_general_dilated (other options as keywords): oneDNN for plain float32 NHWC
  convolutions of maps larger than the kernel, kernels.conv_general_dilated for the rest."""
  if not _is_plain(lhs, rhs, **options):
    return kernels.conv_general_dilated(lhs, rhs, window_strides, padding, **options)
  strides = tuple(int(s) for s in window_strides)
  if isinstance(padding, str):
    padding = lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2], strides, padding)
  padding = tuple((int(lo), int(hi)) for lo, hi in padding)
  out_shape = _output_shape(lhs.shape, rhs.shape, strides, padding)
  if kernels.within_kernel(lhs.shape, rhs.shape) or kernels.within_kernel(out_shape, rhs.shape):
    # Maps no larger than the kernel (the last stage of 2 s clips): oneDNN is 2x slower
    # than kernels.py's patches times a matrix there (benchmarks/NOTES.md).
    return kernels.conv_general_dilated(lhs, rhs, window_strides, padding, **options)
  if not trusted("forward", lhs.shape, rhs.shape, strides, padding):
    return kernels.conv_general_dilated(lhs, rhs, window_strides, padding, **options)
  return conv(lhs, rhs, strides, padding)
