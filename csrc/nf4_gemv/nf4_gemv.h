// The NF4 decode GEMV: out[m, n] = sum_k x[m, k] * code[nibble(n, k)] * absmax(n, k) (+ bias[n]),
// for 1 <= M <= kNF4GemvMaxRows rows of fp16 or bf16 activations. The weight is bitsandbytes' NF4
// layout: the row-major [N, K] weight flattened, element 2j in the high nibble of byte j and 2j+1
// in the low one, one absmax per `blocksize` elements (fp32, or with double quantization an 8-bit
// code into `nested_code`, times `nested_absmax[block / 256]`, plus `*offset`). The code is NF4's
// 16 values, built into the kernel.
//
// This header and nf4_gemv.cu need only the CUDA toolkit (no torch), so that CPU-only CI can
// compile the kernel with nvcc; bindings.cpp adapts torch tensors to it.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

namespace bora {

constexpr int kNF4GemvMaxRows = 16;

// Which kernel runs: CUDA cores (nf4_gemv_lane.cuh: a warp per weight row, fp32 FMAs) or tensor
// cores (nf4_gemv_mma.cuh: mma.sync on 16-row tiles, sm_80 and later). kAuto takes the tensor cores
// from kNF4GemvMmaMinRows rows on, where the device and the build have them.
enum NF4GemvKernel : int { kAuto = 0, kCudaCores = 1, kTensorCores = 2 };
constexpr int kNF4GemvMmaMinRows = 5;  // unmeasured: benchmarks/profile_nf4.py times both kernels by M

struct NF4GemvArgs {
  const void* x;              // [m, k] fp16 or bf16, contiguous, 16-byte aligned
  const uint8_t* packed;      // [n * k / 2], 16-byte aligned
  const void* absmax;         // [n * k / blocksize]: fp32, or uint8 codes with double quantization
  const float* nested_absmax; // [ceil(blocks / 256)] (double quantization only)
  const float* nested_code;   // [256] dynamic map (double quantization only)
  const float* offset;        // [1] (double quantization only)
  const void* bias;           // [n] in x's dtype, or nullptr
  void* out;                  // [m, n] in x's dtype
  int m, n, k;
  int log2_blocksize;         // blocksize = 1 << log2_blocksize, 32 <= blocksize, k % blocksize == 0
  bool bf16;                  // activations are bf16 (otherwise fp16)
  bool double_quant;
  int kernel;                 // NF4GemvKernel
};

// What the kernel needs of the sizes (the pointers' alignment is the caller's to check).
inline bool nf4_gemv_args_valid(const NF4GemvArgs& a) {
  return a.m >= 1 && a.m <= kNF4GemvMaxRows && a.n >= 1 && a.log2_blocksize >= 5 && a.log2_blocksize < 31 &&
         a.k >= (1 << a.log2_blocksize) && a.k % (1 << a.log2_blocksize) == 0 && a.kernel >= kAuto &&
         a.kernel <= kTensorCores;
}

// Launches the kernel on `stream`; returns the launch's error code (cudaSuccess when it went;
// cudaErrorNotSupported when args.kernel asks for the tensor cores and they are not available).
cudaError_t nf4_gemv(const NF4GemvArgs& args, cudaStream_t stream);

}  // namespace bora
