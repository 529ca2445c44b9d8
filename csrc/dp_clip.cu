// FlashDP "compute once" for a Linear layer's weight: one cooperative kernel computes each sample's
// gradient tile once, reduces the sample's norm across the grid, and accumulates the clipped tile.
//
//   grad_w[o, i] += sum_b coef_b * sum_t g[b, t, o] * x[b, t, i]
//   coef_b = scale * min(1, max_norm / (scale * ||G_b^T X_b|| + 1e-6))
//
// Layout: g (B, T, d_out), x (B, T, d_in), grad_w (d_out, d_in), all fp32 contiguous. Each block owns one
// DP_TILE_O x DP_TILE_I output tile for the whole launch (its running clipped sum stays in registers);
// for sample b it computes the tile of G_b^T X_b, writes the tile's sum of squares to a partial buffer,
// grid.sync()s, and every block reads all partials to get ||G_b^T X_b||. Partials are double-buffered by
// b & 1, so one grid.sync() per sample suffices. Requires every block co-resident (cooperative launch);
// the launcher checks occupancy and returns an error otherwise (callers fall back to the two-pass path).
// Precision: fp32 FMA products and sums (IEEE fp32; no tensor cores, no TF32).
// Compiled at run time (torch.utils.cpp_extension.load_inline, with csrc/dp_clip_binding.cpp) by
// memtrain.kernels.dp_clip_once.prepare().

#include <cooperative_groups.h>
#include <cuda_runtime.h>

namespace cg = cooperative_groups;

#define DP_TILE_O 32
#define DP_TILE_I 32
#define DP_TILE_T 16
#define DP_THREADS 256  // each thread owns 4 outputs of the 32x32 tile

__global__ void dp_clip_once_kernel(const float* __restrict__ g, const float* __restrict__ x,
                                    float* __restrict__ grad_w, float* __restrict__ partial,
                                    float* __restrict__ sq_out, int B, int T, int d_out, int d_in,
                                    float max_norm, float scale) {
  cg::grid_group grid = cg::this_grid();
  __shared__ float sg[DP_TILE_T][DP_TILE_O];
  __shared__ float sx[DP_TILE_T][DP_TILE_I];
  __shared__ float sred[DP_THREADS / 32];

  const int n_tiles_i = (d_in + DP_TILE_I - 1) / DP_TILE_I;
  const int o0 = (blockIdx.x / n_tiles_i) * DP_TILE_O;
  const int i0 = (blockIdx.x % n_tiles_i) * DP_TILE_I;
  const int tid = threadIdx.x;
  const int ti = tid % DP_TILE_I;        // column inside the tile
  const int to = (tid / DP_TILE_I) * 4;  // first of 4 rows inside the tile
  const int nblocks = gridDim.x;

  float total[4] = {0.f, 0.f, 0.f, 0.f};
  for (int b = 0; b < B; ++b) {
    float acc[4] = {0.f, 0.f, 0.f, 0.f};
    const float* gb = g + (size_t)b * T * d_out;
    const float* xb = x + (size_t)b * T * d_in;
    for (int t0 = 0; t0 < T; t0 += DP_TILE_T) {
      for (int k = tid; k < DP_TILE_T * DP_TILE_O; k += DP_THREADS) {
        int tt = k / DP_TILE_O, oo = k % DP_TILE_O;
        int t = t0 + tt, o = o0 + oo;
        sg[tt][oo] = (t < T && o < d_out) ? gb[(size_t)t * d_out + o] : 0.f;
      }
      for (int k = tid; k < DP_TILE_T * DP_TILE_I; k += DP_THREADS) {
        int tt = k / DP_TILE_I, ii = k % DP_TILE_I;
        int t = t0 + tt, i = i0 + ii;
        sx[tt][ii] = (t < T && i < d_in) ? xb[(size_t)t * d_in + i] : 0.f;
      }
      __syncthreads();
#pragma unroll
      for (int tt = 0; tt < DP_TILE_T; ++tt) {
        float xv = sx[tt][ti];
#pragma unroll
        for (int r = 0; r < 4; ++r) acc[r] += sg[tt][to + r] * xv;
      }
      __syncthreads();
    }
    // Sum of squares of this block's tile (padding rows/cols are zero, so they add nothing).
    float s = 0.f;
#pragma unroll
    for (int r = 0; r < 4; ++r) s += acc[r] * acc[r];
    for (int off = 16; off > 0; off >>= 1) s += __shfl_down_sync(0xffffffffu, s, off);
    if ((tid & 31) == 0) sred[tid >> 5] = s;
    __syncthreads();
    if (tid == 0) {
      float bs = 0.f;
      for (int w = 0; w < DP_THREADS / 32; ++w) bs += sred[w];
      partial[(b & 1) * nblocks + blockIdx.x] = bs;
    }
    grid.sync();
    // Every block reduces all partials of sample b (nblocks is small: the tiles fit co-resident).
    float sq = 0.f;
    for (int k = tid; k < nblocks; k += DP_THREADS) sq += partial[(b & 1) * nblocks + k];
    for (int off = 16; off > 0; off >>= 1) sq += __shfl_down_sync(0xffffffffu, sq, off);
    __syncthreads();
    if ((tid & 31) == 0) sred[tid >> 5] = sq;
    __syncthreads();
    float sq_all = 0.f;
    for (int w = 0; w < DP_THREADS / 32; ++w) sq_all += sred[w];
    __syncthreads();
    if (blockIdx.x == 0 && tid == 0) sq_out[b] = sq_all;
    float norm = sqrtf(sq_all) * scale;
    float coef = scale * fminf(1.f, max_norm / (norm + 1e-6f));
#pragma unroll
    for (int r = 0; r < 4; ++r) total[r] += coef * acc[r];
  }
#pragma unroll
  for (int r = 0; r < 4; ++r) {
    int o = o0 + to + r, i = i0 + ti;
    if (o < d_out && i < d_in) grad_w[(size_t)o * d_in + i] += total[r];
  }
}

// Floats of the partial-sum buffer the launcher needs (two per output tile: double-buffered by sample).
extern "C" int dp_clip_once_partial_floats(int d_out, int d_in) {
  return 2 * ((d_out + DP_TILE_O - 1) / DP_TILE_O) * ((d_in + DP_TILE_I - 1) / DP_TILE_I);
}

// Whether the current device can launch the kernel cooperatively with every tile co-resident: 0 if so,
// kNoCooperativeLaunch / kTooManyTiles, or a cudaError_t value. Clears the error it may leave behind.
enum { kNoCooperativeLaunch = -2, kTooManyTiles = -1 };

static int clear_and_return(cudaError_t err) {
  // A refused launch or query leaves its error as the thread's last error; torch's next launch check
  // (C10_CUDA_KERNEL_LAUNCH_CHECK) would then report it against an unrelated kernel. Consume it here.
  cudaGetLastError();
  return static_cast<int>(err);
}

extern "C" int dp_clip_once_check(int d_out, int d_in) {
  int dev = 0, coop = 0, sms = 0, per_sm = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err != cudaSuccess) return clear_and_return(err);
  err = cudaDeviceGetAttribute(&coop, cudaDevAttrCooperativeLaunch, dev);
  if (err != cudaSuccess) return clear_and_return(err);
  err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
  if (err != cudaSuccess) return clear_and_return(err);
  err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, dp_clip_once_kernel, DP_THREADS, 0);
  if (err != cudaSuccess) return clear_and_return(err);
  if (!coop) return kNoCooperativeLaunch;
  if (dp_clip_once_partial_floats(d_out, d_in) / 2 > per_sm * sms) return kTooManyTiles;
  return 0;
}

// Host launcher: 0 on success, else the code of dp_clip_once_check or a cudaError_t value, with the
// thread's last CUDA error cleared. `partial` holds dp_clip_once_partial_floats(d_out, d_in) floats.
// `check` = 0 skips the occupancy check, so that tests can make the driver itself refuse the launch.
extern "C" int dp_clip_once_launch(const float* g, const float* x, float* grad_w, float* partial, float* sq_out,
                                   int B, int T, int d_out, int d_in, float max_norm, float scale,
                                   void* stream_ptr, int check) {
  if (B == 0) return 0;
  const int rc = check ? dp_clip_once_check(d_out, d_in) : 0;
  if (rc != 0) return rc;
  cudaStream_t stream = static_cast<cudaStream_t>(stream_ptr);
  const int tiles = dp_clip_once_partial_floats(d_out, d_in) / 2;
  void* args[] = {(void*)&g, (void*)&x, (void*)&grad_w, (void*)&partial, (void*)&sq_out, (void*)&B, (void*)&T,
                  (void*)&d_out, (void*)&d_in, (void*)&max_norm, (void*)&scale};
  const cudaError_t err =
      cudaLaunchCooperativeKernel((void*)dp_clip_once_kernel, dim3(tiles), dim3(DP_THREADS), args, 0, stream);
  return err == cudaSuccess ? 0 : clear_and_return(err);
}
