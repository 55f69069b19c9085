// Does a batch-1 dependency chain cost less in plain CUDA than in Pallas? (run 94 in benchmarks/NOTES.md)
//
// Runs 46, 61 and 64 measured a chain of dependent gemv links, x[p+1] = W[p] x[p] with W 2048 x 2048
// bf16 (8 MiB, so 32 links stream 256 MiB from HBM), in Pallas Triton and Mosaic GPU: a link cost
// ~1-1.5 us more than streaming its bytes whether the dependency was a kernel boundary, an in-kernel
// counter, or a ring of TMA copies ahead of the counter. The batch-1 decode step is ~11 such links
// per layer, so that cost decides whether a decode-layer megakernel could reach the issue's 60%.
// This is the same chain in CUDA, where we own the launch and the waits:
//   separate  one launch per link (plain stream order)
//   pdl       one launch per link with programmatic dependent launch: each link's CTAs start their
//             weight copies (cp.async into shared memory) before griddepcontrol.wait
//   wait0     one persistent launch; a link's CTAs wait on the previous link's counter, then copy
//   wait      one persistent launch; the next link's weights are copied while the counter is awaited
//   nowait    one persistent launch without counters (a race: the streaming floor, timing only)
// 128 CTAs of 256 threads, 16 rows each (64 KiB of W in shared memory, double-buffered in the persistent
// variants); x in float32.
// Every variant's final x must equal "separate"'s bit for bit (nowait excepted).
//
//   nvcc -O3 -arch=sm_90a -o cuda_chain benchmarks/cuda_chain.cu && ./cuda_chain

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#define CHECK(x)                                                                        \
  do {                                                                                  \
    cudaError_t e = (x);                                                                \
    if (e != cudaSuccess) {                                                             \
      std::fprintf(stderr, "%s:%d %s: %s\n", __FILE__, __LINE__, #x, cudaGetErrorString(e)); \
      std::exit(1);                                                                     \
    }                                                                                   \
  } while (0)

constexpr int L = 32;                    // links
constexpr int K = 2048;                  // x length (in = out)
constexpr int CTAS = 128;
constexpr int ROWS = K / CTAS;           // 16 output rows per CTA
constexpr int THREADS = 256;
constexpr int SLICE = ROWS * K;          // bf16 elements of W per CTA per link
constexpr int SLICE_BYTES = SLICE * 2;   // 64 KiB
constexpr int BUFS = 3;                            // persistent: W copies run two links ahead
constexpr size_t SMEM = BUFS * SLICE_BYTES + K * 4;
constexpr size_t SMEM_ONE = SLICE_BYTES + K * 4;   // a launch per link: one buffer, so 3 CTAs fit an SM and
                                                   // the next launch's CTAs can start beside this one's (PDL)

enum Mode { SEPARATE, PDL, WAIT0, WAIT, NOWAIT };

__device__ __forceinline__ void copy_slice(__nv_bfloat16* dst, const __nv_bfloat16* src) {
  // 64 KiB by 256 threads: 16 copies of 16 B each, L2-only (.cg)
  const char* s = reinterpret_cast<const char*>(src);
  for (int i = threadIdx.x; i < SLICE_BYTES / 16; i += THREADS) {
    unsigned d = static_cast<unsigned>(__cvta_generic_to_shared(reinterpret_cast<char*>(dst) + 16 * i));
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(d), "l"(s + 16 * i) : "memory");
  }
  asm volatile("cp.async.commit_group;\n" ::: "memory");
}

template <int N>
__device__ __forceinline__ void copies_done() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

__device__ __forceinline__ int load_acquire(const int* p) {
  int v;
  asm volatile("ld.acquire.gpu.global.b32 %0, [%1];\n" : "=r"(v) : "l"(p) : "memory");
  return v;
}

// One link for this CTA: x_out[rows] = W_slice (in shared memory) . x_in, x_in read from global once
// into shared memory, then each lane's 64 values into registers (reused by both of its warp's rows).
__device__ __forceinline__ void link(const __nv_bfloat16* w, const float* x_in, float* x_out, float* xs) {
  for (int i = threadIdx.x; i < K / 4; i += THREADS) {
    float4 v = __ldcg(reinterpret_cast<const float4*>(x_in) + i);   // from L2: another CTA wrote it
    reinterpret_cast<float4*>(xs)[i] = v;
  }
  __syncthreads();
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  float2 xr[K / 64];
#pragma unroll
  for (int t = 0; t < K / 64; ++t) xr[t] = reinterpret_cast<const float2*>(xs)[lane + 32 * t];
  for (int r = warp; r < ROWS; r += THREADS / 32) {
    const __nv_bfloat162* row = reinterpret_cast<const __nv_bfloat162*>(w + r * K);
    float acc = 0.f;
#pragma unroll
    for (int t = 0; t < K / 64; ++t) {
      float2 wf = __bfloat1622float2(row[lane + 32 * t]);
      acc += wf.x * xr[t].x + wf.y * xr[t].y;
    }
    for (int o = 16; o > 0; o /= 2) acc += __shfl_xor_sync(0xffffffffu, acc, o);
    if (lane == 0) x_out[blockIdx.x * ROWS + r] = acc;
  }
}

__device__ __forceinline__ void signal(int* flag) {
  __syncthreads();   // every warp's x_out stores before the release
  if (threadIdx.x == 0) {
    __threadfence();
    atomicAdd(flag, 1);
  }
}

__device__ __forceinline__ bool await(const int* flag, int* bail) {
  __shared__ int ok;
  if (threadIdx.x == 0) {
    long spins = 0;
    while (load_acquire(flag) < CTAS && ++spins < (1L << 26)) {
    }
    ok = spins < (1L << 26);
    if (!ok) atomicAdd(bail, 1);
  }
  __syncthreads();
  return ok;
}

// One link per launch (SEPARATE, PDL).
template <bool kPdl>
__global__ void __launch_bounds__(THREADS) one_link(const __nv_bfloat16* w_all, const float* x_in, float* x_out, int p) {
  extern __shared__ __align__(16) unsigned char smem[];
  auto* wbuf = reinterpret_cast<__nv_bfloat16*>(smem);
  auto* xs = reinterpret_cast<float*>(smem + SLICE_BYTES);
  if (kPdl) asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
  copy_slice(wbuf, w_all + (size_t)p * K * K + (size_t)blockIdx.x * SLICE);   // weights do not depend on x
  if (kPdl) asm volatile("griddepcontrol.wait;\n" ::: "memory");
  copies_done<0>();
  __syncthreads();
  link(wbuf, x_in, x_out, xs);
}

// Every link in one launch (WAIT0, WAIT, NOWAIT); flags[p] counts the CTAs that wrote x[p]. WAIT and
// NOWAIT keep the weights of the next two links in flight while a link waits and works.
template <Mode kMode>
__global__ void __launch_bounds__(THREADS) chain(const __nv_bfloat16* w_all, float* xs_all, int* flags, int* bail) {
  extern __shared__ __align__(16) unsigned char smem[];
  auto* wbuf = reinterpret_cast<__nv_bfloat16*>(smem);
  auto* xs = reinterpret_cast<float*>(smem + BUFS * SLICE_BYTES);
  const size_t mine = (size_t)blockIdx.x * SLICE;
  auto slice = [&](int p) { return w_all + (size_t)p * K * K + mine; };
  if (kMode != WAIT0) {
    copy_slice(wbuf, slice(0));
    copy_slice(wbuf + SLICE, slice(1));
  }
  for (int p = 0; p < L; ++p) {
    __nv_bfloat16* cur = wbuf + (p % BUFS) * SLICE;
    if (kMode == WAIT0) {
      if (p > 0 && !await(&flags[p], bail)) return;
      copy_slice(cur, slice(p));
      copies_done<0>();
    } else {
      if (p + 2 < L) copy_slice(wbuf + ((p + 2) % BUFS) * SLICE, slice(p + 2));
      if (kMode == WAIT && p > 0 && !await(&flags[p], bail)) return;
      if (p + 2 < L) copies_done<2>();
      else if (p + 1 < L) copies_done<1>();
      else copies_done<0>();
    }
    __syncthreads();
    link(cur, xs_all + (size_t)p * K, xs_all + (size_t)(p + 1) * K, xs);
    signal(&flags[p + 1]);
    __syncthreads();   // this buffer is refilled two iterations on
  }
}

__global__ void fill(__nv_bfloat16* w, size_t n, float scale) {
  for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
    unsigned h = (unsigned)(i * 2654435761u) ^ (unsigned)(i >> 32) * 40503u;
    h ^= h >> 15; h *= 2246822519u; h ^= h >> 13;
    w[i] = __float2bfloat16(scale * ((h & 0xffff) / 32768.f - 1.f));
  }
}

__global__ void read_all(const float4* a, size_t n, float* sink) {
  float acc = 0.f;
  for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
    float4 v = __ldcs(a + i);
    acc += v.x + v.y + v.z + v.w;
  }
  if (acc == 12345.f) *sink = acc;
}

int main() {
  int dev = 0, sms = 0;
  cudaDeviceProp prop;
  CHECK(cudaGetDeviceProperties(&prop, dev));
  CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
  std::printf("device %s, %d SMs; chain of %d links, W %dx%d bf16 (%.1f MiB a link), %d CTAs x %d threads\n",
              prop.name, sms, L, K, K, K * K * 2 / 1048576.0, CTAS, THREADS);
  if (sms < CTAS) { std::printf("needs %d SMs for the persistent variants\n", CTAS); return 1; }

  __nv_bfloat16* w;
  float *xs, *sink;
  int *flags, *bail;
  const size_t nw = (size_t)L * K * K;
  CHECK(cudaMalloc(&w, nw * 2));
  CHECK(cudaMalloc(&xs, (size_t)(L + 1) * K * 4));
  CHECK(cudaMalloc(&flags, (L + 1) * 4));
  CHECK(cudaMalloc(&bail, 4));
  CHECK(cudaMalloc(&sink, 4));
  fill<<<1024, 256>>>(w, nw, std::sqrt(3.f / K));   // uniform +-sqrt(3/K): |x| kept ~ constant
  std::vector<float> x0(K);
  for (int i = 0; i < K; ++i) x0[i] = std::sin(0.37f * i);
  CHECK(cudaMemcpy(xs, x0.data(), K * 4, cudaMemcpyHostToDevice));
  CHECK(cudaFuncSetAttribute(one_link<false>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)SMEM_ONE));
  CHECK(cudaFuncSetAttribute(one_link<true>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)SMEM_ONE));
  CHECK(cudaFuncSetAttribute(chain<WAIT0>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)SMEM));
  CHECK(cudaFuncSetAttribute(chain<WAIT>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)SMEM));
  CHECK(cudaFuncSetAttribute(chain<NOWAIT>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)SMEM));

  cudaEvent_t t0, t1;
  CHECK(cudaEventCreate(&t0));
  CHECK(cudaEventCreate(&t1));

  // The copy ceiling of this run: one streaming read of all 256 MiB of W.
  float best_read = 1e30f;
  for (int r = 0; r < 5; ++r) {
    CHECK(cudaEventRecord(t0));
    read_all<<<sms * 8, 256>>>(reinterpret_cast<const float4*>(w), nw * 2 / 16, sink);
    CHECK(cudaEventRecord(t1));
    CHECK(cudaEventSynchronize(t1));
    float ms;
    CHECK(cudaEventElapsedTime(&ms, t0, t1));
    best_read = std::min(best_read, ms);
  }
  const double bw = nw * 2 / (best_read * 1e-3);
  const double floor_us = K * (double)K * 2 / bw * 1e6;
  std::printf("read ceiling %.3f TB/s: one link's 8 MiB in %.2f us\n", bw / 1e12, floor_us);

  const char* names[] = {"separate", "pdl", "wait0", "wait", "nowait"};
  std::vector<float> ref(K), got(K);
  for (int mode = SEPARATE; mode <= NOWAIT; ++mode) {
    float best = 1e30f;
    for (int r = 0; r < 7; ++r) {
      CHECK(cudaMemset(flags, 0, (L + 1) * 4));
      CHECK(cudaMemset(bail, 0, 4));
      CHECK(cudaMemset(xs + K, 0, (size_t)L * K * 4));
      CHECK(cudaDeviceSynchronize());
      CHECK(cudaEventRecord(t0));
      if (mode == SEPARATE) {
        for (int p = 0; p < L; ++p)
          one_link<false><<<CTAS, THREADS, SMEM_ONE>>>(w, xs + (size_t)p * K, xs + (size_t)(p + 1) * K, p);
      } else if (mode == PDL) {
        cudaLaunchAttribute attr;
        attr.id = cudaLaunchAttributeProgrammaticStreamSerialization;
        attr.val.programmaticStreamSerializationAllowed = 1;
        cudaLaunchConfig_t cfg = {};
        cfg.gridDim = CTAS;
        cfg.blockDim = THREADS;
        cfg.dynamicSmemBytes = SMEM_ONE;
        cfg.attrs = &attr;
        cfg.numAttrs = 1;
        for (int p = 0; p < L; ++p)
          CHECK(cudaLaunchKernelEx(&cfg, one_link<true>, (const __nv_bfloat16*)w, (const float*)(xs + (size_t)p * K),
                                   xs + (size_t)(p + 1) * K, p));
      } else if (mode == WAIT0) {
        chain<WAIT0><<<CTAS, THREADS, SMEM>>>(w, xs, flags, bail);
      } else if (mode == WAIT) {
        chain<WAIT><<<CTAS, THREADS, SMEM>>>(w, xs, flags, bail);
      } else {
        chain<NOWAIT><<<CTAS, THREADS, SMEM>>>(w, xs, flags, bail);
      }
      CHECK(cudaEventRecord(t1));
      CHECK(cudaEventSynchronize(t1));
      CHECK(cudaGetLastError());
      float ms;
      CHECK(cudaEventElapsedTime(&ms, t0, t1));
      best = std::min(best, ms);
    }
    int bailed = 0;
    CHECK(cudaMemcpy(&bailed, bail, 4, cudaMemcpyDeviceToHost));
    CHECK(cudaMemcpy(got.data(), xs + (size_t)L * K, K * 4, cudaMemcpyDeviceToHost));
    if (mode == SEPARATE) ref = got;
    double diff = 0, norm = 0;
    for (int i = 0; i < K; ++i) {
      diff = std::max(diff, (double)std::fabs(got[i] - ref[i]));
      norm += (double)ref[i] * ref[i];
    }
    const double per_link = best * 1e3 / L;
    std::printf("%-9s %6.2f us a link (%5.1f%% of the read ceiling)  final x max |diff| vs separate %.3g"
                " (|x| %.3g)%s\n",
                names[mode], per_link, 100.0 * floor_us / per_link, diff, std::sqrt(norm),
                bailed ? "  SPIN GAVE UP" : "");
  }
  return 0;
}
