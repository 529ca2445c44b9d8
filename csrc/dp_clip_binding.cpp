// Python binding of the cooperative "compute once" clip (csrc/dp_clip.cu); compiled with it at run time by
// memtrain.kernels.dp_clip_once.prepare() (torch.utils.cpp_extension.load_inline).
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#include <torch/extension.h>

#include <limits>
#include <string>

extern "C" int dp_clip_once_partial_floats(int d_out, int d_in);
extern "C" int dp_clip_once_check(int d_out, int d_in);
extern "C" int dp_clip_once_launch(const float* g, const float* x, float* grad_w, float* partial, float* sq_out,
                                   int B, int T, int d_out, int d_in, float max_norm, float scale, void* stream,
                                   int check);

namespace {

std::string describe(int rc) {
  if (rc == -1) return "the layer's output tiles do not fit co-resident on this GPU";
  if (rc == -2) return "this GPU does not support cooperative launches";
  return cudaGetErrorString(static_cast<cudaError_t>(rc));
}

void check_int(int64_t v, const char* what) {
  TORCH_CHECK(v <= std::numeric_limits<int>::max(), "dp_clip_once: ", what, " = ", v, " exceeds the kernel's int range");
}

// Whether the kernel can run for a (d_out, d_in) layer on `device`; an empty string when it can, else why not.
std::string dp_clip_once_refusal(int64_t device, int64_t d_out, int64_t d_in) {
  check_int(d_out, "d_out");
  check_int(d_in, "d_in");
  const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device));
  const int rc = dp_clip_once_check(static_cast<int>(d_out), static_cast<int>(d_in));
  return rc == 0 ? std::string() : describe(rc);
}

torch::Tensor dp_clip_once(torch::Tensor g, torch::Tensor x, torch::Tensor grad_w, double max_norm, double scale,
                           bool check_occupancy) {
  TORCH_CHECK(g.is_cuda() && x.is_cuda() && grad_w.is_cuda(), "dp_clip_once: tensors must be on CUDA");
  TORCH_CHECK(g.device() == x.device() && g.device() == grad_w.device(), "dp_clip_once: tensors on different devices");
  TORCH_CHECK(g.scalar_type() == torch::kFloat && x.scalar_type() == torch::kFloat &&
                  grad_w.scalar_type() == torch::kFloat,
              "dp_clip_once: fp32 tensors only");
  TORCH_CHECK(g.is_contiguous() && x.is_contiguous() && grad_w.is_contiguous(), "dp_clip_once: contiguous only");
  TORCH_CHECK(g.dim() == 3 && x.dim() == 3 && g.size(0) == x.size(0) && g.size(1) == x.size(1),
              "dp_clip_once: expected g (B, T, out) and x (B, T, in)");
  TORCH_CHECK(grad_w.dim() == 2 && grad_w.size(0) == g.size(2) && grad_w.size(1) == x.size(2),
              "dp_clip_once: grad_w must be (out, in)");
  for (int64_t v : {g.size(0), g.size(1), g.size(2), x.size(2)}) check_int(v, "a dimension");
  const c10::cuda::CUDAGuard guard(g.device());
  auto sq = torch::zeros({g.size(0)}, g.options());
  const int d_out = static_cast<int>(g.size(2)), d_in = static_cast<int>(x.size(2));
  auto partial = torch::empty({dp_clip_once_partial_floats(d_out, d_in)}, g.options());
  const int rc = dp_clip_once_launch(g.data_ptr<float>(), x.data_ptr<float>(), grad_w.data_ptr<float>(),
                                     partial.data_ptr<float>(), sq.data_ptr<float>(), static_cast<int>(g.size(0)),
                                     static_cast<int>(g.size(1)), d_out, d_in, static_cast<float>(max_norm),
                                     static_cast<float>(scale), c10::cuda::getCurrentCUDAStream().stream(),
                                     check_occupancy ? 1 : 0);
  TORCH_CHECK(rc == 0, "dp_clip_once: cooperative launch refused (", describe(rc), "); use the two-pass path");
  return sq;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("dp_clip_once", &dp_clip_once, "clip each sample's weight gradient once computed; returns raw squared norms",
        py::arg("g"), py::arg("x"), py::arg("grad_w"), py::arg("max_norm"), py::arg("scale"),
        py::arg("check_occupancy") = true);
  m.def("dp_clip_once_refusal", &dp_clip_once_refusal, "why the kernel cannot run for this layer ('' if it can)");
}
