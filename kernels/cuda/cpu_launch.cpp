// The very kernels of llmint8.cu, built as C++ against cpu_emulation.h and launched from Python
// with the arguments the CUDA backend passes to CuPy (tensors and numpy scalars), so that the
// parity suite runs each CUDA kernel against the reference on every test run, without a GPU.
#include <torch/extension.h>

#include <map>
#include <string>

#include "cpu_emulation.h"
#include "llmint8.cu"

namespace {

namespace py = pybind11;
using Body = std::function<void()>;
using Kernel = std::function<Body(const py::tuple&)>;

template <typename T>
T* pointer(const py::handle& arg) {
  return reinterpret_cast<T*>(arg.cast<torch::Tensor>().data_ptr());
}
long long i64(const py::handle& arg) { return arg.cast<long long>(); }
int i32(const py::handle& arg) { return arg.cast<int>(); }
float f32(const py::handle& arg) { return arg.cast<float>(); }

template <typename T>
void add_typed(std::map<std::string, Kernel>& kernels, const std::string& type) {
  kernels["detect_outlier_columns<" + type + ">"] = [](const py::tuple& a) -> Body {
    const T* x = pointer<T>(a[0]);
    const long long m = i64(a[1]);
    const int k = i32(a[2]);
    const float threshold = f32(a[3]);
    int* flags = pointer<int>(a[4]);
    return [=] { detect_outlier_columns<T>(x, m, k, threshold, flags); };
  };
  kernels["quantize_rows<" + type + ">"] = [](const py::tuple& a) -> Body {
    const T* x = pointer<T>(a[0]);
    const int k = i32(a[1]);
    const int* flags = pointer<int>(a[2]);
    signed char* q = pointer<signed char>(a[3]);
    float* scale = pointer<float>(a[4]);
    return [=] { quantize_rows<T>(x, k, flags, q, scale); };
  };
  kernels["epilogue<" + type + ">"] = [](const py::tuple& a) -> Body {
    const int* acc = pointer<int>(a[0]);
    const float *sx = pointer<float>(a[1]), *sw = pointer<float>(a[2]);
    const T* x = pointer<T>(a[3]);
    const int *idx = pointer<int>(a[4]), *count = pointer<int>(a[5]), *stored_pos = pointer<int>(a[6]);
    const T* w_out = pointer<T>(a[7]);
    const int n_stored = i32(a[8]);
    const signed char* qw = pointer<signed char>(a[9]);
    const T* bias = pointer<T>(a[10]);
    const int has_bias = i32(a[11]);
    const long long m = i64(a[12]);
    const int n = i32(a[13]), k = i32(a[14]);
    T* out = pointer<T>(a[15]);
    return [=] { epilogue<T>(acc, sx, sw, x, idx, count, stored_pos, w_out, n_stored, qw, bias, has_bias, m, n, k, out); };
  };
}

const std::map<std::string, Kernel>& kernels() {
  static const std::map<std::string, Kernel> table = [] {
    std::map<std::string, Kernel> k;
    add_typed<__half>(k, "__half");
    add_typed<__nv_bfloat16>(k, "__nv_bfloat16");
    add_typed<float>(k, "float");
    k["compact_columns"] = [](const py::tuple& a) -> Body {
      const int* flags = pointer<int>(a[0]);
      const int n = i32(a[1]);
      int *idx = pointer<int>(a[2]), *count = pointer<int>(a[3]);
      return [=] { compact_columns(flags, n, idx, count); };
    };
    k["int8_gemm_wmma"] = [](const py::tuple& a) -> Body {
      const signed char *x = pointer<signed char>(a[0]), *w = pointer<signed char>(a[1]);
      int* c = pointer<int>(a[2]);
      const int m = i32(a[3]), n = i32(a[4]), kk = i32(a[5]);
      return [=] { int8_gemm_wmma(x, w, c, m, n, kk); };
    };
    return k;
  }();
  return table;
}

// launch("quantize_rows<__half>", grid, block, (x, k, flags, q, scale)): CuPy's call, on the CPU.
void launch(const std::string& name, int64_t grid, int64_t block, const py::tuple& args) {
  const auto found = kernels().find(name);
  TORCH_CHECK(found != kernels().end(), "no emulated kernel ", name);
  TORCH_CHECK(grid > 0 && block > 0 && block <= 1024, "launch of ", name, ": grid ", grid, ", block ", block);
  emulation::launch((unsigned)grid, (unsigned)block, found->second(args));
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("launch", &launch, "Run a kernel of llmint8.cu on the CPU with CUDA's semantics");
}
