// Times every avx512 implementation oneDNN offers for each convolution of ResNet-18 on a
// [batch, n_bins, 259, 1] input (forward, input gradient, kernel gradient), NHWC
// activations, kernels in the layout each implementation asks for. Built and run by
// onednn_impls.py. Usage: onednn_impls BATCH N_BINS
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <unordered_map>
#include <vector>

#include "oneapi/dnnl/dnnl.hpp"

using dnnl::memory;
using tag = memory::format_tag;

namespace {

dnnl::engine engine(dnnl::engine::kind::cpu, 0);
dnnl::stream stream(engine);

memory::desc Desc(const memory::dims& dims, tag t) {
  return memory::desc(dims, memory::data_type::f32, t);
}

memory Filled(const memory::desc& d) {
  memory m(d, engine);
  auto* p = static_cast<float*>(m.get_data_handle());
  for (size_t i = 0; i < d.get_size() / sizeof(float); ++i) p[i] = 0.01f * (i % 97);
  return m;
}

// Best of 5 rounds of 10 calls, in ms per call.
double Time(const dnnl::primitive& p, std::unordered_map<int, memory>& args) {
  p.execute(stream, args);
  stream.wait();
  double best = 1e30;
  for (int round = 0; round < 5; ++round) {
    auto start = std::chrono::steady_clock::now();
    for (int i = 0; i < 10; ++i) p.execute(stream, args);
    stream.wait();
    std::chrono::duration<double, std::milli> took = std::chrono::steady_clock::now() - start;
    best = std::min(best, took.count() / 10);
  }
  return best;
}

struct Conv {
  int64_t n, c, h, w, o, k, s, p;
  int64_t Out(int64_t x) const { return (x + 2 * p - k) / s + 1; }
};

// Each implementation of a fresh primitive descriptor from `make` (iterating one that
// another descriptor holds as its hint would advance both), timed when its name contains
// "avx512". `Primitive` is the primitive's class; `args` builds its arguments.
template <typename Primitive, typename Make, typename Args>
void Walk(const char* what, Make make, Args args) {
  auto pd = make();
  int index = 0;
  do {
    std::string name = pd.impl_info_str();
    if (name.find("avx512") != std::string::npos) {
      auto a = args(pd);
      printf("  %-6s #%d %-44s %8.3f ms\n", what, index, name.c_str(),
             Time(Primitive(pd), a));
    }
    ++index;
  } while (pd.next_impl());
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 3) {
    fprintf(stderr, "usage: %s BATCH N_BINS\n", argv[0]);
    return 2;
  }
  const int64_t batch = atoll(argv[1]), bins = atoll(argv[2]);
  // The stem, the max-pool, then per stage: a strided 3x3, a 3x3 and a 1x1 projection.
  std::vector<Conv> convs = {{batch, 1, bins, 259, 64, 7, 2, 3}};
  auto pooled = [](int64_t x) { return (((x + 6 - 7) / 2 + 1) + 2 - 3) / 2 + 1; };
  int64_t h = pooled(bins), w = pooled(259), c = 64;
  convs.push_back({batch, 64, h, w, 64, 3, 1, 1});
  for (int stage = 1; stage < 4; ++stage, c *= 2) {
    Conv strided{batch, c, h, w, 2 * c, 3, 2, 1};
    convs.push_back(strided);
    convs.push_back({batch, c, h, w, 2 * c, 1, 2, 0});
    h = strided.Out(h);
    w = strided.Out(w);
    convs.push_back({batch, 2 * c, h, w, 2 * c, 3, 1, 1});
  }
  for (const Conv& v : convs) {
    const int64_t oh = v.Out(v.h), ow = v.Out(v.w);
    memory::dims src{v.n, v.c, v.h, v.w}, weights{v.o, v.c, v.k, v.k}, dst{v.n, v.o, oh, ow};
    memory::dims strides{v.s, v.s}, pad_l{v.p, v.p};
    memory::dims pad_r{(oh - 1) * v.s + v.k - v.h - v.p, (ow - 1) * v.s + v.k - v.w - v.p};
    printf("%lldx%lld %lld->%lld %lldx%lld/%lld\n", (long long)v.h, (long long)v.w,
           (long long)v.c, (long long)v.o, (long long)v.k, (long long)v.k, (long long)v.s);
    auto forward = [&] {
      return dnnl::convolution_forward::primitive_desc(
          engine, dnnl::prop_kind::forward_training, dnnl::algorithm::convolution_direct,
          Desc(src, tag::nhwc), Desc(weights, tag::any), Desc(dst, tag::nhwc), strides, pad_l,
          pad_r);
    };
    Walk<dnnl::convolution_forward>("fwd", forward, [](const auto& pd) {
      return std::unordered_map<int, memory>{{DNNL_ARG_SRC, Filled(pd.src_desc())},
                                             {DNNL_ARG_WEIGHTS, Filled(pd.weights_desc())},
                                             {DNNL_ARG_DST, Filled(pd.dst_desc())}};
    });
    if (v.c > 1) {
      Walk<dnnl::convolution_backward_data>("bwd_d",
           [&] {
             return dnnl::convolution_backward_data::primitive_desc(
                 engine, dnnl::algorithm::convolution_direct, Desc(src, tag::nhwc),
                 Desc(weights, tag::any), Desc(dst, tag::nhwc), strides, pad_l, pad_r,
                 forward());
           },
           [](const auto& pd) {
             return std::unordered_map<int, memory>{
                 {DNNL_ARG_DIFF_SRC, Filled(pd.diff_src_desc())},
                 {DNNL_ARG_WEIGHTS, Filled(pd.weights_desc())},
                 {DNNL_ARG_DIFF_DST, Filled(pd.diff_dst_desc())}};
           });
    }
    Walk<dnnl::convolution_backward_weights>("bwd_w",
         [&] {
           return dnnl::convolution_backward_weights::primitive_desc(
               engine, dnnl::algorithm::convolution_direct, Desc(src, tag::nhwc),
               Desc(weights, tag::any), Desc(dst, tag::nhwc), strides, pad_l, pad_r, forward());
         },
         [](const auto& pd) {
           return std::unordered_map<int, memory>{
               {DNNL_ARG_SRC, Filled(pd.src_desc())},
               {DNNL_ARG_DIFF_WEIGHTS, Filled(pd.diff_weights_desc())},
               {DNNL_ARG_DIFF_DST, Filled(pd.diff_dst_desc())}};
         });
  }
  return 0;
}
