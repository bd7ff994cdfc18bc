// XLA FFI handlers that run 2-D float32 convolutions and their gradients in oneDNN.
//
// Activations are NHWC and kernels HWIO, as JAX lays them out, so no layout work
// is done on activations; kernels are reordered to oneDNN's blocked layout.
// Primitives are built once per shape and cached. Calls are serialised: oneDNN
// runs each one on all its OpenMP threads.

#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>

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

dnnl::convolution_forward::primitive_desc ForwardDesc(const Geometry& g) {
  return dnnl::convolution_forward::primitive_desc(
      Engine(), dnnl::prop_kind::forward_training, dnnl::algorithm::convolution_direct,
      Desc(g.src, tag::nhwc), Desc(g.weights, tag::any), Desc(g.dst, tag::nhwc), g.strides,
      g.pad_l, g.pad_r);
}

// One cached convolution: the primitive, and reorders between HWIO kernels and
// the primitive's kernel layout, with a buffer for the reordered kernel.
struct Cached {
  dnnl::primitive conv;
  dnnl::reorder kernel_reorder;
  memory::desc user_kernel, conv_kernel;
  std::unique_ptr<memory> kernel_buffer;
};

std::mutex mu;
std::unordered_map<std::string, std::unique_ptr<Cached>> cache;

Cached& Build(char kind, const Geometry& g) {
  auto key = g.Key(kind);
  auto it = cache.find(key);
  if (it != cache.end()) return *it->second;
  auto c = std::make_unique<Cached>();
  c->user_kernel = Desc(g.weights, tag::hwio);
  auto fwd = ForwardDesc(g);
  if (kind == 'f') {
    c->conv = dnnl::convolution_forward(fwd);
    c->conv_kernel = fwd.weights_desc();
  } else if (kind == 'd') {
    auto pd = dnnl::convolution_backward_data::primitive_desc(
        Engine(), dnnl::algorithm::convolution_direct, Desc(g.src, tag::nhwc),
        Desc(g.weights, tag::any), Desc(g.dst, tag::nhwc), g.strides, g.pad_l, g.pad_r, fwd);
    c->conv = dnnl::convolution_backward_data(pd);
    c->conv_kernel = pd.weights_desc();
  } else {
    auto pd = dnnl::convolution_backward_weights::primitive_desc(
        Engine(), dnnl::algorithm::convolution_direct, Desc(g.src, tag::nhwc),
        Desc(g.weights, tag::any), Desc(g.dst, tag::nhwc), g.strides, g.pad_l, g.pad_r, fwd);
    c->conv = dnnl::convolution_backward_weights(pd);
    c->conv_kernel = pd.diff_weights_desc();
  }
  // Kernels go into the primitive's layout, except the kernel gradient, which comes out of it.
  memory user(c->user_kernel, Engine(), nullptr), blocked(c->conv_kernel, Engine(), nullptr);
  c->kernel_reorder = kind == 'w' ? dnnl::reorder(blocked, user) : dnnl::reorder(user, blocked);
  c->kernel_buffer = std::make_unique<memory>(c->conv_kernel, Engine());
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

ffi::Error Run(char kind, const Geometry& g, float* src, float* kernel, float* dst) {
  try {
    std::lock_guard<std::mutex> lock(mu);
    Cached& c = Build(kind, g);
    dnnl::stream& stream = Stream();
    memory src_m(Desc(g.src, tag::nhwc), Engine(), src);
    memory dst_m(Desc(g.dst, tag::nhwc), Engine(), dst);
    memory user_kernel(c.user_kernel, Engine(), kernel);
    if (kind != 'w') c.kernel_reorder.execute(stream, user_kernel, *c.kernel_buffer);
    c.conv.execute(stream, {{kind == 'd' ? DNNL_ARG_DIFF_SRC : DNNL_ARG_SRC, src_m},
                            {kind == 'w' ? DNNL_ARG_DIFF_WEIGHTS : DNNL_ARG_WEIGHTS,
                             *c.kernel_buffer},
                            {kind == 'f' ? DNNL_ARG_DST : DNNL_ARG_DIFF_DST, dst_m}});
    if (kind == 'w') c.kernel_reorder.execute(stream, *c.kernel_buffer, user_kernel);
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
