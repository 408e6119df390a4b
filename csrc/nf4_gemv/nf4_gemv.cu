// The NF4 decode GEMV (see nf4_gemv.h for the layout). Two kernels; nf4_gemv() picks one by M.
//
// CUDA cores (nf4_gemv_kernel, nf4_gemv_lane.cuh): one warp per output row n, eight rows per
// block. Each lane owns every 32nd chunk of 32 weights of its row (one 16-byte load of packed
// nibbles, inside one absmax block because blocks hold >= 32 weights and start at multiples of
// 32). It loads up to four of its chunks (and their absmax) before decoding any, decodes them
// through the 16-entry code table in shared memory, multiplies them with the matching activations
// of each of the M rows (16-byte loads) and applies the block's scale once per 32 products. The M
// partial sums are reduced across the warp by shuffles at the end. Per weight: M FMAs, and the
// activations are read by every warp (M * K * 2 bytes per row, from L1/L2).
//
// Tensor cores (nf4_gemv_mma_kernel, nf4_gemv_mma.cuh): a block per 16 weight rows, its eight
// warps splitting K in 128-wide chunks; each weight is decoded once to T and enters mma.sync
// m16n8k16 (one or two per 16 k for M <= 8 or <= 16), so the cost per weight no longer grows with
// M, and the activations are read once per 16 rows instead of once per row. The warps' fp32 tiles
// are summed in shared memory in warp order.
//
// Bytes: the weight is read once (K/2 bytes per row, fully coalesced). Nothing is read before the
// first weight load but kernel arguments: the code table is written from immediates, and with
// double quantization the 256-entry nested code is read per chunk through the read-only cache.
#include "nf4_gemv.h"

#include <atomic>

#include "nf4_gemv_lane.cuh"
#include "nf4_gemv_mma.cuh"

namespace bora {
namespace {

using nf4::kWarp;
constexpr int kRowsPerBlock = 8;

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
    for (int m = 0; m < M; ++m) out[static_cast<int64_t>(m) * a.n + row] = nf4::from_float<T>(acc[m] + b);
  }
}

// mma.sync.m16n8k16 with fp32 accumulation: d += a (16 x 16, row) * b (16 x 8, col).
struct DeviceWarp {
  template <typename T>
  __device__ __forceinline__ void mma(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) const {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    if constexpr (std::is_same_v<T, __nv_bfloat16>) {
      asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
          "{%0, %1, %2, %3};"
          : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
          : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
    } else {
      asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
          "{%0, %1, %2, %3};"
          : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
          : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
    }
#else
    __trap();  // never launched: tensor_cores_available() is false for such a build
#endif
  }
};

constexpr int kMmaThreads = kWarp * nf4::mma::kWarps;
static_assert(kMmaThreads == nf4::mma::kRows * 2 * nf4::mma::kTokens, "one output per thread at M = 16");

template <typename T, int kTiles, bool kDoubleQuant>
__global__ void __launch_bounds__(kMmaThreads, 2) nf4_gemv_mma_kernel(const NF4GemvArgs a) {
  namespace mma = nf4::mma;
  __shared__ float code[16];
  __shared__ float partial[mma::kWarps * mma::kRows * kTiles * mma::kTokens];
  if (threadIdx.x == 0) nf4::fill_code(code);
  __syncthreads();

  const int row0 = blockIdx.x * mma::kRows;
  const float offset = kDoubleQuant ? __ldg(a.offset) : 0.f;
  float acc[kTiles][4];
  mma::warp_partials<T, kTiles, kDoubleQuant>(a, row0, threadIdx.x / kWarp, threadIdx.x % kWarp, code, offset,
                                              DeviceWarp{}, acc);
  mma::store_partials<kTiles>(threadIdx.x / kWarp, threadIdx.x % kWarp, acc, partial);
  __syncthreads();
  mma::write_output<T, kTiles>(a, row0, threadIdx.x, partial);
}

// Whether the tensor-core kernel can run on the current device: its compiled code has mma.sync
// (built for sm_80 or later, and the device runs that build).
bool tensor_cores_available() {
  // per device, once: the PTX version the device's chosen build of the kernel was compiled for
  static std::atomic<int8_t> known[64] = {};
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess) return false;
  if (device < 0 || device >= 64) return false;
  int8_t state = known[device].load(std::memory_order_relaxed);
  if (state == 0) {
    cudaFuncAttributes attr{};
    const bool ok = cudaFuncGetAttributes(&attr, nf4_gemv_mma_kernel<__nv_bfloat16, 1, false>) == cudaSuccess &&
                    attr.ptxVersion >= 80;
    cudaGetLastError();  // a failed query must not linger as the next launch's error
    state = ok ? 1 : -1;
    known[device].store(state, std::memory_order_relaxed);
  }
  return state > 0;
}

}  // namespace

cudaError_t nf4_gemv(const NF4GemvArgs& a, cudaStream_t stream) {
  if (!nf4_gemv_args_valid(a)) return cudaErrorInvalidValue;
  const bool tensor_cores = a.kernel == kTensorCores || (a.kernel == kAuto && a.m >= kNF4GemvMmaMinRows);
  if (tensor_cores && tensor_cores_available()) {
    const dim3 grid((a.n + nf4::mma::kRows - 1) / nf4::mma::kRows), block(kMmaThreads);
    nf4::mma::with_variant(a, [&](auto dtype, auto tiles, auto double_quant) {
      nf4_gemv_mma_kernel<decltype(dtype), tiles.value, double_quant.value><<<grid, block, 0, stream>>>(a);
    });
    return cudaGetLastError();
  }
  if (a.kernel == kTensorCores) return cudaErrorNotSupported;
  const dim3 grid((a.n + kRowsPerBlock - 1) / kRowsPerBlock), block(kWarp * kRowsPerBlock);
  nf4::with_variant(a, [&](auto dtype, auto rows, auto double_quant) {
    nf4_gemv_kernel<decltype(dtype), rows.value, double_quant.value><<<grid, block, 0, stream>>>(a);
  });
  return cudaGetLastError();
}

}  // namespace bora
