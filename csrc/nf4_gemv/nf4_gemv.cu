// The NF4 decode GEMV (see nf4_gemv.h for the layout).
//
// One warp per output row n, eight rows per block. Each lane owns every 32nd chunk of 32 weights
// of its row (one 16-byte load of packed nibbles, inside one absmax block because blocks hold >= 32
// weights and start at multiples of 32). It loads up to four of its chunks (and their absmax)
// before decoding any, decodes them through the 16-entry code table in shared memory, multiplies
// them with the matching activations of each of the M rows (16-byte loads) and applies the block's
// scale once per 32 products (nf4_gemv_lane.cuh). The M partial sums are reduced across the warp
// by shuffles at the end.
//
// Bytes: the weight is read once (K/2 bytes per row, fully coalesced); the activations, M*K*2
// bytes, are read by every warp but stay in L1/L2. Nothing is read before the first weight load
// but kernel arguments: the code table is written from immediates, and with double quantization
// the 256-entry nested code is read per chunk through the read-only cache (where it stays).
#include "nf4_gemv.h"

#include "nf4_gemv_lane.cuh"

namespace bora {
namespace {

using nf4::kWarp;
constexpr int kRowsPerBlock = 8;

template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

template <typename T, int M, bool kDoubleQuant>
__global__ void __launch_bounds__(kWarp * kRowsPerBlock, M == 1 ? 4 : 2) nf4_gemv_kernel(const NF4GemvArgs a) {
  __shared__ float code[16];
  if (threadIdx.x == 0) nf4::fill_code(code);
  __syncthreads();

  const int lane = threadIdx.x % kWarp;
  const int row = blockIdx.x * kRowsPerBlock + threadIdx.x / kWarp;
  if (row >= a.n) return;  // a whole warp leaves together, so the shuffles below stay full
  const float offset = kDoubleQuant ? __ldg(a.offset) : 0.f;
  float acc[M];
  nf4::lane_partials<T, M, kDoubleQuant>(a, row, lane, code, offset, acc);

#pragma unroll
  for (int m = 0; m < M; ++m) {
#pragma unroll
    for (int delta = kWarp / 2; delta > 0; delta /= 2) acc[m] += __shfl_xor_sync(0xffffffffu, acc[m], delta);
  }
  if (lane == 0) {
    const float b = a.bias ? nf4::to_float(static_cast<const T*>(a.bias)[row]) : 0.f;
    T* out = static_cast<T*>(a.out);
#pragma unroll
    for (int m = 0; m < M; ++m) out[static_cast<int64_t>(m) * a.n + row] = from_float<T>(acc[m] + b);
  }
}

}  // namespace

cudaError_t nf4_gemv(const NF4GemvArgs& a, cudaStream_t stream) {
  if (!nf4_gemv_args_valid(a)) return cudaErrorInvalidValue;
  const dim3 grid((a.n + kRowsPerBlock - 1) / kRowsPerBlock), block(kWarp * kRowsPerBlock);
  nf4::with_variant(a, [&](auto dtype, auto rows, auto double_quant) {
    nf4_gemv_kernel<decltype(dtype), rows.value, double_quant.value><<<grid, block, 0, stream>>>(a);
  });
  return cudaGetLastError();
}

}  // namespace bora
