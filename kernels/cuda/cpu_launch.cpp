// The very kernels of llmint8.cu, built as C++ against cpu_emulation.h and launched from Python
// with the arguments the CUDA backend passes to CuPy (addresses and numpy scalars), so that the
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
T* pointer(const py::handle& arg) {  // a device address, as CuPy receives it (numpy.uint64)
  return reinterpret_cast<T*>(arg.cast<uint64_t>());
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
    const long long rows_per_group = i64(a[4]);
    int* flags = pointer<int>(a[5]);
    return [=] { detect_outlier_columns<T>(x, m, k, threshold, rows_per_group, flags); };
  };
  kernels["quantize_rows<" + type + ">"] = [](const py::tuple& a) -> Body {
    const T* x = pointer<T>(a[0]);
    const int k = i32(a[1]);
    const long long rows_per_group = i64(a[2]);
    const int* flags = pointer<int>(a[3]);
    signed char* q = pointer<signed char>(a[4]);
    float* scale = pointer<float>(a[5]);
    return [=] { quantize_rows<T>(x, k, rows_per_group, flags, q, scale); };
  };
  kernels["epilogue<" + type + ">"] = [](const py::tuple& a) -> Body {
    const int* acc = pointer<int>(a[0]);
    const float *sx = pointer<float>(a[1]), *sw = pointer<float>(a[2]);
    const T* x = pointer<T>(a[3]);
    const long long rows_per_group = i64(a[4]);
    const int *flags = pointer<int>(a[5]), *stored_columns = pointer<int>(a[6]);
    const float* stored_rows = pointer<float>(a[7]);
    const int n_stored = i32(a[8]);
    const int *idx = pointer<int>(a[9]), *count = pointer<int>(a[10]);
    const signed char* qw = pointer<signed char>(a[11]);
    const T* bias = pointer<T>(a[12]);
    const int has_bias = i32(a[13]);
    const long long m = i64(a[14]);
    const int n = i32(a[15]), k = i32(a[16]);
    T* out = pointer<T>(a[17]);
    return [=] { epilogue<T>(acc, sx, sw, x, rows_per_group, flags, stored_columns, stored_rows, n_stored, idx, count, qw, bias, has_bias, m, n, k, out); };
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
      const int groups = i32(a[1]), n = i32(a[2]);
      const int* exclude = pointer<int>(a[3]);
      int *idx = pointer<int>(a[4]), *count = pointer<int>(a[5]);
      return [=] { compact_columns(flags, groups, n, exclude, idx, count); };
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
