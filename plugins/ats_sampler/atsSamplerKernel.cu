/*
 * atsSamplerKernel.cu: the ATS selector (docs/ATS_RULE.md section 2, steps 2-6) as one CUDA block per image.
 *
 * Every float32 operation mirrors ats_deploy/model/reference.py (dtype=np.float32) so the result is bit
 * for bit the reference's:
 *   - stable ascending sort of the valid patch scores, ties by slot: a bitonic sort of unique 64-bit keys
 *     (order-preserving float bits << 32 | slot id); -0.0 is keyed as +0.0 so it ties with +0.0 like NumPy;
 *   - all-zero (or NaN-containing) scores become all ones, like `if not r.max() > 0`;
 *   - F = cumsum of the sorted raw scores, sequential in float32 (one thread: the order of the additions is
 *     the contract, so it cannot be a parallel scan);
 *   - F~ = (F - F0) / (Flast - F0), c0 = min positive F~, step = (1 - c0) / (M - 1), y_j = c0 + j * step,
 *     with explicit round-to-nearest intrinsics so no fused multiply-add or fast division can creep in;
 *   - each grid point picks the first argmin of fabsf(y - F~) by binary search (F~ is non-decreasing for
 *     non-negative scores, so the distances fall then rise; see nearestFirst);
 *   - the kept set is the union of picks (flags), compacted in ascending-score order by a block scan.
 * No atomics on global memory, no host synchronisation, deterministic.
 */
#include "atsSamplerKernel.h"

#include <cuda_runtime.h>

namespace ats
{
namespace kernel
{
namespace
{

constexpr uint64_t kPadKey = ~0ULL;
constexpr uint32_t kNoPositive = 0xFFFFFFFFU;
constexpr unsigned kFullMask = 0xFFFFFFFFU;

//! Order-preserving map of a non-NaN float to uint32 (-0.0 and +0.0 map to the same key).
__device__ __forceinline__ uint32_t floatToOrdered(float v)
{
    uint32_t const u = __float_as_uint(v == 0.0F ? 0.0F : v);
    return (u & 0x80000000U) ? ~u : (u | 0x80000000U);
}

__device__ __forceinline__ float orderedToFloat(uint32_t k)
{
    return __uint_as_float((k & 0x80000000U) ? (k & 0x7FFFFFFFU) : ~k);
}

struct MaxOp
{
    template <typename T>
    __device__ __forceinline__ T operator()(T a, T b) const
    {
        return a > b ? a : b;
    }
};

struct MinOp
{
    template <typename T>
    __device__ __forceinline__ T operator()(T a, T b) const
    {
        return a < b ? a : b;
    }
};

//! Block-wide reduction; every thread gets the result. blockDim.x must be a multiple of 32 (<= 1024).
//! Contains __syncthreads(): call it from all threads of the block.
template <typename T, typename Op>
__device__ T blockReduce(T v, Op op, T* scratch)
{
    int const lane = threadIdx.x & 31;
    int const warp = threadIdx.x >> 5;
    int const nWarps = blockDim.x >> 5;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1)
    {
        v = op(v, __shfl_xor_sync(kFullMask, v, o));
    }
    if (lane == 0)
    {
        scratch[warp] = v;
    }
    __syncthreads();
    T r = scratch[0];
    for (int w = 1; w < nWarps; ++w)
    {
        r = op(r, scratch[w]);
    }
    __syncthreads(); // scratch may be reused right after
    return r;
}

//! Block-wide exclusive prefix sum of int32 values; `total` receives the sum over the block.
template <typename T>
__device__ T blockExclusiveScan(T v, T* scratch, T& total)
{
    int const lane = threadIdx.x & 31;
    int const warp = threadIdx.x >> 5;
    int const nWarps = blockDim.x >> 5;
    T x = v;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1)
    {
        T const y = __shfl_up_sync(kFullMask, x, o);
        if (lane >= o)
        {
            x += y;
        }
    }
    if (lane == 31)
    {
        scratch[warp] = x;
    }
    __syncthreads();
    T offset = 0;
    T sum = 0;
    for (int w = 0; w < nWarps; ++w)
    {
        T const s = scratch[w];
        offset += (w < warp) ? s : T(0);
        sum += s;
    }
    __syncthreads();
    total = sum;
    return offset + x - v;
}

//! Distance exactly as the reference computes it: np.abs(y - ft) in float32.
__device__ __forceinline__ float distance(float y, float t)
{
    return fabsf(__fsub_rn(y, t));
}

//! First index of the minimum of distance(y, cdf[i]) over i in [0, m), m >= 1.
//!
//! cdf is non-decreasing, so with p = the first index where cdf[p] >= y the distances are non-increasing on
//! [0, p) (y - cdf[i], rounded monotonically) and non-decreasing on [p, m). The right part's first minimum is
//! p; the left part's minimum is d(p-1), first reached at the first i whose distance is <= d(p-1), which a
//! second binary search finds (rounding can make distinct cdf values equidistant, so this is not p - 1 in
//! general). On a tie between the parts the left one comes first, i.e. the lower F~, as np.argmin does.
//! Always returns an index in [0, m), whatever the data.
__device__ int nearestFirst(float const* cdf, int m, float y)
{
    int lo = 0;
    int hi = m;
    while (lo < hi)
    {
        int const mid = (lo + hi) >> 1;
        if (cdf[mid] < y)
        {
            lo = mid + 1;
        }
        else
        {
            hi = mid;
        }
    }
    int const p = lo;
    if (p == 0)
    {
        return 0;
    }
    float best;
    if (p < m)
    {
        float const dl = distance(y, cdf[p - 1]);
        float const dr = distance(y, cdf[p]);
        if (!(dl <= dr))
        {
            return p;
        }
        best = dl;
    }
    else
    {
        best = distance(y, cdf[m - 1]);
    }
    lo = 0;
    hi = p - 1; // distance(y, cdf[p - 1]) == best, so the answer lies in [0, p - 1]
    while (lo < hi)
    {
        int const mid = (lo + hi) >> 1;
        if (distance(y, cdf[mid]) <= best)
        {
            hi = mid;
        }
        else
        {
            lo = mid + 1;
        }
    }
    return lo;
}

__device__ __forceinline__ int nextPow2Device(int v)
{
    return v <= 1 ? 1 : 1 << (32 - __clz(v - 1));
}

//! One block per image. Dynamic shared memory: sortLen * (8 + 4 + 4) bytes (see selectSharedBytes).
__global__ void __launch_bounds__(kSelectThreads) atsSelectKernel(float const* __restrict__ scores,
    int32_t const* __restrict__ countIn, int32_t* __restrict__ indices, int32_t* __restrict__ countOut, int n,
    int kOut, int gridM, int sortLen)
{
    extern __shared__ __align__(16) unsigned char smem[];
    uint64_t* keys = reinterpret_cast<uint64_t*>(smem);
    float* cdf = reinterpret_cast<float*>(keys + sortLen);
    int32_t* flags = reinterpret_cast<int32_t*>(cdf + sortLen);
    __shared__ uint32_t reduceScratch[32];
    __shared__ int32_t scanScratch[32];

    int const b = blockIdx.x;
    int const tid = threadIdx.x;
    int const nt = blockDim.x;
    float const* row = scores + static_cast<size_t>(b) * n;
    int32_t* out = indices + static_cast<size_t>(b) * kOut;

    int const c = countIn[b];
    int const nValid = c < 1 ? 1 : (c > n ? n : c);
    int const m = nValid - 1; // valid patches

    if (m <= 1)
    {
        // No valid patch: CLS only. One valid patch: keep it (docs/ATS_RULE.md 2.8). kOut >= 2 whenever m == 1.
        for (int t = tid; t < kOut; t += nt)
        {
            out[t] = (t == 1 && m == 1) ? 1 : 0;
        }
        if (tid == 0)
        {
            countOut[b] = 1 + m;
        }
        return;
    }

    // 1. `if not r.max() > 0: r = ones` (NaN anywhere makes NumPy's max NaN, which also gives ones).
    uint32_t anyNan = 0;
    uint32_t maxKey = 0;
    for (int i = tid; i < m; i += nt)
    {
        float const v = row[1 + i];
        anyNan |= isnan(v) ? 1U : 0U;
        uint32_t const k = floatToOrdered(v);
        maxKey = k > maxKey ? k : maxKey;
    }
    anyNan = blockReduce(anyNan, MaxOp{}, reduceScratch);
    maxKey = blockReduce(maxKey, MaxOp{}, reduceScratch);
    bool const allOnes = anyNan != 0 || !(orderedToFloat(maxKey) > 0.0F);

    // 2. Stable ascending sort: unique keys (value, slot), bitonic over the next power of two >= m.
    int const len = nextPow2Device(m);
    for (int i = tid; i < len; i += nt)
    {
        uint64_t k = kPadKey;
        if (i < m)
        {
            float const v = allOnes ? 1.0F : row[1 + i];
            k = (static_cast<uint64_t>(floatToOrdered(v)) << 32) | static_cast<uint32_t>(i + 1);
        }
        keys[i] = k;
    }
    __syncthreads();
    for (int k = 2; k <= len; k <<= 1)
    {
        for (int j = k >> 1; j > 0; j >>= 1)
        {
            for (int t = tid; t < (len >> 1); t += nt)
            {
                int const i = 2 * t - (t & (j - 1)); // t with a 0 bit inserted at j's position
                int const l = i + j;
                uint64_t const a = keys[i];
                uint64_t const bKey = keys[l];
                bool const ascending = (i & k) == 0;
                if ((a > bKey) == ascending)
                {
                    keys[i] = bKey;
                    keys[l] = a;
                }
            }
            __syncthreads();
        }
    }

    // 3. F = cumsum(sorted raw scores), sequential float32 additions in sorted order (np.cumsum).
    if (tid == 0)
    {
        float f = orderedToFloat(static_cast<uint32_t>(keys[0] >> 32));
        cdf[0] = f;
        for (int i = 1; i < m; ++i)
        {
            f = __fadd_rn(f, orderedToFloat(static_cast<uint32_t>(keys[i] >> 32)));
            cdf[i] = f;
        }
    }
    __syncthreads();

    // 4. F~ = (F - F0) / (Flast - F0); c0 = min positive F~ (positive float bits order like uint32).
    float const f0 = cdf[0];
    float const den = __fsub_rn(cdf[m - 1], f0);
    __syncthreads(); // every thread holds f0 and den before cdf is overwritten
    uint32_t minPos = kNoPositive;
    for (int i = tid; i < m; i += nt)
    {
        float const t = __fdiv_rn(__fsub_rn(cdf[i], f0), den);
        cdf[i] = t;
        if (t > 0.0F)
        {
            uint32_t const bits = __float_as_uint(t);
            minPos = bits < minPos ? bits : minPos;
        }
        flags[i] = 0;
    }
    minPos = blockReduce(minPos, MinOp{}, reduceScratch); // also publishes cdf and flags
    // No positive F~ only happens for out-of-contract (negative or non-finite) scores; stay in bounds.
    float const c0 = minPos != kNoPositive ? __uint_as_float(minPos) : 1.0F;

    // 5. Grid y_j = c0 + j * step (no FMA) and first-nearest picks.
    float const step = gridM > 1 ? __fdiv_rn(__fsub_rn(1.0F, c0), static_cast<float>(gridM - 1)) : 0.0F;
    for (int j = tid; j < gridM; j += nt)
    {
        float const y = gridM == 1 ? c0 : __fadd_rn(c0, __fmul_rn(static_cast<float>(j), step));
        // Several grid points can pick the same token: an atomic store keeps the write race-free (racecheck).
        atomicExch(&flags[nearestFirst(cdf, m, y)], 1);
    }
    __syncthreads();

    // 6. Compaction in ascending-score order: each thread owns a contiguous run of sorted positions.
    int const chunk = (m + nt - 1) / nt;
    int const begin = min(tid * chunk, m);
    int const end = min(begin + chunk, m);
    int32_t local = 0;
    for (int i = begin; i < end; ++i)
    {
        local += flags[i];
    }
    int32_t total = 0;
    int32_t rank = blockExclusiveScan(local, scanScratch, total);
    int const cap = kOut - 1;
    for (int i = begin; i < end; ++i)
    {
        if (flags[i] != 0)
        {
            if (rank < cap)
            {
                out[1 + rank] = static_cast<int32_t>(keys[i] & 0xFFFFFFFFULL);
            }
            ++rank;
        }
    }
    int const kept = total < cap ? total : cap;
    for (int t = tid; t < kOut; t += nt)
    {
        if (t == 0 || t > kept)
        {
            out[t] = 0;
        }
    }
    if (tid == 0)
    {
        countOut[b] = 1 + kept;
    }
}

//! Dynamic mode, second launch: s = max(count_out) (each block reduces it itself, so no grid-wide sync),
//! then rows [b, 0:s] of the static layout are copied to indices with row stride s.
__global__ void __launch_bounds__(kRepackThreads) atsRepackKernel(int32_t const* __restrict__ staticRows,
    int32_t const* __restrict__ countOut, int32_t* __restrict__ indices, int64_t* __restrict__ sizeOut, int B,
    int kOut)
{
    __shared__ int32_t reduceScratch[32];
    int32_t mx = 0;
    for (int i = threadIdx.x; i < B; i += blockDim.x)
    {
        int32_t const v = countOut[i];
        mx = v > mx ? v : mx;
    }
    mx = blockReduce(mx, MaxOp{}, reduceScratch);
    int const s = mx < kOut ? mx : kOut;
    if (blockIdx.x == 0 && threadIdx.x == 0)
    {
        *sizeOut = static_cast<int64_t>(s);
    }
    for (int b = blockIdx.x; b < B; b += gridDim.x)
    {
        int32_t const* src = staticRows + static_cast<size_t>(b) * kOut;
        int32_t* dst = indices + static_cast<size_t>(b) * s;
        for (int j = threadIdx.x; j < s; j += blockDim.x)
        {
            dst[j] = src[j];
        }
    }
}

size_t alignUp(size_t v, size_t a)
{
    return (v + a - 1) / a * a;
}

int launchSelect(float const* scores, int32_t const* countIn, int32_t* rows, int32_t* countOut, int B, int n,
    int kMax, int nRef, cudaStream_t stream)
{
    int const kOut = kMax < n ? kMax : n;
    int const sortLen = sortLength(n);
    size_t const smemBytes = selectSharedBytes(n);
    atsSelectKernel<<<B, kSelectThreads, smemBytes, stream>>>(
        scores, countIn, rows, countOut, n, kOut, gridSize(kMax, nRef), sortLen);
    return static_cast<int>(cudaGetLastError());
}

} // namespace
} // namespace kernel
} // namespace ats

extern "C" {

ATS_SAMPLER_API int atsSamplerOutputSlots(int n, int k_max)
{
    if (n < 1 || k_max < 2)
    {
        return 0;
    }
    return k_max < n ? k_max : n;
}

ATS_SAMPLER_API size_t atsSamplerWorkspaceSize(int B, int n, int k_max)
{
    if (B < 0 || n < 1 || k_max < 2)
    {
        return 0;
    }
    size_t const kOut = static_cast<size_t>(atsSamplerOutputSlots(n, k_max));
    return ats::kernel::alignUp(static_cast<size_t>(B) * kOut * sizeof(int32_t), ats::kernel::kWorkspaceAlignment);
}

ATS_SAMPLER_API int atsSamplerLaunch(float const* scores, int32_t const* count_in, int32_t* indices,
    int32_t* count_out, int B, int n, int k_max, int n_ref, cudaStream_t stream)
{
    int const status = ats::kernel::validateShape(B, n, k_max, n_ref);
    if (status != ATS_STATUS_SUCCESS)
    {
        return status;
    }
    if (B == 0)
    {
        return ATS_STATUS_SUCCESS;
    }
    if (scores == nullptr || count_in == nullptr || indices == nullptr || count_out == nullptr)
    {
        return ATS_STATUS_NULL_POINTER;
    }
    return ats::kernel::launchSelect(scores, count_in, indices, count_out, B, n, k_max, n_ref, stream);
}

ATS_SAMPLER_API int atsSamplerLaunchDynamic(float const* scores, int32_t const* count_in, int32_t* indices,
    int32_t* count_out, int64_t* size_out, void* workspace, size_t workspace_size, int B, int n, int k_max,
    int n_ref, cudaStream_t stream)
{
    int const status = ats::kernel::validateShape(B, n, k_max, n_ref);
    if (status != ATS_STATUS_SUCCESS)
    {
        return status;
    }
    if (size_out == nullptr)
    {
        return ATS_STATUS_NULL_POINTER;
    }
    if (B == 0)
    {
        return static_cast<int>(cudaMemsetAsync(size_out, 0, sizeof(int64_t), stream));
    }
    if (scores == nullptr || count_in == nullptr || indices == nullptr || count_out == nullptr)
    {
        return ATS_STATUS_NULL_POINTER;
    }
    if (workspace == nullptr || workspace_size < atsSamplerWorkspaceSize(B, n, k_max))
    {
        return ATS_STATUS_WORKSPACE_TOO_SMALL;
    }
    int32_t* rows = static_cast<int32_t*>(workspace);
    int const launched = ats::kernel::launchSelect(scores, count_in, rows, count_out, B, n, k_max, n_ref, stream);
    if (launched != 0)
    {
        return launched;
    }
    int const kOut = k_max < n ? k_max : n;
    int const blocks = B < ats::kernel::kMaxRepackBlocks ? B : ats::kernel::kMaxRepackBlocks;
    ats::kernel::atsRepackKernel<<<blocks, ats::kernel::kRepackThreads, 0, stream>>>(
        rows, count_out, indices, size_out, B, kOut);
    return static_cast<int>(cudaGetLastError());
}

ATS_SAMPLER_API char const* atsSamplerStatusString(int status)
{
    switch (status)
    {
    case ATS_STATUS_SUCCESS: return "success";
    case ATS_STATUS_NULL_POINTER: return "a required device pointer is NULL";
    case ATS_STATUS_INVALID_BATCH: return "batch size B must be >= 0";
    case ATS_STATUS_INVALID_N: return "slot count n must be >= 1";
    case ATS_STATUS_N_TOO_LARGE: return "slot count n exceeds ATS_SAMPLER_MAX_N (2048)";
    case ATS_STATUS_INVALID_K_MAX: return "k_max must be >= 2 (CLS plus at least one token)";
    case ATS_STATUS_INVALID_N_REF: return "n_ref must be in [1, 2^24]";
    case ATS_STATUS_WORKSPACE_TOO_SMALL: return "workspace smaller than atsSamplerWorkspaceSize(B, n, k_max)";
    default: break;
    }
    if (status > 0)
    {
        return cudaGetErrorString(static_cast<cudaError_t>(status));
    }
    return "unknown status";
}

} // extern "C"
