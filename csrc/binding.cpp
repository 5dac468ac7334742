// Torch binding of the CUDA C++ backend. Includes no CUDA header (it compiles against the CPU
// torch wheel too): it validates tensors, allocates scratch with torch's caching allocator and
// passes raw pointers plus the caller's stream (an integer from Python,
// torch.cuda.current_stream(device).cuda_stream) to the extern "C" launchers of the .cu files.
// Outputs are allocated by the Python wrapper (lag_triton/kernels/cuda/__init__.py).
#include <torch/extension.h>

#include <string>

#include "lag_cuda.h"

namespace {

int dtype_code(const torch::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case torch::kFloat32: return LAG_DTYPE_F32;
    case torch::kFloat16: return LAG_DTYPE_F16;
    case torch::kBFloat16: return LAG_DTYPE_BF16;
    default: TORCH_CHECK(false, "lag_triton cuda backend: ", name, " has dtype ", t.scalar_type(),
                         "; expected float32, float16 or bfloat16");
  }
  return -1;
}

void check_tensor(const torch::Tensor& t, const char* name, int64_t dim, const torch::Device& device) {
  TORCH_CHECK(t.defined(), "lag_triton cuda backend: ", name, " is undefined");
  TORCH_CHECK(t.is_cuda(), "lag_triton cuda backend: ", name, " must be a CUDA tensor, got device ", t.device());
  TORCH_CHECK(t.device() == device, "lag_triton cuda backend: ", name, " is on ", t.device(), " but x is on ",
              device);
  TORCH_CHECK(t.dim() == dim, "lag_triton cuda backend: ", name, " must have ", dim, " dims, got shape ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), "lag_triton cuda backend: ", name, " must be contiguous (shape ", t.sizes(),
              ", strides ", t.strides(), ")");
}

void check_dtype(const torch::Tensor& t, const char* name, torch::ScalarType want) {
  TORCH_CHECK(t.scalar_type() == want, "lag_triton cuda backend: ", name, " must be ", want, ", got ",
              t.scalar_type());
}

void check_shape(const torch::Tensor& t, const char* name, std::vector<int64_t> want) {
  TORCH_CHECK(t.sizes() == c10::IntArrayRef(want), "lag_triton cuda backend: ", name, " must have shape ",
              c10::IntArrayRef(want), ", got ", t.sizes());
}

void* as_stream(int64_t stream) { return reinterpret_cast<void*>(static_cast<intptr_t>(stream)); }

void check_launch(int rc, const char* op) {
  TORCH_CHECK(rc == 0, "lag_triton cuda backend: ", op, " launch failed: ", lag_cuda_error_string(rc));
}

void arrow_topk(const torch::Tensor& x, const torch::Tensor& prototypes, int64_t k, torch::Tensor& idx,
                torch::Tensor& scores, int64_t stream) {
  const torch::Device device = x.device();
  check_tensor(x, "x", 2, device);
  check_tensor(prototypes, "prototypes", 2, device);
  const int x_dt = dtype_code(x, "x"), p_dt = dtype_code(prototypes, "prototypes");
  TORCH_CHECK(x_dt == p_dt, "lag_triton cuda backend: arrow_topk needs x and prototypes of one dtype, got ",
              x.scalar_type(), " and ", prototypes.scalar_type(), " (the Python wrapper promotes them)");
  const int64_t T = x.size(0), d_in = x.size(1), N = prototypes.size(0);
  TORCH_CHECK(prototypes.size(1) == d_in, "lag_triton cuda backend: prototypes has d_in=", prototypes.size(1),
              " but x has d_in=", d_in);
  TORCH_CHECK(k >= 1 && k <= N, "lag_triton cuda backend: k must be in [1, N=", N, "], got ", k);
  TORCH_CHECK(k <= LAG_ARROW_MAX_K, "lag_triton cuda backend: arrow_topk supports k <= ", LAG_ARROW_MAX_K,
              ", got ", k);
  check_tensor(idx, "idx", 2, device);
  check_dtype(idx, "idx", torch::kInt32);
  check_shape(idx, "idx", {T, k});
  check_tensor(scores, "scores", 2, device);
  check_dtype(scores, "scores", torch::kFloat32);
  check_shape(scores, "scores", {T, k});
  if (T == 0) return;
  const int dev = device.index();
  const size_t ws_bytes = lag_arrow_topk_workspace_bytes(T, N, k, dev);
  torch::Tensor ws;
  if (ws_bytes > 0) ws = torch::empty({static_cast<int64_t>(ws_bytes)}, x.options().dtype(torch::kUInt8));
  const int rc = lag_arrow_topk_launch(x.data_ptr(), x_dt, prototypes.data_ptr(), p_dt, T, N, d_in, k,
                                       ws_bytes > 0 ? ws.data_ptr() : nullptr, ws_bytes,
                                       idx.data_ptr<int32_t>(), scores.data_ptr<float>(), dev, as_stream(stream));
  check_launch(rc, "arrow_topk");
}

void spectr_rerank(const torch::Tensor& x, const torch::Tensor& a_star, const torch::Tensor& candidates,
                   int64_t top_m, bool combine_uniform, double temperature,
                   const c10::optional<torch::Tensor>& candidate_scores, torch::Tensor& sel, torch::Tensor& w,
                   torch::Tensor& z, int64_t stream) {
  const torch::Device device = x.device();
  check_tensor(x, "x", 2, device);
  check_tensor(a_star, "a_star", 3, device);
  check_tensor(candidates, "candidates", 2, device);
  const int x_dt = dtype_code(x, "x"), a_dt = dtype_code(a_star, "a_star");
  check_dtype(candidates, "candidates", torch::kInt32);
  const int64_t T = x.size(0), d_in = x.size(1), N = a_star.size(0), r = a_star.size(1);
  TORCH_CHECK(a_star.size(2) == d_in, "lag_triton cuda backend: a_star has d_in=", a_star.size(2),
              " but x has d_in=", d_in);
  TORCH_CHECK(N >= 1, "lag_triton cuda backend: a_star holds no adapters (N=0)");
  TORCH_CHECK(candidates.size(0) == T, "lag_triton cuda backend: candidates must be [T=", T, ", k], got shape ",
              candidates.sizes());
  const int64_t k = candidates.size(1);
  TORCH_CHECK(top_m >= 1 && top_m <= k, "lag_triton cuda backend: top_m must be in [1, k=", k, "], got ", top_m);
  TORCH_CHECK(temperature > 0, "lag_triton cuda backend: temperature must be > 0, got ", temperature);
  const float* cs = nullptr;
  if (candidate_scores.has_value() && candidate_scores->defined()) {
    const torch::Tensor& s = *candidate_scores;
    check_tensor(s, "candidate_scores", 2, device);
    check_dtype(s, "candidate_scores", torch::kFloat32);
    check_shape(s, "candidate_scores", {T, k});
    cs = s.data_ptr<float>();
  }
  check_tensor(sel, "sel", 2, device);
  check_dtype(sel, "sel", torch::kInt32);
  check_shape(sel, "sel", {T, top_m});
  check_tensor(w, "w", 2, device);
  check_dtype(w, "w", torch::kFloat32);
  check_shape(w, "w", {T, top_m});
  check_tensor(z, "z", 3, device);
  check_dtype(z, "z", torch::kFloat32);
  check_shape(z, "z", {T, top_m, r});
  if (T == 0) return;
  torch::Tensor z_all = torch::empty({T, k, r}, x.options().dtype(torch::kFloat32));
  torch::Tensor key_all = torch::empty({T, k}, x.options().dtype(torch::kFloat32));
  const int rc = lag_spectr_rerank_launch(
      x.data_ptr(), x_dt, a_star.data_ptr(), a_dt, candidates.data_ptr<int32_t>(), cs, T, N, r, d_in, k, top_m,
      combine_uniform ? 1 : 0, static_cast<float>(temperature), static_cast<float>(1.0 / static_cast<double>(top_m)),
      z_all.data_ptr<float>(), key_all.data_ptr<float>(), sel.data_ptr<int32_t>(), w.data_ptr<float>(),
      z.data_ptr<float>(), device.index(), as_stream(stream));
  check_launch(rc, "spectr_rerank");
}

void lora_apply(torch::Tensor& y, const torch::Tensor& b_star, const torch::Tensor& sel, const torch::Tensor& w,
                const torch::Tensor& z, int64_t stream) {
  const torch::Device device = y.device();
  check_tensor(y, "y", 2, device);
  check_tensor(b_star, "b_star", 3, device);
  const int y_dt = dtype_code(y, "y"), b_dt = dtype_code(b_star, "b_star");
  const int64_t T = y.size(0), d_out = y.size(1), N = b_star.size(0), r = b_star.size(2);
  TORCH_CHECK(b_star.size(1) == d_out, "lag_triton cuda backend: b_star has d_out=", b_star.size(1),
              " but y has d_out=", d_out);
  TORCH_CHECK(N >= 1, "lag_triton cuda backend: b_star holds no adapters (N=0)");
  check_tensor(sel, "sel", 2, device);
  check_dtype(sel, "sel", torch::kInt32);
  TORCH_CHECK(sel.size(0) == T, "lag_triton cuda backend: sel must be [T=", T, ", m], got shape ", sel.sizes());
  const int64_t m = sel.size(1);
  check_tensor(w, "w", 2, device);
  check_dtype(w, "w", torch::kFloat32);
  check_shape(w, "w", {T, m});
  check_tensor(z, "z", 3, device);
  check_dtype(z, "z", torch::kFloat32);
  check_shape(z, "z", {T, m, r});
  if (T == 0 || d_out == 0) return;
  const int rc = lag_lora_apply_launch(y.data_ptr(), y_dt, b_star.data_ptr(), b_dt, sel.data_ptr<int32_t>(),
                                       w.data_ptr<float>(), z.data_ptr<float>(), T, N, d_out, r, m, device.index(),
                                       as_stream(stream));
  check_launch(rc, "lora_apply");
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "lag_triton CUDA C++ backend (raw-pointer launchers in csrc/*.cu)";
  m.def("arrow_topk", &arrow_topk, "Arrow scoring + fused top-k (writes idx, scores)", py::arg("x"),
        py::arg("prototypes"), py::arg("k"), py::arg("idx"), py::arg("scores"), py::arg("stream"));
  m.def("spectr_rerank", &spectr_rerank, "SpectR rerank (writes sel, w, z)", py::arg("x"), py::arg("a_star"),
        py::arg("candidates"), py::arg("top_m"), py::arg("combine_uniform"), py::arg("temperature"),
        py::arg("candidate_scores"), py::arg("sel"), py::arg("w"), py::arg("z"), py::arg("stream"));
  m.def("lora_apply", &lora_apply, "gather-BGMV apply, y updated in place", py::arg("y"), py::arg("b_star"),
        py::arg("sel"), py::arg("w"), py::arg("z"), py::arg("stream"));
}
