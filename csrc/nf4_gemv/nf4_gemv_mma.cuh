// What one warp of the tensor-core NF4 GEMV computes (the kernel is in nf4_gemv.cu). Like
// nf4_gemv_lane.cuh, everything here is __host__ __device__: tests/csrc/nf4_gemv_emulate.cu runs it
// on the CPU with one host thread per lane and its own `Warp::mma`, so that CPU-only CI checks the
// fragment layout, the decoding and the block's reduction.
//
// A block owns 16 weight rows (row0 .. row0 + 15: the mma's M) and all M <= 16 tokens (one or two
// mma N tiles of 8); its eight warps split K. The weight is the A operand and x the B operand of
// mma.m16n8k16, with a permutation of k shared by both: in that shape lane (g, t) = (lane / 4,
// lane % 4) holds A rows g and g + 8 and B column g at the same four logical k positions
// {2t, 2t + 1, 2t + 8, 2t + 9}, so any relabelling of physical k is exact when A and B use the
// same one. Lane t of a quad reads the 32 contiguous weights k0 + 32t .. k0 + 32t + 31 of its two
// rows (a 16-byte load each, inside one absmax block) and the same 32 activations of its token;
// mma step s (of 8) gives logical k {2t, 2t + 1} to physical k0 + 32t + 4s + {0, 1} and
// {2t + 8, 2t + 9} to k0 + 32t + 4s + {2, 3}. Then a fragment register is exactly one packed byte
// decoded (weight 2j, the high nibble, in the low half) or one 32-bit word of x, and a warp chunk
// covers k0 .. k0 + 127.
//
// Weights are decoded as T(code * absmax), fp32 product rounded once: what dequantize() and
// bitsandbytes produce, so the products are exactly those of dequantize + F.linear.
#pragma once

#include "nf4_gemv_lane.cuh"

namespace bora {
namespace nf4 {
namespace mma {

constexpr int kRows = 16;                          // weight rows per block: the mma's M
constexpr int kTokens = 8;                         // tokens per mma: its N
constexpr int kWarps = 8;                          // warps per block; they split K
constexpr int kQuad = 4;                           // lanes sharing a row: 4 x 32 weights of k
constexpr int kWarpChunk = kQuad * kPerLane;       // k per warp chunk (128)
constexpr int kSteps = kPerLane / 4;               // mma steps per warp chunk: 4 of a lane's 32 k each
constexpr int kChunksInFlight = 4;                 // warp chunks loaded before any is decoded

// Two values as one fragment register: T(lo) in the low half.
__host__ __device__ __forceinline__ uint32_t pack(float lo, float hi, __nv_bfloat16*) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  uint32_t bits;
  memcpy(&bits, &v, 4);
  return bits;
}
__host__ __device__ __forceinline__ uint32_t pack(float lo, float hi, __half*) {
  const __half2 v = __floats2half2_rn(lo, hi);
  uint32_t bits;
  memcpy(&bits, &v, 4);
  return bits;
}

// Byte j of a chunk's 16 bytes decoded: weight 2j (its high nibble) and 2j + 1, times the scale,
// each rounded to T once.
template <typename T>
__host__ __device__ __forceinline__ uint32_t decode_byte(const uint4& bits, int j, const float* code, float scale) {
  const uint32_t words[4] = {bits.x, bits.y, bits.z, bits.w};
  const uint32_t byte = (words[j / 4] >> (8 * (j % 4))) & 0xFFu;
  return pack(code[byte >> 4] * scale, code[byte & 0xFu] * scale, static_cast<T*>(nullptr));
}

// One warp's partial sums over its warp chunks (chunk c of the row tile belongs to warp c % 8):
// acc[tile] is the mma's D fragment for tokens tile * 8 .. tile * 8 + 7, that is acc[tile][i] is
// the sum for weight row row0 + g (+ 8 for i >= 2) and token tile * 8 + 2t + (i & 1). Rows past N,
// tokens past M and k past K enter as zeros. `w.template mma<T>(d, a, b)` is mma.sync on the GPU
// and an emulation on the CPU.
template <typename T, int kTiles, bool kDoubleQuant, typename Warp>
__host__ __device__ __forceinline__ void warp_partials(const NF4GemvArgs& a, int row0, int warp, int lane,
                                                       const float* code, float offset, const Warp& w,
                                                       float (&acc)[kTiles][4]) {
  const int g = lane / kQuad, t = lane % kQuad;
  const int k = a.k;
  const int lane_chunks = k / kPerLane;  // 32-weight chunks per row
  const int warp_chunks = (lane_chunks + kQuad - 1) / kQuad;
  const int log2_chunks_per_block = a.log2_blocksize - 5;
  const int rows[2] = {row0 + g, row0 + g + 8};
  const T* x = static_cast<const T*>(a.x);
#pragma unroll
  for (int tile = 0; tile < kTiles; ++tile) {
#pragma unroll
    for (int i = 0; i < 4; ++i) acc[tile][i] = 0.f;
  }

  for (int base = warp; base < warp_chunks; base += kWarps * kChunksInFlight) {
    ChunkLoads loads[kChunksInFlight][2];
    bool valid[kChunksInFlight][2];
#pragma unroll
    for (int u = 0; u < kChunksInFlight; ++u) {
      const int lane_chunk = (base + u * kWarps) * kQuad + t;  // of the row
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        valid[u][h] = base + u * kWarps < warp_chunks && lane_chunk < lane_chunks && rows[h] < a.n;
        loads[u][h] = ChunkLoads{};
        if (valid[u][h]) {
          const uint4* wrow = reinterpret_cast<const uint4*>(a.packed + static_cast<int64_t>(rows[h]) * (k / 2));
          const int64_t block = (static_cast<int64_t>(rows[h]) * lane_chunks + lane_chunk) >> log2_chunks_per_block;
          loads[u][h] = load_chunk<kDoubleQuant>(a, wrow, block, lane_chunk);
        }
      }
    }
#pragma unroll
    for (int u = 0; u < kChunksInFlight; ++u) {
      if (base + u * kWarps >= warp_chunks) break;  // the same for the whole warp: mma.sync needs all lanes
      const int lane_chunk = (base + u * kWarps) * kQuad + t;
      float scale[2];
#pragma unroll
      for (int h = 0; h < 2; ++h) scale[h] = valid[u][h] ? chunk_scale<kDoubleQuant>(a, loads[u][h], offset) : 0.f;
      // the 32 activations of token tile * 8 + g at this lane's k, as 16 words (step s takes 2s, 2s + 1)
      uint32_t xw[kTiles][kPerLane / 2];
#pragma unroll
      for (int tile = 0; tile < kTiles; ++tile) {
        const int token = tile * kTokens + g;
        if (token < a.m && lane_chunk < lane_chunks) {
          const uint4* xs = reinterpret_cast<const uint4*>(x + static_cast<int64_t>(token) * k +
                                                           static_cast<int64_t>(lane_chunk) * kPerLane);
#pragma unroll
          for (int v = 0; v < 4; ++v) {
            const uint4 bits = BORA_LDG(xs + v);
            xw[tile][4 * v] = bits.x;
            xw[tile][4 * v + 1] = bits.y;
            xw[tile][4 * v + 2] = bits.z;
            xw[tile][4 * v + 3] = bits.w;
          }
        } else {
#pragma unroll
          for (int v = 0; v < kPerLane / 2; ++v) xw[tile][v] = 0u;
        }
      }
#pragma unroll
      for (int s = 0; s < kSteps; ++s) {
        // rows g and g + 8 at logical k {2t, 2t + 1} (byte 2s), then at {2t + 8, 2t + 9} (byte 2s + 1)
        const uint32_t frag_a[4] = {decode_byte<T>(loads[u][0].bits, 2 * s, code, scale[0]),
                                    decode_byte<T>(loads[u][1].bits, 2 * s, code, scale[1]),
                                    decode_byte<T>(loads[u][0].bits, 2 * s + 1, code, scale[0]),
                                    decode_byte<T>(loads[u][1].bits, 2 * s + 1, code, scale[1])};
#pragma unroll
        for (int tile = 0; tile < kTiles; ++tile) {
          const uint32_t frag_b[2] = {xw[tile][2 * s], xw[tile][2 * s + 1]};
          w.template mma<T>(acc[tile], frag_a, frag_b);
        }
      }
    }
  }
}

// partial[warp][r][token] (kWarps x kRows x kTiles * kTokens fp32, shared memory on the GPU) from
// one lane's D fragments.
template <int kTiles>
__host__ __device__ __forceinline__ void store_partials(int warp, int lane, const float (&acc)[kTiles][4],
                                                        float* partial) {
  const int g = lane / kQuad, t = lane % kQuad;
#pragma unroll
  for (int tile = 0; tile < kTiles; ++tile) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int r = g + (i >= 2 ? 8 : 0), token = tile * kTokens + 2 * t + (i & 1);
      partial[(warp * kRows + r) * (kTiles * kTokens) + token] = acc[tile][i];
    }
  }
}

// The block's sum for row row0 + r and a token: the eight warps' partials in warp order.
template <int kTiles>
__host__ __device__ __forceinline__ float tile_sum(const float* partial, int r, int token) {
  float sum = 0.f;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) sum += partial[(w * kRows + r) * (kTiles * kTokens) + token];
  return sum;
}

// Thread `tid` of the block (256 threads: 16 tokens x 16 rows, rows fastest so that a token's
// outputs are written together) writes its output, when its row and token exist.
template <typename T, int kTiles>
__host__ __device__ __forceinline__ void write_output(const NF4GemvArgs& a, int row0, int tid, const float* partial) {
  const int token = tid / kRows, r = tid % kRows, row = row0 + r;
  if (token >= a.m || row >= a.n) return;
  const float b = a.bias ? to_float(static_cast<const T*>(a.bias)[row]) : 0.f;
  const float sum = tile_sum<kTiles>(partial, r, token);
  static_cast<T*>(a.out)[static_cast<int64_t>(token) * a.n + row] = from_float<T>(sum + b);
}

// Calls f(T{}, tiles, double_quant) with the tensor-core kernel's variant for `a`: tiles a
// std::integral_constant, 1 for M <= 8 and 2 above.
template <typename F>
void with_variant(const NF4GemvArgs& a, F&& f) {
  with_dtype_and_quant(a, [&](auto dtype, auto dq) {
    if (a.m <= kTokens) {
      f(dtype, std::integral_constant<int, 1>{}, dq);
    } else {
      f(dtype, std::integral_constant<int, 2>{}, dq);
    }
  });
}

}  // namespace mma
}  // namespace nf4
}  // namespace bora
