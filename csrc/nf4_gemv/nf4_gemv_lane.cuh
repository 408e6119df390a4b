// What one lane of the NF4 GEMV computes (see nf4_gemv.cu for the whole kernel). Everything here
// is __host__ __device__: the kernel runs it on the GPU, and tests/csrc/nf4_gemv_emulate.cu runs
// the same code on the CPU, lane by lane, so that CPU-only CI checks the indexing and decoding.
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "nf4_gemv.h"

#if defined(__CUDA_ARCH__)
#define BORA_LDG(p) __ldg(p)
#else
#define BORA_LDG(p) (*(p))
#endif

namespace bora {
namespace nf4 {

constexpr int kWarp = 32;
constexpr int kPerLane = 32;       // weights per chunk: one 16-byte load of packed nibbles
constexpr int kChunksInFlight = 4;  // chunks a lane loads before decoding any (their loads overlap)
constexpr int kNestedBlocksize = 256;

// The 16 NF4 values as fp32 (bitsandbytes' code; NF4_CODE in bora_kernels/quant/nf4.py, which a
// test checks against these bit for bit). Written out by `fill_code` with constant indices, so
// the kernel fills its shared table from immediates instead of a global load.
__host__ __device__ __forceinline__ void fill_code(float* table) {
  constexpr float kCode[16] = {
      -1.0f, -0.6961928009986877f, -0.5250730514526367f, -0.39491748809814453f, -0.28444138169288635f,
      -0.18477343022823334f, -0.09105003625154495f, 0.0f, 0.07958029955625534f, 0.16093020141124725f,
      0.24611230194568634f, 0.33791524171829224f, 0.44070982933044434f, 0.5626170039176941f,
      0.7229568362236023f, 1.0f};
#pragma unroll
  for (int i = 0; i < 16; ++i) table[i] = kCode[i];
}

__host__ __device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__host__ __device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

// a * b rounded on its own, never fused with a following add (bitsandbytes rounds the nested
// absmax product before adding the offset)
__host__ __device__ __forceinline__ float mul_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  volatile float product = a * b;
  return product;
#endif
}

// One chunk's loads: 16 bytes of nibbles and its block's absmax (fp32, or with double
// quantization the 8-bit code and the nested absmax it scales).
struct ChunkLoads {
  uint4 bits;
  float absmax_or_nested;
  uint8_t absmax_code;
};

template <typename T> __host__ __device__ __forceinline__ T from_float(float v);
template <> __host__ __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <> __host__ __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

template <bool kDoubleQuant>
__host__ __device__ __forceinline__ ChunkLoads load_chunk(const NF4GemvArgs& a, const uint4* wrow, int64_t block,
                                                          int chunk) {
  ChunkLoads c;
  c.bits = BORA_LDG(wrow + chunk);
  if constexpr (kDoubleQuant) {
    c.absmax_code = BORA_LDG(static_cast<const uint8_t*>(a.absmax) + block);
    c.absmax_or_nested = BORA_LDG(a.nested_absmax + block / kNestedBlocksize);
  } else {
    c.absmax_code = 0;
    c.absmax_or_nested = BORA_LDG(static_cast<const float*>(a.absmax) + block);
  }
  return c;
}

// The block's absmax of a chunk: with double quantization code * nested absmax, rounded, plus the
// offset (`offset` is 0 without).
template <bool kDoubleQuant>
__host__ __device__ __forceinline__ float chunk_scale(const NF4GemvArgs& a, const ChunkLoads& c, float offset) {
  if constexpr (kDoubleQuant) return mul_rn(BORA_LDG(a.nested_code + c.absmax_code), c.absmax_or_nested) + offset;
  return c.absmax_or_nested;
}

// acc[m] = sum over this lane's chunks of the row of scale * sum_j x[m, k_j] * code[nibble_j].
// Chunk c (weights 32c .. 32c + 31 of the row) belongs to lane c % 32. A lane first loads up to
// kChunksInFlight of its chunks, then decodes and multiplies them, so that a row of K = 4096
// (four chunks per lane) costs one memory latency, not four. `code` is the 16-entry table (shared
// memory on the GPU); `offset` is the double-quantization offset (0 without).
template <typename T, int M, bool kDoubleQuant>
__host__ __device__ __forceinline__ void lane_partials(const NF4GemvArgs& a, int row, int lane, const float* code,
                                                       float offset, float (&acc)[M]) {
  const int k = a.k;
  const int chunks = k / kPerLane;
  const uint4* wrow = reinterpret_cast<const uint4*>(a.packed + static_cast<int64_t>(row) * (k / 2));
  const int64_t first_chunk = static_cast<int64_t>(row) * chunks;  // of the row, in the flattened weight
  const int log2_chunks_per_block = a.log2_blocksize - 5;          // blocks hold 2^(log2_blocksize - 5) chunks
  const T* x = static_cast<const T*>(a.x);
#pragma unroll
  for (int m = 0; m < M; ++m) acc[m] = 0.f;

  for (int base = lane; base < chunks; base += kWarp * kChunksInFlight) {
    ChunkLoads loads[kChunksInFlight];
#pragma unroll
    for (int u = 0; u < kChunksInFlight; ++u) {
      const int chunk = base + u * kWarp;
      const int64_t block = (first_chunk + chunk) >> log2_chunks_per_block;
      if (chunk < chunks) loads[u] = load_chunk<kDoubleQuant>(a, wrow, block, chunk);
    }
#pragma unroll
    for (int u = 0; u < kChunksInFlight; ++u) {
      const int chunk = base + u * kWarp;
      if (chunk >= chunks) break;
      const float scale = chunk_scale<kDoubleQuant>(a, loads[u], offset);
      // byte j of the 16 holds weight 2j in its high nibble and 2j + 1 in its low one
      const uint32_t words[4] = {loads[u].bits.x, loads[u].bits.y, loads[u].bits.z, loads[u].bits.w};
      float w[kPerLane];
#pragma unroll
      for (int j = 0; j < kPerLane / 2; ++j) {
        const uint32_t byte = (words[j / 4] >> (8 * (j % 4))) & 0xFFu;
        w[2 * j] = code[byte >> 4];
        w[2 * j + 1] = code[byte & 0xFu];
      }
#pragma unroll
      for (int m = 0; m < M; ++m) {
        const T* xrow = x + static_cast<int64_t>(m) * k + static_cast<int64_t>(chunk) * kPerLane;
        const uint4* xm = reinterpret_cast<const uint4*>(xrow);
        float dot = 0.f;
#pragma unroll
        for (int v = 0; v < kPerLane / 8; ++v) {
          const uint4 xbits = BORA_LDG(xm + v);
          T xs[8];
          memcpy(xs, &xbits, sizeof xs);  // not a pointer cast: that breaks strict aliasing on the host
#pragma unroll
          for (int e = 0; e < 8; ++e) dot = fmaf(to_float(xs[e]), w[8 * v + e], dot);
        }
        acc[m] = fmaf(dot, scale, acc[m]);
      }
    }
  }
}

// Calls f(T{}, double_quant) with `a`'s activation dtype T and a std::bool_constant of its double
// quantization: the dispatch both kernels' launchers (and the CPU emulation) share.
template <typename F>
void with_dtype_and_quant(const NF4GemvArgs& a, F&& f) {
  if (a.bf16) {
    a.double_quant ? f(__nv_bfloat16{}, std::true_type{}) : f(__nv_bfloat16{}, std::false_type{});
  } else {
    a.double_quant ? f(__half{}, std::true_type{}) : f(__half{}, std::false_type{});
  }
}

// Calls f(T{}, rows, double_quant) with the CUDA-core kernel's variant for `a`: rows a
// std::integral_constant of a.m (1..kNF4GemvMaxRows).
template <int M = 1, typename F>
void with_rows(int m, F&& f) {
  if (m == M) {
    f(std::integral_constant<int, M>{});
  } else if constexpr (M < kNF4GemvMaxRows) {
    with_rows<M + 1>(m, f);
  }
}

template <typename F>
void with_variant(const NF4GemvArgs& a, F&& f) {
  with_rows(a.m, [&](auto rows) { with_dtype_and_quant(a, [&](auto dtype, auto dq) { f(dtype, rows, dq); }); });
}

}  // namespace nf4
}  // namespace bora
