// Runs the NF4 GEMV's per-lane code (csrc/nf4_gemv/nf4_gemv_lane.cuh) on the CPU, lane by lane,
// with the warp's shuffle reduction done in the same order, so that tests/test_csrc.py can check
// the kernel's indexing, decoding and scaling without a GPU. What it cannot check (the launch,
// shared memory, the shuffles themselves) the GPU tests do.
//
//   nf4_gemv_emulate code
//       prints the kernel's 16 code values as fp32 bit patterns (hex), one per line
//   nf4_gemv_emulate DIR M N K LOG2_BLOCKSIZE BF16 DOUBLE_QUANT HAS_BIAS
//       reads DIR/{x,packed,absmax,nested_absmax,nested_code,offset,bias,out}.bin (raw, as the
//       kernel takes them; out.bin is the poisoned output), writes DIR/out.bin (the rows the
//       kernel writes, rounded to x's dtype) and DIR/acc.bin (fp32 [M, N], the reduced sums
//       before the bias)
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "nf4_gemv/nf4_gemv_lane.cuh"

namespace {

std::vector<unsigned char> read_file(const std::string& path) {
  std::vector<unsigned char> data;
  FILE* f = std::fopen(path.c_str(), "rb");
  if (!f) return data;
  unsigned char buf[1 << 16];
  size_t got;
  while ((got = std::fread(buf, 1, sizeof buf, f)) > 0) data.insert(data.end(), buf, buf + got);
  std::fclose(f);
  data.resize(data.size() + 16);  // keep 16-byte loads of the last element inside the allocation
  return data;
}

void write_file(const std::string& path, const void* data, size_t bytes) {
  FILE* f = std::fopen(path.c_str(), "wb");
  if (!f || std::fwrite(data, 1, bytes, f) != bytes) {
    std::fprintf(stderr, "cannot write %s\n", path.c_str());
    std::exit(2);
  }
  std::fclose(f);
}

inline __half round_to(float v, __half*) { return __float2half_rn(v); }
inline __nv_bfloat16 round_to(float v, __nv_bfloat16*) { return __float2bfloat16_rn(v); }

template <typename T, int M, bool kDoubleQuant>
void emulate(const bora::NF4GemvArgs& a, float* reduced) {
  float code[16];
  bora::nf4::fill_code(code);
  const float offset = kDoubleQuant ? *a.offset : 0.f;
  T* out = static_cast<T*>(a.out);
  for (int row = 0; row < a.n; ++row) {
    float lanes[bora::nf4::kWarp][M];
    for (int lane = 0; lane < bora::nf4::kWarp; ++lane) {
      bora::nf4::lane_partials<T, M, kDoubleQuant>(a, row, lane, code, offset, lanes[lane]);
    }
    for (int m = 0; m < M; ++m) {  // __shfl_xor_sync's butterfly: every lane adds its partner's value
      float v[bora::nf4::kWarp];
      for (int lane = 0; lane < bora::nf4::kWarp; ++lane) v[lane] = lanes[lane][m];
      for (int delta = bora::nf4::kWarp / 2; delta > 0; delta /= 2) {
        float next[bora::nf4::kWarp];
        for (int lane = 0; lane < bora::nf4::kWarp; ++lane) next[lane] = v[lane] + v[lane ^ delta];
        std::memcpy(v, next, sizeof v);
      }
      const float b = a.bias ? bora::nf4::to_float(static_cast<const T*>(a.bias)[row]) : 0.f;
      reduced[static_cast<size_t>(m) * a.n + row] = v[0];
      out[static_cast<size_t>(m) * a.n + row] = round_to(v[0] + b, static_cast<T*>(nullptr));
    }
  }
}

}  // namespace

int main(int argc, char** argv) {
  if (argc == 2 && std::string(argv[1]) == "code") {
    float code[16];
    bora::nf4::fill_code(code);
    for (float v : code) {
      unsigned bits;
      std::memcpy(&bits, &v, 4);
      std::printf("%08x\n", bits);
    }
    return 0;
  }
  if (argc != 9) {
    std::fprintf(stderr, "usage: %s code | DIR M N K LOG2_BLOCKSIZE BF16 DOUBLE_QUANT HAS_BIAS\n", argv[0]);
    return 2;
  }
  const std::string dir = argv[1];
  bora::NF4GemvArgs a{};
  a.m = std::atoi(argv[2]);
  a.n = std::atoi(argv[3]);
  a.k = std::atoi(argv[4]);
  a.log2_blocksize = std::atoi(argv[5]);
  a.bf16 = std::atoi(argv[6]) != 0;
  a.double_quant = std::atoi(argv[7]) != 0;
  const bool has_bias = std::atoi(argv[8]) != 0;
  if (!bora::nf4_gemv_args_valid(a)) {
    std::fprintf(stderr, "the kernel refuses these sizes\n");
    return 3;
  }
  auto x = read_file(dir + "/x.bin"), packed = read_file(dir + "/packed.bin"), absmax = read_file(dir + "/absmax.bin"),
       nested_absmax = read_file(dir + "/nested_absmax.bin"), nested_code = read_file(dir + "/nested_code.bin"),
       offset = read_file(dir + "/offset.bin"), bias = read_file(dir + "/bias.bin"), out = read_file(dir + "/out.bin");
  const size_t out_bytes = static_cast<size_t>(a.m) * a.n * 2;
  if (out.size() != out_bytes + 16) {
    std::fprintf(stderr, "out.bin must hold %zu bytes\n", out_bytes);
    return 2;
  }
  a.x = x.data();
  a.packed = packed.data();
  a.absmax = absmax.data();
  a.nested_absmax = reinterpret_cast<const float*>(nested_absmax.data());
  a.nested_code = reinterpret_cast<const float*>(nested_code.data());
  a.offset = reinterpret_cast<const float*>(offset.data());
  a.bias = has_bias ? bias.data() : nullptr;
  a.out = out.data();
  std::vector<float> reduced(static_cast<size_t>(a.m) * a.n);
  bora::nf4::with_variant(a, [&](auto dtype, auto rows, auto double_quant) {
    emulate<decltype(dtype), rows.value, double_quant.value>(a, reduced.data());
  });
  write_file(dir + "/out.bin", out.data(), out_bytes);
  write_file(dir + "/acc.bin", reduced.data(), reduced.size() * sizeof(float));
  return 0;
}
