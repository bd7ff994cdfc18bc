// XLA FFI handlers that run 2-D float32 convolutions and their gradients in oneDNN.
//
// Activations are NHWC and kernels HWIO, as JAX lays them out, so no layout work
// is done on activations; kernels are reordered to oneDNN's blocked layouts.
// For inference, a convolution can also apply BatchNorm's per-channel affine map,
// the residual sum and ReLU as it writes its output (oneDNN post-ops).
// Primitives are built once per shape and cached. Calls are serialised: oneDNN
// runs each one on all its OpenMP threads.

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using dnnl::memory;
using tag = memory::format_tag;

namespace {

struct Geometry {
  memory::dims src, weights, dst, strides, pad_l, pad_r;

  std::string Key(char kind) const {
    std::string key(1, kind);
    for (const auto* d : {&src, &weights, &dst, &strides, &pad_l, &pad_r}) {
      for (auto v : *d) key += std::to_string(v) + ",";
      key += ";";
    }
    return key;
  }
};

dnnl::engine& Engine() {
  static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

// One stream for all calls; they are serialised by `mu` below.
dnnl::stream& Stream() {
  static dnnl::stream stream(Engine());
  return stream;
}

memory::desc Desc(const memory::dims& dims, tag t) {
  return memory::desc(dims, memory::data_type::f32, t);
}

int64_t Pixels(const memory::dims& nchw) { return nchw[2] * nchw[3]; }

// Implementations ser_jax does not run. Where oneDNN offers no other, that convolution
// or gradient runs in XLA instead (the Python side asks SerTrusted):
// - gemm (im2col) ones: below AVX-512, oneDNN 3.2 falls back to them on small NHWC maps,
//   where they read out of bounds and crash the process;
// - the AVX2 and SSE4.1 jit_1x1 kernel gradients: wrong when a 1x1 convolution has fewer
//   input channels than their block (oneDNN issue 6035);
// - reference ones: right, but slower than XLA.
// The self-test (ser_jax/cpu/selftest.py) then checks what is left on the machine.
bool Trusted(char kind, const std::string& impl) {
  const auto gemm = impl.find("gemm:");
  if (impl.rfind("ref", 0) == 0) return false;
  if (gemm != std::string::npos && (gemm < 2 || impl.compare(gemm - 2, 2, "br") != 0))
    return false;
  return kind != 'w' || (impl.rfind("jit_1x1:avx2", 0) != 0 && impl.rfind("jit_1x1:sse41", 0) != 0);
}

// oneDNN 3.2 lists its brgemm kernels first, but on maps of a few pixels its older jit
// kernels are faster: ResNet-18's last stage on MFCC input (2x9 maps, 512 channels) runs
// 25-30 % faster (benchmarks/NOTES.md). Below kSmallMap pixels the first trusted jit
// implementation is taken when there is one (not for kernel gradients).
constexpr int64_t kSmallMap = 64;

// The implementation to run: `make` builds the primitive descriptor; `trusted` says
// whether it is one ser_jax runs (see Trusted).
template <typename Make>
auto Choose(char kind, int64_t pixels, Make make, bool& trusted) {
  trusted = true;
  if (kind != 'w' && pixels < kSmallMap) {
    auto candidate = make();
    do {
      const std::string impl = candidate.impl_info_str();
      if (impl.rfind("jit:", 0) == 0 && Trusted(kind, impl)) return candidate;
    } while (candidate.next_impl());
  }
  auto candidate = make();
  do {
    if (Trusted(kind, candidate.impl_info_str())) return candidate;
  } while (candidate.next_impl());
  trusted = false;
  return make();
}

dnnl::convolution_forward::primitive_desc ForwardDesc(const Geometry& g) {
  return dnnl::convolution_forward::primitive_desc(
      Engine(), dnnl::prop_kind::forward_training, dnnl::algorithm::convolution_direct,
      Desc(g.src, tag::nhwc), Desc(g.weights, tag::any), Desc(g.dst, tag::nhwc), g.strides,
      g.pad_l, g.pad_r);
}

// Per-channel vectors (BatchNorm's scale and shift) broadcast over N, H and W.
memory::desc ChannelDesc(const Geometry& g) {
  return Desc({1, g.dst[1], 1, 1}, tag::abcd);
}

// Inference: the convolution, then in the same pass y * scale + shift, + the residual
// already in y's buffer (kind 's'), and ReLU (kinds 'r' and 's'; not 'a').
dnnl::convolution_forward::primitive_desc AffineDesc(char kind, const Geometry& g) {
  dnnl::post_ops ops;
  ops.append_binary(dnnl::algorithm::binary_mul, ChannelDesc(g));
  ops.append_binary(dnnl::algorithm::binary_add, ChannelDesc(g));
  if (kind == 's') ops.append_sum(1.0f);
  if (kind != 'a') ops.append_eltwise(dnnl::algorithm::eltwise_relu, 0.0f, 0.0f);
  dnnl::primitive_attr attr;
  attr.set_post_ops(ops);
  return dnnl::convolution_forward::primitive_desc(
      Engine(), dnnl::prop_kind::forward_inference, dnnl::algorithm::convolution_direct,
      Desc(g.src, tag::nhwc), Desc(g.weights, tag::any), Desc(g.dst, tag::nhwc), g.strides,
      g.pad_l, g.pad_r, attr);
}

// A kernel layout whose innermost block runs along O, the dimension that HWIO stores
// contiguously: HWIO -> such a layout copies whole blocks of O, in half the time of
// oneDNN 3.2's reorder from HWIO (benchmarks/NOTES.md, experiment 23). `o`, `i`, `h`,
// `w` hold each index's offset in the blocked buffer (each O block's for `o`); an
// element's offset is their sum.
struct OBlocks {
  int64_t block = 0;  // 0: the layout is not of this kind.
  std::vector<int64_t> o, i, h, w;
};

OBlocks DescribeOBlocks(const memory::desc& d) {
  OBlocks b;
  const int n = d.get_inner_nblks();
  if (d.get_format_kind() != memory::format_kind::blocked || n == 0) return b;
  const auto blocks = d.get_inner_blks(), indices = d.get_inner_idxs();
  if (indices[n - 1] != 0 || blocks[n - 1] < 16) return b;
  int64_t block[4] = {1, 1, 1, 1}, inner_stride[4] = {0, 0, 0, 0}, stride = 1;
  for (int j = n - 1; j >= 0; --j) {
    if (block[indices[j]] != 1) return b;  // Two blocks along one dimension.
    block[indices[j]] = blocks[j];
    inner_stride[indices[j]] = stride;
    stride *= blocks[j];
  }
  const auto dims = d.get_dims(), strides = d.get_strides();
  auto offsets = [&](int k, int64_t step) {
    std::vector<int64_t> out;
    for (int64_t index = 0; index < dims[k]; index += step)
      out.push_back(index / block[k] * strides[k] + index % block[k] * inner_stride[k]);
    return out;
  };
  b.block = blocks[n - 1];
  b.o = offsets(0, b.block);
  b.i = offsets(1, 1);
  b.h = offsets(2, 1);
  b.w = offsets(3, 1);
  return b;
}

// HWIO -> a layout of O blocks, one block at a time, on OpenMP's threads.
void CopyToOBlocks(const OBlocks& b, const memory::dims& oihw, const float* hwio, float* blocked) {
  const int64_t O = oihw[0], I = oihw[1], H = oihw[2], W = oihw[3];
  const int64_t n_blocks = b.o.size();
#pragma omp parallel for collapse(3) schedule(static)
  for (int64_t ob = 0; ob < n_blocks; ++ob)
    for (int64_t h = 0; h < H; ++h)
      for (int64_t w = 0; w < W; ++w) {
        const size_t bytes = std::min(b.block, O - ob * b.block) * sizeof(float);
        const float* row = hwio + (h * W + w) * I * O + ob * b.block;
        float* out = blocked + b.o[ob] + b.h[h] + b.w[w];
        for (int64_t i = 0; i < I; ++i, row += O) std::memcpy(out + b.i[i], row, bytes);
      }
}

// One cached convolution: the primitive, and the way between HWIO kernels and the
// primitive's kernel layout (a copy of O blocks, else a oneDNN reorder), with a
// buffer for the primitive's kernel.
struct Cached {
  dnnl::primitive conv;
  dnnl::reorder kernel_reorder;
  OBlocks o_blocks;
  memory::desc user_kernel, conv_kernel;
  std::unique_ptr<memory> kernel_buffer;
  bool trusted = true;  // False: an implementation Trusted() rejects; not to be run.
};

std::mutex mu;
std::unordered_map<std::string, std::unique_ptr<Cached>> cache;

Cached& Build(char kind, const Geometry& g) {
  auto key = g.Key(kind);
  auto it = cache.find(key);
  if (it != cache.end()) return *it->second;
  auto c = std::make_unique<Cached>();
  c->user_kernel = Desc(g.weights, tag::hwio);
  if (kind == 'a' || kind == 'r' || kind == 's') {
    auto pd = Choose(kind, Pixels(g.dst), [&] { return AffineDesc(kind, g); }, c->trusted);
    c->conv = dnnl::convolution_forward(pd);
    c->conv_kernel = pd.weights_desc();
  } else if (kind == 'f') {
    auto fwd = Choose(kind, Pixels(g.dst), [&] { return ForwardDesc(g); }, c->trusted);
    c->conv = dnnl::convolution_forward(fwd);
    c->conv_kernel = fwd.weights_desc();
  } else if (kind == 'd') {
    auto fwd = ForwardDesc(g);
    auto make = [&] {
      return dnnl::convolution_backward_data::primitive_desc(
          Engine(), dnnl::algorithm::convolution_direct, Desc(g.src, tag::nhwc),
          Desc(g.weights, tag::any), Desc(g.dst, tag::nhwc), g.strides, g.pad_l, g.pad_r, fwd);
    };
    auto pd = Choose(kind, Pixels(g.src), make, c->trusted);
    c->conv = dnnl::convolution_backward_data(pd);
    c->conv_kernel = pd.weights_desc();
  } else {
    auto fwd = ForwardDesc(g);
    auto make = [&] {
      return dnnl::convolution_backward_weights::primitive_desc(
          Engine(), dnnl::algorithm::convolution_direct, Desc(g.src, tag::nhwc),
          Desc(g.weights, tag::any), Desc(g.dst, tag::nhwc), g.strides, g.pad_l, g.pad_r, fwd);
    };
    auto pd = Choose(kind, Pixels(g.src), make, c->trusted);
    c->conv = dnnl::convolution_backward_weights(pd);
    c->conv_kernel = pd.diff_weights_desc();
  }
  // Kernels go into the primitive's layout, except the kernel gradient, which comes out of it.
  if (kind != 'w') c->o_blocks = DescribeOBlocks(c->conv_kernel);
  c->kernel_buffer = std::make_unique<memory>(c->conv_kernel, Engine());
  if (c->o_blocks.block) {
    // Padding in a blocked layout stays zero: copies write only the kernel's elements.
    std::memset(c->kernel_buffer->get_data_handle(), 0, c->conv_kernel.get_size());
  } else {
    memory user(c->user_kernel, Engine(), nullptr), blocked(c->conv_kernel, Engine(), nullptr);
    c->kernel_reorder = kind == 'w' ? dnnl::reorder(blocked, user) : dnnl::reorder(user, blocked);
  }
  return *cache.emplace(key, std::move(c)).first->second;
}

memory::dims Nchw(ffi::Span<const int64_t> nhwc) {
  return {nhwc[0], nhwc[3], nhwc[1], nhwc[2]};
}

memory::dims Oihw(ffi::Span<const int64_t> hwio) {
  return {hwio[3], hwio[2], hwio[0], hwio[1]};
}

Geometry MakeGeometry(ffi::Span<const int64_t> src, ffi::Span<const int64_t> kernel,
                      ffi::Span<const int64_t> dst, ffi::Span<const int64_t> strides,
                      ffi::Span<const int64_t> padding) {
  return {Nchw(src), Oihw(kernel), Nchw(dst), {strides[0], strides[1]},
          {padding[0], padding[2]}, {padding[1], padding[3]}};
}

// HWIO -> the primitive's kernel layout, into `blocked`.
void PackKernel(Cached& c, const Geometry& g, float* hwio, memory blocked) {
  if (c.o_blocks.block) {
    CopyToOBlocks(c.o_blocks, g.weights, hwio, static_cast<float*>(blocked.get_data_handle()));
  } else {
    memory user_kernel(c.user_kernel, Engine(), hwio);
    c.kernel_reorder.execute(Stream(), user_kernel, blocked);
  }
}

// `packed_elements` > 0: `kernel` is already in the primitive's layout (PackedKernel), of
// that many elements.
ffi::Error Run(char kind, const Geometry& g, float* src, float* kernel, float* dst,
               float* scale = nullptr, float* shift = nullptr, int64_t packed_elements = 0) {
  try {
    std::lock_guard<std::mutex> lock(mu);
    Cached& c = Build(kind, g);
    dnnl::stream& stream = Stream();
    memory src_m(Desc(g.src, tag::nhwc), Engine(), src);
    memory dst_m(Desc(g.dst, tag::nhwc), Engine(), dst);
    memory kernel_m = *c.kernel_buffer;
    if (packed_elements) {
      if (packed_elements * sizeof(float) != c.conv_kernel.get_size())
        return ffi::Error::InvalidArgument(
            "a packed kernel of " + std::to_string(packed_elements) + " elements, but this " +
            "convolution needs " + std::to_string(c.conv_kernel.get_size() / sizeof(float)) +
            ": pack it for the same input shape");
      kernel_m = memory(c.conv_kernel, Engine(), kernel);
    } else if (kind != 'w') {
      PackKernel(c, g, kernel, kernel_m);
    }
    const bool forward = kind != 'd' && kind != 'w';
    std::unordered_map<int, memory> args = {
        {kind == 'd' ? DNNL_ARG_DIFF_SRC : DNNL_ARG_SRC, src_m},
        {kind == 'w' ? DNNL_ARG_DIFF_WEIGHTS : DNNL_ARG_WEIGHTS, kernel_m},
        {forward ? DNNL_ARG_DST : DNNL_ARG_DIFF_DST, dst_m}};
    if (scale) {
      args.emplace(DNNL_ARG_ATTR_MULTIPLE_POST_OP(0) | DNNL_ARG_SRC_1,
                   memory(ChannelDesc(g), Engine(), scale));
      args.emplace(DNNL_ARG_ATTR_MULTIPLE_POST_OP(1) | DNNL_ARG_SRC_1,
                   memory(ChannelDesc(g), Engine(), shift));
    }
    c.conv.execute(stream, args);
    if (kind == 'w') {
      memory user_kernel(c.user_kernel, Engine(), kernel);
      c.kernel_reorder.execute(stream, *c.kernel_buffer, user_kernel);
    }
    stream.wait();
  } catch (const dnnl::error& e) {
    return ffi::Error::Internal(std::string("oneDNN: ") + e.what());
  }
  return ffi::Error::Success();
}

// kind 'f': (x, w) -> y; 'd': (dy, w) -> dx; 'w': (x, dy) -> dw. NHWC activations, HWIO
// kernels; padding is (top, bottom, left, right).
template <char kind>
ffi::Error Convolve(ffi::Buffer<ffi::F32> a, ffi::Buffer<ffi::F32> b,
                    ffi::ResultBuffer<ffi::F32> out, ffi::Span<const int64_t> strides,
                    ffi::Span<const int64_t> padding) {
  auto src = kind == 'd' ? out->dimensions() : a.dimensions();
  auto kernel = kind == 'w' ? out->dimensions() : b.dimensions();
  auto dst = kind == 'f' ? out->dimensions() : (kind == 'd' ? a.dimensions() : b.dimensions());
  auto g = MakeGeometry(src, kernel, dst, strides, padding);
  float* src_data = kind == 'd' ? out->typed_data() : a.typed_data();
  float* kernel_data = kind == 'w' ? out->typed_data() : b.typed_data();
  float* dst_data = kind == 'f' ? out->typed_data() : (kind == 'd' ? a.typed_data() : b.typed_data());
  return Run(kind, g, src_data, kernel_data, dst_data);
}

// Inference with BatchNorm's affine map (and ReLU, and the residual sum) as post-ops:
// (x, w, scale, shift) -> y for kinds 'a' and 'r'; kind 's' also takes the residual,
// whose buffer y is (the caller aliases them). w is the HWIO kernel of shape
// `kernel_shape`, or that kernel packed (a flat buffer from PackedKernel<kind>).
template <char kind>
ffi::Error ConvolveAffine(ffi::RemainingArgs args, ffi::ResultBuffer<ffi::F32> out,
                          ffi::Span<const int64_t> strides, ffi::Span<const int64_t> padding,
                          ffi::Span<const int64_t> kernel_shape) {
  auto x = args.get<ffi::Buffer<ffi::F32>>(0), w = args.get<ffi::Buffer<ffi::F32>>(1),
       scale = args.get<ffi::Buffer<ffi::F32>>(2), shift = args.get<ffi::Buffer<ffi::F32>>(3);
  if (x.has_error() || w.has_error() || scale.has_error() || shift.has_error())
    return ffi::Error::InvalidArgument("expected float32 x, w, scale and shift");
  auto g = MakeGeometry(x->dimensions(), kernel_shape, out->dimensions(), strides, padding);
  const int64_t packed = w->dimensions().size() == 1 ? w->element_count() : 0;
  return Run(kind, g, x->typed_data(), w->typed_data(), out->typed_data(),
             scale->typed_data(), shift->typed_data(), packed);
}

// Inference: the HWIO kernel w in the layout of ConvolveAffine<kind>'s primitive for an
// input of shape x_shape, so that a model's kernels are laid out once, not every call.
template <char kind>
ffi::Error PackedKernel(ffi::Buffer<ffi::F32> w, ffi::ResultBuffer<ffi::F32> out,
                        ffi::Span<const int64_t> strides, ffi::Span<const int64_t> padding,
                        ffi::Span<const int64_t> x_shape, ffi::Span<const int64_t> y_shape) {
  try {
    std::lock_guard<std::mutex> lock(mu);
    auto g = MakeGeometry(x_shape, w.dimensions(), y_shape, strides, padding);
    Cached& c = Build(kind, g);
    if (out->element_count() * sizeof(float) != c.conv_kernel.get_size())
      return ffi::Error::InvalidArgument("packed kernel buffer of the wrong size");
    // A blocked layout's padding must be zero; block copies write only the kernel's elements.
    std::memset(out->typed_data(), 0, c.conv_kernel.get_size());
    PackKernel(c, g, w.typed_data(), memory(c.conv_kernel, Engine(), out->typed_data()));
    Stream().wait();
  } catch (const dnnl::error& e) {
    return ffi::Error::Internal(std::string("oneDNN: ") + e.what());
  }
  return ffi::Error::Success();
}

auto AffineBinding() {
  return ffi::Ffi::Bind()
      .RemainingArgs()
      .Ret<ffi::Buffer<ffi::F32>>()
      .Attr<ffi::Span<const int64_t>>("strides")
      .Attr<ffi::Span<const int64_t>>("padding")
      .Attr<ffi::Span<const int64_t>>("kernel_shape");
}

auto PackBinding() {
  return ffi::Ffi::Bind()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Ret<ffi::Buffer<ffi::F32>>()
      .Attr<ffi::Span<const int64_t>>("strides")
      .Attr<ffi::Span<const int64_t>>("padding")
      .Attr<ffi::Span<const int64_t>>("x_shape")
      .Attr<ffi::Span<const int64_t>>("y_shape");
}

auto Binding() {
  return ffi::Ffi::Bind()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Ret<ffi::Buffer<ffi::F32>>()
      .Attr<ffi::Span<const int64_t>>("strides")
      .Attr<ffi::Span<const int64_t>>("padding");
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(SerConvForward, Convolve<'f'>, Binding());
XLA_FFI_DEFINE_HANDLER_SYMBOL(SerConvBackwardData, Convolve<'d'>, Binding());
XLA_FFI_DEFINE_HANDLER_SYMBOL(SerConvBackwardWeights, Convolve<'w'>, Binding());
XLA_FFI_DEFINE_HANDLER_SYMBOL(SerConvAffine, ConvolveAffine<'a'>, AffineBinding());
XLA_FFI_DEFINE_HANDLER_SYMBOL(SerConvAffineRelu, ConvolveAffine<'r'>, AffineBinding());
XLA_FFI_DEFINE_HANDLER_SYMBOL(SerConvAffineSumRelu, ConvolveAffine<'s'>, AffineBinding());
XLA_FFI_DEFINE_HANDLER_SYMBOL(SerPackAffine, PackedKernel<'a'>, PackBinding());
XLA_FFI_DEFINE_HANDLER_SYMBOL(SerPackAffineRelu, PackedKernel<'r'>, PackBinding());
XLA_FFI_DEFINE_HANDLER_SYMBOL(SerPackAffineSumRelu, PackedKernel<'s'>, PackBinding());

// Elements of PackedKernel<kind>'s output for these NHWC / HWIO shapes, padding as
// (top, bottom, left, right); -1 when oneDNN has no such convolution.
extern "C" int64_t SerPackedKernelElements(char kind, const int64_t* x_shape,
                                           const int64_t* kernel_shape, const int64_t* y_shape,
                                           const int64_t* strides, const int64_t* padding) {
  try {
    std::lock_guard<std::mutex> lock(mu);
    auto g = MakeGeometry({x_shape, 4}, {kernel_shape, 4}, {y_shape, 4}, {strides, 2},
                          {padding, 4});
    return Build(kind, g).conv_kernel.get_size() / sizeof(float);
  } catch (const dnnl::error&) {
    return -1;
  }
}

// Whether oneDNN has an implementation ser_jax runs (see Trusted) for convolution `kind`
// (Build's) of these NHWC / HWIO shapes, padding as (top, bottom, left, right): 1, 0, or
// -1 when oneDNN has none at all.
extern "C" int SerTrusted(char kind, const int64_t* x_shape, const int64_t* kernel_shape,
                          const int64_t* y_shape, const int64_t* strides,
                          const int64_t* padding) {
  try {
    std::lock_guard<std::mutex> lock(mu);
    auto g = MakeGeometry({x_shape, 4}, {kernel_shape, 4}, {y_shape, 4}, {strides, 2},
                          {padding, 4});
    return Build(kind, g).trusted ? 1 : 0;
  } catch (const dnnl::error&) {
    return -1;
  }
}

// The version of the oneDNN this library runs (the one it was linked with, unless another
// process-wide oneDNN took its symbols): major * 10000 + minor * 100 + patch.
extern "C" int SerOneDnnVersion() {
  const dnnl_version_t* v = dnnl_version();
  return v->major * 10000 + v->minor * 100 + v->patch;
}

// Whether oneDNN runs AVX2 code or better here (after ONEDNN_MAX_CPU_ISA): 1 or 0. Below it,
// oneDNN 3.2 has only SSE4.1 kernels, slower than XLA's for ResNet-18 (benchmarks/NOTES.md).
extern "C" int SerAtLeastAvx2() {
  const auto isa = static_cast<unsigned>(dnnl_get_effective_cpu_isa());
  const auto avx2 = static_cast<unsigned>(dnnl_cpu_isa_avx2);
  return (isa & avx2) == avx2 ? 1 : 0;
}
