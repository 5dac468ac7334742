// Torch binding of the CUDA C++ backend. Includes no CUDA header (it compiles against the CPU
// torch wheel too): it validates tensors, allocates scratch with torch's caching allocator and
// passes raw pointers plus the caller's stream (an integer from Python,
// torch.cuda.current_stream(device).cuda_stream) to the extern "C" launchers of the .cu files.
// Outputs are allocated by the Python wrapper (lag_triton/kernels/cuda/__init__.py).
//
// Error contract: no C++ exception ever crosses into pybind11. Every bound function returns a
// std::string, empty on success, otherwise the error message; the Python wrapper raises
// RuntimeError(message). Validation never throws (no TORCH_CHECK: on the H100 machine a
// c10::Error thrown out of this JIT-built module took the interpreter down with a segfault). The
// only calls that can still throw (torch::empty for scratch, data_ptr) run inside a try block
// that converts any exception to the returned message.
//
// Messages are built from std::string and std::to_string only, never iostreams (c10::str,
// operator<<): on that machine the first message with a number in it (formatted through an
// ostringstream) segfaulted, while messages made of strings only came back fine.
#include <torch/extension.h>

#include <string>
#include <type_traits>

#include "lag_cuda.h"

namespace {

const char* const kPrefix = "lag_triton cuda backend: ";

std::string fmt(const char* s) { return s; }
std::string fmt(const std::string& s) { return s; }
std::string fmt(c10::ScalarType t) { return c10::toString(t); }
std::string fmt(const c10::Device& d) { return d.str(); }
std::string fmt(c10::IntArrayRef a) {
  std::string s = "[";
  for (size_t i = 0; i < a.size(); ++i) s += (i ? ", " : "") + std::to_string(a[i]);
  return s + "]";
}
template <typename T, typename = std::enable_if_t<std::is_arithmetic<T>::value>> std::string fmt(T v) {
  return std::to_string(v);
}

template <typename... Args> std::string err(const Args&... args) {
  std::string msg = kPrefix;
  ((msg += fmt(args)), ...);
  return msg;
}

// Each check returns "" when fine, else the message.
std::string dtype_code(const torch::Tensor& t, const char* name, int* code) {
  switch (t.scalar_type()) {
    case torch::kFloat32: *code = LAG_DTYPE_F32; return {};
    case torch::kFloat16: *code = LAG_DTYPE_F16; return {};
    case torch::kBFloat16: *code = LAG_DTYPE_BF16; return {};
    default:
      *code = -1;
      return err(name, " has dtype ", t.scalar_type(), "; expected float32, float16 or bfloat16");
  }
}

std::string check_tensor(const torch::Tensor& t, const char* name, int64_t dim, const torch::Device& device) {
  if (!t.defined()) return err(name, " is undefined");
  if (!t.is_cuda()) return err(name, " must be a CUDA tensor, got device ", t.device());
  if (t.device() != device) return err(name, " is on ", t.device(), " but x is on ", device);
  if (t.dim() != dim) return err(name, " must have ", dim, " dims, got shape ", t.sizes());
  if (!t.is_contiguous())
    return err(name, " must be contiguous (shape ", t.sizes(), ", strides ", t.strides(), ")");
  return {};
}

std::string check_dtype(const torch::Tensor& t, const char* name, torch::ScalarType want) {
  if (t.scalar_type() != want) return err(name, " must be ", want, ", got ", t.scalar_type());
  return {};
}

std::string check_shape(const torch::Tensor& t, const char* name, std::initializer_list<int64_t> want) {
  const c10::IntArrayRef w(want);
  if (t.sizes() != w) return err(name, " must have shape ", w, ", got ", t.sizes());
  return {};
}

void* as_stream(int64_t stream) { return reinterpret_cast<void*>(static_cast<intptr_t>(stream)); }

std::string launch_status(int rc, const char* op) {
  if (rc == 0) return {};
  const char* s = lag_cuda_error_string(rc);
  return err(op, " launch failed: ", s != nullptr ? s : "unknown CUDA error");
}

#define LAG_TRY(expr)                   \
  do {                                  \
    std::string lag_msg_ = (expr);      \
    if (!lag_msg_.empty()) return lag_msg_; \
  } while (0)

// Runs body() and turns any exception into the returned message: nothing escapes to pybind11.
template <typename F> std::string guarded(const char* op, F&& body) {
  try {
    return body();
  } catch (const c10::Error& e) {
    return err(op, ": ", e.what_without_backtrace());
  } catch (const std::exception& e) {
    return err(op, ": ", e.what());
  } catch (...) {
    return err(op, ": unknown C++ exception");
  }
}

// k in range, and the top-k outputs: idx [T, k] int32 and scores [T, k] fp32, contiguous on device.
std::string check_topk_outputs(const char* op, int64_t k, int64_t N, const torch::Tensor& idx,
                               const torch::Tensor& scores, const char* scores_name, int64_t T,
                               const torch::Device& device) {
  if (k < 1 || k > N) return err("k must be in [1, N=", N, "], got ", k);
  if (k > LAG_ARROW_MAX_K) return err(op, " supports k <= ", LAG_ARROW_MAX_K, ", got ", k);
  LAG_TRY(check_tensor(idx, "idx", 2, device));
  LAG_TRY(check_dtype(idx, "idx", torch::kInt32));
  LAG_TRY(check_shape(idx, "idx", {T, k}));
  LAG_TRY(check_tensor(scores, scores_name, 2, device));
  LAG_TRY(check_dtype(scores, scores_name, torch::kFloat32));
  LAG_TRY(check_shape(scores, scores_name, {T, k}));
  return {};
}

std::string arrow_select_impl(const torch::Tensor& scores, int64_t k, const torch::Tensor& idx,
                              const torch::Tensor& out_scores, const c10::optional<torch::Tensor>& allowed,
                              const c10::optional<torch::Tensor>& scope, int64_t stream) {
  if (!scores.defined()) return err("scores is undefined");
  const torch::Device device = scores.device();
  LAG_TRY(check_tensor(scores, "scores", 2, device));
  LAG_TRY(check_dtype(scores, "scores", torch::kFloat32));
  const int64_t T = scores.size(0), N = scores.size(1);
  LAG_TRY(check_topk_outputs("arrow_select", k, N, idx, out_scores, "out_scores", T, device));
  if (allowed.has_value() != scope.has_value()) return err("allowed and scope go together: give both or neither");
  const uint8_t* allowed_ptr = nullptr;
  const int32_t* scope_ptr = nullptr;
  int64_t S = 0;
  if (allowed.has_value()) {
    LAG_TRY(check_tensor(*allowed, "allowed", 2, device));
    LAG_TRY(check_dtype(*allowed, "allowed", torch::kUInt8));
    if (allowed->size(1) != N) return err("allowed must be [S, N=", N, "], got shape ", allowed->sizes());
    LAG_TRY(check_tensor(*scope, "scope", 1, device));
    LAG_TRY(check_dtype(*scope, "scope", torch::kInt32));
    LAG_TRY(check_shape(*scope, "scope", {T}));
    allowed_ptr = allowed->data_ptr<uint8_t>();
    scope_ptr = scope->data_ptr<int32_t>();
    S = allowed->size(0);
  }
  if (T == 0) return {};
  const int dev = device.index();
  const size_t ws_bytes = lag_arrow_select_workspace_bytes(T, N, k, dev);
  torch::Tensor ws;
  if (ws_bytes > 0) ws = torch::empty({static_cast<int64_t>(ws_bytes)}, scores.options().dtype(torch::kUInt8));
  const int rc = lag_arrow_select_launch(
      scores.data_ptr<float>(), T, N, N, k, allowed_ptr, scope_ptr, S, N, ws_bytes > 0 ? ws.data_ptr() : nullptr,
      ws_bytes, static_cast<int32_t*>(idx.data_ptr()), out_scores.data_ptr<float>(), dev, as_stream(stream));
  return launch_status(rc, "arrow_select");
}

std::string spectr_rerank_impl(const torch::Tensor& x, const torch::Tensor& a_star, const torch::Tensor& candidates,
                               int64_t top_m, bool combine_uniform, double temperature,
                               const c10::optional<torch::Tensor>& candidate_scores, const torch::Tensor& sel,
                               const torch::Tensor& w, const torch::Tensor& z, int64_t stream) {
  if (!x.defined()) return err("x is undefined");
  const torch::Device device = x.device();
  LAG_TRY(check_tensor(x, "x", 2, device));
  LAG_TRY(check_tensor(a_star, "a_star", 3, device));
  LAG_TRY(check_tensor(candidates, "candidates", 2, device));
  int x_dt = -1, a_dt = -1;
  LAG_TRY(dtype_code(x, "x", &x_dt));
  LAG_TRY(dtype_code(a_star, "a_star", &a_dt));
  if (x_dt != a_dt)
    return err("spectr_rerank needs x and a_star of one dtype, got ", x.scalar_type(), " and ", a_star.scalar_type(),
               " (the Python wrapper promotes them)");
  LAG_TRY(check_dtype(candidates, "candidates", torch::kInt32));
  const int64_t T = x.size(0), d_in = x.size(1), N = a_star.size(0), r = a_star.size(1);
  if (a_star.size(2) != d_in) return err("a_star has d_in=", a_star.size(2), " but x has d_in=", d_in);
  if (N < 1) return err("a_star holds no adapters (N=0)");
  if (candidates.size(0) != T) return err("candidates must be [T=", T, ", k], got shape ", candidates.sizes());
  const int64_t k = candidates.size(1);
  if (top_m < 1 || top_m > k) return err("top_m must be in [1, k=", k, "], got ", top_m);
  if (!(temperature > 0)) return err("temperature must be > 0, got ", temperature);
  const float* cs = nullptr;
  if (candidate_scores.has_value() && candidate_scores->defined()) {
    const torch::Tensor& s = *candidate_scores;
    LAG_TRY(check_tensor(s, "candidate_scores", 2, device));
    LAG_TRY(check_dtype(s, "candidate_scores", torch::kFloat32));
    LAG_TRY(check_shape(s, "candidate_scores", {T, k}));
    cs = static_cast<const float*>(s.data_ptr());
  }
  LAG_TRY(check_tensor(sel, "sel", 2, device));
  LAG_TRY(check_dtype(sel, "sel", torch::kInt32));
  LAG_TRY(check_shape(sel, "sel", {T, top_m}));
  LAG_TRY(check_tensor(w, "w", 2, device));
  LAG_TRY(check_dtype(w, "w", torch::kFloat32));
  LAG_TRY(check_shape(w, "w", {T, top_m}));
  LAG_TRY(check_tensor(z, "z", 3, device));
  LAG_TRY(check_dtype(z, "z", torch::kFloat32));
  LAG_TRY(check_shape(z, "z", {T, top_m, r}));
  if (T == 0) return {};
  torch::Tensor z_all = torch::empty({T, k, r}, x.options().dtype(torch::kFloat32));
  torch::Tensor key_all = torch::empty({T, k}, x.options().dtype(torch::kFloat32));
  const size_t ws_bytes = lag_spectr_rerank_workspace_bytes(T, N, k);
  torch::Tensor ws;
  if (ws_bytes > 0) ws = torch::empty({static_cast<int64_t>(ws_bytes)}, x.options().dtype(torch::kUInt8));
  const int rc = lag_spectr_rerank_launch(
      x.data_ptr(), x_dt, a_star.data_ptr(), a_dt, static_cast<const int32_t*>(candidates.data_ptr()), cs, T, N, r,
      d_in, k, top_m, combine_uniform ? 1 : 0, static_cast<float>(temperature), static_cast<float*>(z_all.data_ptr()),
      static_cast<float*>(key_all.data_ptr()), ws_bytes > 0 ? ws.data_ptr() : nullptr, ws_bytes,
      static_cast<int32_t*>(sel.data_ptr()), static_cast<float*>(w.data_ptr()), static_cast<float*>(z.data_ptr()),
      device.index(), as_stream(stream));
  return launch_status(rc, "spectr_rerank");
}

std::string lora_apply_impl(const torch::Tensor& y, const torch::Tensor& b_star, const torch::Tensor& sel,
                            const torch::Tensor& w, const torch::Tensor& z, int64_t stream) {
  if (!y.defined()) return err("y is undefined");
  const torch::Device device = y.device();
  LAG_TRY(check_tensor(y, "y", 2, device));
  LAG_TRY(check_tensor(b_star, "b_star", 3, device));
  int y_dt = -1, b_dt = -1;
  LAG_TRY(dtype_code(y, "y", &y_dt));
  LAG_TRY(dtype_code(b_star, "b_star", &b_dt));
  const int64_t T = y.size(0), d_out = y.size(1), N = b_star.size(0), r = b_star.size(2);
  if (b_star.size(1) != d_out) return err("b_star has d_out=", b_star.size(1), " but y has d_out=", d_out);
  if (N < 1) return err("b_star holds no adapters (N=0)");
  LAG_TRY(check_tensor(sel, "sel", 2, device));
  LAG_TRY(check_dtype(sel, "sel", torch::kInt32));
  if (sel.size(0) != T) return err("sel must be [T=", T, ", m], got shape ", sel.sizes());
  const int64_t m = sel.size(1);
  LAG_TRY(check_tensor(w, "w", 2, device));
  LAG_TRY(check_dtype(w, "w", torch::kFloat32));
  LAG_TRY(check_shape(w, "w", {T, m}));
  LAG_TRY(check_tensor(z, "z", 3, device));
  LAG_TRY(check_dtype(z, "z", torch::kFloat32));
  LAG_TRY(check_shape(z, "z", {T, m, r}));
  if (T == 0 || d_out == 0) return {};
  const int rc = lag_lora_apply_launch(y.data_ptr(), y_dt, b_star.data_ptr(), b_dt,
                                       static_cast<const int32_t*>(sel.data_ptr()),
                                       static_cast<const float*>(w.data_ptr()), static_cast<const float*>(z.data_ptr()),
                                       T, N, d_out, r, m, device.index(), as_stream(stream));
  return launch_status(rc, "lora_apply");
}

#undef LAG_TRY

// Bound entry points: all tensors by const reference (a Tensor is a handle; the kernels write
// through its data pointer), result = "" or the error message.
std::string arrow_select(const torch::Tensor& scores, int64_t k, const torch::Tensor& idx,
                         const torch::Tensor& out_scores, const c10::optional<torch::Tensor>& allowed,
                         const c10::optional<torch::Tensor>& scope, int64_t stream) {
  return guarded("arrow_select", [&] { return arrow_select_impl(scores, k, idx, out_scores, allowed, scope, stream); });
}

std::string spectr_rerank(const torch::Tensor& x, const torch::Tensor& a_star, const torch::Tensor& candidates,
                          int64_t top_m, bool combine_uniform, double temperature,
                          const c10::optional<torch::Tensor>& candidate_scores, const torch::Tensor& sel,
                          const torch::Tensor& w, const torch::Tensor& z, int64_t stream) {
  return guarded("spectr_rerank", [&] {
    return spectr_rerank_impl(x, a_star, candidates, top_m, combine_uniform, temperature, candidate_scores, sel, w,
                              z, stream);
  });
}

std::string lora_apply(const torch::Tensor& y, const torch::Tensor& b_star, const torch::Tensor& sel,
                       const torch::Tensor& w, const torch::Tensor& z, int64_t stream) {
  return guarded("lora_apply", [&] { return lora_apply_impl(y, b_star, sel, w, z, stream); });
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "lag_triton CUDA C++ backend (raw-pointer launchers in csrc/*.cu); every op returns '' or an error";
  m.attr("ERROR_CONTRACT") = "return-string";  // the Python wrapper raises RuntimeError(message)
  m.def("arrow_select", &arrow_select,
        "top-k of precomputed fp32 scores [T, N] by |score| (optionally scoped; writes idx, out_scores); returns '' "
        "or an error", py::arg("scores"), py::arg("k"), py::arg("idx"), py::arg("out_scores"), py::arg("allowed"),
        py::arg("scope"), py::arg("stream"));
  m.def("spectr_rerank", &spectr_rerank, "SpectR rerank (writes sel, w, z); returns '' or an error", py::arg("x"),
        py::arg("a_star"), py::arg("candidates"), py::arg("top_m"), py::arg("combine_uniform"),
        py::arg("temperature"), py::arg("candidate_scores"), py::arg("sel"), py::arg("w"), py::arg("z"),
        py::arg("stream"));
  m.def("lora_apply", &lora_apply, "gather-BGMV apply, y updated in place; returns '' or an error", py::arg("y"),
        py::arg("b_star"), py::arg("sel"), py::arg("w"), py::arg("z"), py::arg("stream"));
}
