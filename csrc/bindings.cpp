// pybind11 bindings of the csrc kernels for torch tensors (module bora_kernels._C, or
// bora_kernels_C when JIT-built). Checks here name the argument; the Python callers check first.
#include <torch/extension.h>

#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>

#include "nf4_gemv/nf4_gemv.h"

namespace {

bool aligned16(const torch::Tensor& t) { return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0; }

void check_cuda(const torch::Tensor& t, const char* name, const torch::Tensor& x) {
  TORCH_CHECK(t.is_cuda() && t.device() == x.device(), name, " must be on x's device ", x.device(), ", got ",
              t.device());
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

// out [M, N] = x [M, K] (M <= kNF4GemvMaxRows) @ dequant(W [N, K])^T (+ bias), in x's dtype;
// kernel: bora::NF4GemvKernel (0 by M, 1 CUDA cores, 2 tensor cores).
void nf4_gemv(const torch::Tensor& out, const torch::Tensor& x, const torch::Tensor& packed, const torch::Tensor& absmax,
              const c10::optional<torch::Tensor>& nested_absmax, const c10::optional<torch::Tensor>& nested_code,
              const c10::optional<torch::Tensor>& offset, const c10::optional<torch::Tensor>& bias, int64_t n,
              int64_t blocksize, int64_t kernel) {
  TORCH_CHECK(x.is_cuda() && x.dim() == 2 && x.is_contiguous(), "x must be a contiguous 2-D CUDA tensor");
  TORCH_CHECK(x.scalar_type() == torch::kBFloat16 || x.scalar_type() == torch::kHalf,
              "x must be bfloat16 or float16, got ", x.scalar_type());
  const int64_t m = x.size(0), k = x.size(1);
  TORCH_CHECK(m >= 1 && m <= bora::kNF4GemvMaxRows, "x must have 1 to ", bora::kNF4GemvMaxRows, " rows, got ", m);
  TORCH_CHECK(blocksize >= 32 && (blocksize & (blocksize - 1)) == 0, "blocksize must be a power of two >= 32, got ",
              blocksize);
  TORCH_CHECK(k % blocksize == 0, "K=", k, " must be a multiple of the blocksize ", blocksize);
  TORCH_CHECK(n >= 1 && n <= INT32_MAX && k <= INT32_MAX, "n and K must fit in int32, got n=", n, ", K=", k);
  check_cuda(packed, "packed", x);
  TORCH_CHECK(packed.scalar_type() == torch::kUInt8 && packed.numel() == n * k / 2, "packed must hold ", n * k / 2,
              " uint8 bytes, got ", packed.numel(), " of ", packed.scalar_type());
  TORCH_CHECK(aligned16(x) && aligned16(packed), "x and packed must be 16-byte aligned");
  check_cuda(absmax, "absmax", x);
  TORCH_CHECK(absmax.numel() == n * k / blocksize, "absmax must hold ", n * k / blocksize, " values, got ",
              absmax.numel());
  const bool double_quant = offset.has_value();
  if (double_quant) {
    TORCH_CHECK(nested_absmax.has_value() && nested_code.has_value(),
                "double quantization needs nested_absmax, nested_code and offset");
    TORCH_CHECK(absmax.scalar_type() == torch::kUInt8, "double-quantized absmax must be uint8 codes");
    check_cuda(*nested_absmax, "nested_absmax", x);
    check_cuda(*nested_code, "nested_code", x);
    check_cuda(*offset, "offset", x);
    TORCH_CHECK(nested_absmax->scalar_type() == torch::kFloat && nested_code->scalar_type() == torch::kFloat &&
                    offset->scalar_type() == torch::kFloat && nested_code->numel() == 256 && offset->numel() == 1,
                "nested_absmax, nested_code ([256]) and offset ([1]) must be fp32");
  } else {
    TORCH_CHECK(absmax.scalar_type() == torch::kFloat, "absmax must be fp32 without double quantization");
  }
  if (bias.has_value()) {
    check_cuda(*bias, "bias", x);
    TORCH_CHECK(bias->scalar_type() == x.scalar_type() && bias->numel() == n, "bias must be [", n, "] in x's dtype");
  }

  check_cuda(out, "out", x);
  TORCH_CHECK(out.scalar_type() == x.scalar_type() && out.numel() == m * n, "out must be [", m, ", ", n,
              "] in x's dtype");

  TORCH_CHECK(kernel >= bora::kAuto && kernel <= bora::kTensorCores,
              "kernel must be 0 (by M), 1 (CUDA cores) or 2 (tensor cores), got ", kernel);

  const c10::cuda::CUDAGuard guard(x.device());
  bora::NF4GemvArgs args{};
  args.x = x.data_ptr();
  args.packed = packed.data_ptr<uint8_t>();
  args.absmax = absmax.data_ptr();
  args.nested_absmax = double_quant ? nested_absmax->data_ptr<float>() : nullptr;
  args.nested_code = double_quant ? nested_code->data_ptr<float>() : nullptr;
  args.offset = double_quant ? offset->data_ptr<float>() : nullptr;
  args.bias = bias.has_value() ? bias->data_ptr() : nullptr;
  args.out = out.data_ptr();
  args.m = static_cast<int>(m);
  args.n = static_cast<int>(n);
  args.k = static_cast<int>(k);
  args.log2_blocksize = 0;
  while ((int64_t{1} << args.log2_blocksize) < blocksize) ++args.log2_blocksize;
  args.bf16 = x.scalar_type() == torch::kBFloat16;
  args.double_quant = double_quant;
  args.kernel = static_cast<int>(kernel);
  const cudaError_t err = bora::nf4_gemv(args, c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err != cudaErrorNotSupported,
              "kernel=2: the tensor-core GEMV needs a device of compute capability 8.0 or later and a build for it");
  TORCH_CHECK(err == cudaSuccess, "nf4_gemv launch failed: ", cudaGetErrorString(err));
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "bora_kernels' CUDA C++ kernels";
  // bora_kernels/_cuda_ext.py refuses a module built from sources with another API (a stale build)
  m.attr("API_VERSION") = 3;
  m.def("nf4_gemv", &nf4_gemv, "out [M, N] = x [M<=16, K] @ dequant(NF4 W [N, K])^T (+ bias), fp16/bf16",
        py::arg("out"), py::arg("x"),
        py::arg("packed"), py::arg("absmax"), py::arg("nested_absmax"), py::arg("nested_code"),
        py::arg("offset"), py::arg("bias"), py::arg("n"), py::arg("blocksize"), py::arg("kernel") = 0);
}
