// Runs the NF4 GEMV's per-lane and per-warp code (csrc/nf4_gemv/nf4_gemv_lane.cuh and
// nf4_gemv_mma.cuh) on the CPU, so that tests/test_csrc.py can check the kernels' indexing,
// decoding, fragment layout and reductions without a GPU. What it cannot check (the launch, shared
// memory, the shuffles and mma.sync themselves) the GPU tests do.
//
// CUDA cores: lane by lane, with the warp's shuffle reduction done in the same order.
// Tensor cores: each lane of a warp is a host thread running the kernel's warp code; its mma is a
// collective that gathers the 32 lanes' fragments by the PTX ISA's m16n8k16 layout (fp32 sum of
// the exact products), then the block's reduction runs thread by thread as the kernel's does.
//
//   nf4_gemv_emulate code
//       prints the kernel's 16 code values as fp32 bit patterns (hex), one per line
//   nf4_gemv_emulate DIR M N K LOG2_BLOCKSIZE BF16 DOUBLE_QUANT HAS_BIAS KERNEL
//       KERNEL is cores or mma; reads DIR/{x,packed,absmax,nested_absmax,nested_code,offset,bias,
//       out}.bin (raw, as the kernel takes them; out.bin is the poisoned output), writes DIR/out.bin
//       (the rows the kernel writes, rounded to x's dtype) and DIR/acc.bin (fp32 [M, N], the reduced
//       sums before the bias)
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "nf4_gemv/nf4_gemv_lane.cuh"
#include "nf4_gemv/nf4_gemv_mma.cuh"

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
      out[static_cast<size_t>(m) * a.n + row] = bora::nf4::from_float<T>(v[0] + b);
    }
  }
}

// --- tensor cores -------------------------------------------------------------------------------

constexpr int kLanes = bora::nf4::kWarp;

// A barrier for the 32 lane threads of one warp; a lane that waits 30 s means the lanes did not all
// reach the same mma (a non-uniform loop), which mma.sync forbids: report it and fail.
class LaneBarrier {
 public:
  void wait() {
    std::unique_lock<std::mutex> lock(mutex_);
    const unsigned generation = generation_;
    if (++arrived_ == kLanes) {
      arrived_ = 0;
      ++generation_;
      all_.notify_all();
      return;
    }
    if (!all_.wait_for(lock, std::chrono::seconds(30), [&] { return generation_ != generation; })) {
      std::fprintf(stderr, "lanes diverged: not all 32 reached an mma\n");
      std::exit(4);
    }
  }

 private:
  std::mutex mutex_;
  std::condition_variable all_;
  int arrived_ = 0;
  unsigned generation_ = 0;
};

template <typename T>
float half_of(uint32_t reg, int half) {
  const uint16_t bits = static_cast<uint16_t>(reg >> (16 * half));
  T v;
  std::memcpy(&v, &bits, 2);
  return bora::nf4::to_float(v);
}

// mma.m16n8k16.row.col with fp32 accumulation, from the 32 lanes' fragments (PTX ISA, "Matrix
// Fragments for mma.m16n8k16 with floating point type"): lane (g, t) = (lane / 4, lane % 4) holds
// A[g][2t + e] in register 0, A[g + 8][2t + e] in 1, A[g][2t + 8 + e] in 2, A[g + 8][2t + 8 + e]
// in 3, B[2t + e][g] in register 0 and B[2t + 8 + e][g] in 1 (e the half, low first), and
// D[g][2t + e] in d[e], D[g + 8][2t + e] in d[2 + e].
struct WarpExchange {
  LaneBarrier barrier;
  uint32_t a[kLanes][4];
  uint32_t b[kLanes][2];
};

struct EmulatedWarp {
  WarpExchange* exchange;
  int lane;

  template <typename T>
  void mma(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) const {
    std::memcpy(exchange->a[lane], a, sizeof a);
    std::memcpy(exchange->b[lane], b, sizeof b);
    exchange->barrier.wait();
    const int g = lane / 4, t = lane % 4;
    auto a_at = [&](int row, int col) {
      const int reg = (row >= 8 ? 1 : 0) + (col >= 8 ? 2 : 0);
      return half_of<T>(exchange->a[(row % 8) * 4 + (col % 8) / 2][reg], col % 2);
    };
    auto b_at = [&](int row, int col) { return half_of<T>(exchange->b[col * 4 + (row % 8) / 2][row >= 8], row % 2); };
    float out[4];
    for (int i = 0; i < 4; ++i) {
      const int row = g + (i >= 2 ? 8 : 0), col = 2 * t + (i & 1);
      float sum = d[i];
      for (int kk = 0; kk < 16; ++kk) sum += a_at(row, kk) * b_at(kk, col);  // products exact in fp32
      out[i] = sum;
    }
    exchange->barrier.wait();  // every lane has read the fragments before any lane writes the next
    std::memcpy(d, out, sizeof out);
  }
};

template <typename T, int kTiles, bool kDoubleQuant>
void emulate_mma(const bora::NF4GemvArgs& a, float* reduced) {
  namespace mma = bora::nf4::mma;
  float code[16];
  bora::nf4::fill_code(code);
  const float offset = kDoubleQuant ? *a.offset : 0.f;
  std::vector<float> partial(mma::kWarps * mma::kRows * kTiles * mma::kTokens);
  for (int row0 = 0; row0 < a.n; row0 += mma::kRows) {
    std::fill(partial.begin(), partial.end(), std::nanf(""));
    for (int warp = 0; warp < mma::kWarps; ++warp) {
      WarpExchange exchange;
      std::vector<std::thread> lanes;
      for (int lane = 0; lane < kLanes; ++lane) {
        lanes.emplace_back([&, lane] {
          float acc[kTiles][4];
          mma::warp_partials<T, kTiles, kDoubleQuant>(a, row0, warp, lane, code, offset, EmulatedWarp{&exchange, lane},
                                                      acc);
          mma::store_partials<kTiles>(warp, lane, acc, partial.data());
        });
      }
      for (auto& lane : lanes) lane.join();
    }
    for (int tid = 0; tid < mma::kWarps * kLanes; ++tid) {
      mma::write_output<T, kTiles>(a, row0, tid, partial.data());
      const int token = tid / mma::kRows, r = tid % mma::kRows;
      if (token < a.m && row0 + r < a.n) {
        reduced[static_cast<size_t>(token) * a.n + row0 + r] = mma::tile_sum<kTiles>(partial.data(), r, token);
      }
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
  if (argc != 10 || (std::string(argv[9]) != "cores" && std::string(argv[9]) != "mma")) {
    std::fprintf(stderr, "usage: %s code | DIR M N K LOG2_BLOCKSIZE BF16 DOUBLE_QUANT HAS_BIAS cores|mma\n", argv[0]);
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
  const bool tensor_cores = std::string(argv[9]) == "mma";
  a.kernel = tensor_cores ? bora::kTensorCores : bora::kCudaCores;
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
  if (tensor_cores) {
    bora::nf4::mma::with_variant(a, [&](auto dtype, auto tiles, auto double_quant) {
      emulate_mma<decltype(dtype), tiles.value, double_quant.value>(a, reduced.data());
    });
  } else {
    bora::nf4::with_variant(a, [&](auto dtype, auto rows, auto double_quant) {
      emulate<decltype(dtype), rows.value, double_quant.value>(a, reduced.data());
    });
  }
  write_file(dir + "/out.bin", out.data(), out_bytes);
  write_file(dir + "/acc.bin", reduced.data(), reduced.size() * sizeof(float));
  return 0;
}
