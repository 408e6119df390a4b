// The NF4 decode GEMV (see nf4_gemv.h for the layout).
//
// One warp per output row n. Each step a lane loads 16 bytes of the row's packed weight (32
// weights, which share one absmax block because blocks hold >= 32 elements and start at multiples
// of 32), decodes them through the 16-entry code table in shared memory, and multiplies them with
// the matching 32 activations of each of the M rows (four 16-byte loads per row); the block's
// scale is applied once per 32 products. A warp covers 1024 weights of its row per step; the M
// partial sums are reduced across the warp by shuffles at the end.
//
// Bytes: the weight is read once (K/2 bytes per row, fully coalesced); the activations, M*K*2
// bytes, are read by every warp but stay in L1/L2.
#include "nf4_gemv.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace bora {
namespace {

constexpr int kWarp = 32;
constexpr int kPerLane = 32;  // weights per lane per step: one 16-byte load of packed nibbles
constexpr int kRowsPerBlock = 4;
constexpr int kNestedBlocksize = 256;

__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

template <bool kDoubleQuant>
__device__ __forceinline__ float block_scale(const NF4GemvArgs& a, int64_t block, float offset) {
  if constexpr (kDoubleQuant) {
    const uint8_t q = __ldg(static_cast<const uint8_t*>(a.absmax) + block);
    return __ldg(a.nested_code + q) * __ldg(a.nested_absmax + block / kNestedBlocksize) + offset;
  } else {
    return __ldg(static_cast<const float*>(a.absmax) + block);
  }
}

template <typename T, int M, bool kDoubleQuant>
__global__ void __launch_bounds__(kWarp * kRowsPerBlock) nf4_gemv_kernel(const NF4GemvArgs a) {
  __shared__ float table[16];
  if (threadIdx.x < 16) table[threadIdx.x] = a.code[threadIdx.x];
  __syncthreads();

  const int lane = threadIdx.x % kWarp;
  const int row = blockIdx.x * kRowsPerBlock + threadIdx.x / kWarp;
  if (row >= a.n) return;  // a whole warp leaves together, so the shuffles below stay full
  const int k = a.k;
  const uint8_t* wrow = a.packed + static_cast<int64_t>(row) * (k / 2);
  const int64_t first_block = (static_cast<int64_t>(row) * k) >> a.log2_blocksize;
  const T* x = static_cast<const T*>(a.x);
  const float offset = kDoubleQuant ? __ldg(a.offset) : 0.f;

  float acc[M];
#pragma unroll
  for (int m = 0; m < M; ++m) acc[m] = 0.f;

#pragma unroll 2
  for (int k0 = lane * kPerLane; k0 < k; k0 += kWarp * kPerLane) {
    const uint4 bits = __ldg(reinterpret_cast<const uint4*>(wrow + k0 / 2));
    const float scale = block_scale<kDoubleQuant>(a, first_block + (k0 >> a.log2_blocksize), offset);
    const uint8_t* bytes = reinterpret_cast<const uint8_t*>(&bits);
    float w[kPerLane];
#pragma unroll
    for (int j = 0; j < kPerLane / 2; ++j) {
      w[2 * j] = table[bytes[j] >> 4];
      w[2 * j + 1] = table[bytes[j] & 0xF];
    }
#pragma unroll
    for (int m = 0; m < M; ++m) {
      const uint4* xm = reinterpret_cast<const uint4*>(x + static_cast<int64_t>(m) * k + k0);
      float dot = 0.f;
#pragma unroll
      for (int v = 0; v < kPerLane / 8; ++v) {
        const uint4 xbits = __ldg(xm + v);
        const T* xs = reinterpret_cast<const T*>(&xbits);
#pragma unroll
        for (int e = 0; e < 8; ++e) dot = fmaf(to_float(xs[e]), w[8 * v + e], dot);
      }
      acc[m] = fmaf(dot, scale, acc[m]);
    }
  }

#pragma unroll
  for (int m = 0; m < M; ++m) {
#pragma unroll
    for (int delta = kWarp / 2; delta > 0; delta /= 2) acc[m] += __shfl_xor_sync(0xffffffffu, acc[m], delta);
  }
  if (lane == 0) {
    const float b = a.bias ? to_float(static_cast<const T*>(a.bias)[row]) : 0.f;
    T* out = static_cast<T*>(a.out);
#pragma unroll
    for (int m = 0; m < M; ++m) out[static_cast<int64_t>(m) * a.n + row] = from_float<T>(acc[m] + b);
  }
}

template <typename T, bool kDoubleQuant>
cudaError_t launch(const NF4GemvArgs& a, cudaStream_t stream) {
  const dim3 grid((a.n + kRowsPerBlock - 1) / kRowsPerBlock), block(kWarp * kRowsPerBlock);
  switch (a.m) {
    case 1: nf4_gemv_kernel<T, 1, kDoubleQuant><<<grid, block, 0, stream>>>(a); break;
    case 2: nf4_gemv_kernel<T, 2, kDoubleQuant><<<grid, block, 0, stream>>>(a); break;
    case 3: nf4_gemv_kernel<T, 3, kDoubleQuant><<<grid, block, 0, stream>>>(a); break;
    case 4: nf4_gemv_kernel<T, 4, kDoubleQuant><<<grid, block, 0, stream>>>(a); break;
    default: return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t nf4_gemv(const NF4GemvArgs& a, cudaStream_t stream) {
  if (a.m < 1 || a.m > kNF4GemvMaxRows || a.n < 1 || a.k < kPerLane || a.k % kPerLane || a.log2_blocksize < 5) {
    return cudaErrorInvalidValue;
  }
  if (a.bf16) {
    return a.double_quant ? launch<__nv_bfloat16, true>(a, stream) : launch<__nv_bfloat16, false>(a, stream);
  }
  return a.double_quant ? launch<__half, true>(a, stream) : launch<__half, false>(a, stream);
}

}  // namespace bora
