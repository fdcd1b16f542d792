/*
 * atsSamplerKernel.h: launch geometry and validation shared by the kernel (.cu) and the TensorRT plugin.
 *
 * Host-only helpers, no TensorRT and no device code: the plugin uses them to size its workspace and to
 * reject bad shapes at build time with the same rules the C API applies at enqueue time.
 */
#ifndef ATS_SAMPLER_KERNEL_H
#define ATS_SAMPLER_KERNEL_H

#include "atsSampler.h"

#include <cstddef>
#include <cstdint>

namespace ats
{
namespace kernel
{

//! Threads per block of the selector (one block per image) and of the dynamic-mode repack kernel.
constexpr int kSelectThreads = 256;
constexpr int kRepackThreads = 256;
//! Upper bound on repack blocks: each reduces count_out over the whole batch, so keep the grid small.
constexpr int kMaxRepackBlocks = 128;
//! Workspace alignment (TensorRT hands out 256-byte aligned workspaces; keep sub-buffers aligned too).
constexpr size_t kWorkspaceAlignment = 256;

//! Smallest power of two >= v (v >= 1).
inline int nextPow2(int v)
{
    int p = 1;
    while (p < v)
    {
        p <<= 1;
    }
    return p;
}

//! Padded sort length for a stage with n slots: the n - 1 patch slots rounded up to a power of two.
inline int sortLength(int n)
{
    return nextPow2(n > 1 ? n - 1 : 1);
}

//! Dynamic shared memory of the selector: 64-bit sort keys, float32 CDF and int32 pick flags per padded slot.
inline size_t selectSharedBytes(int n)
{
    return static_cast<size_t>(sortLength(n)) * (sizeof(uint64_t) + sizeof(float) + sizeof(int32_t));
}

//! Grid size M = max(min(k_max, n_ref) - 1, 1), as in reference.grid_size.
inline int gridSize(int k_max, int n_ref)
{
    int const k = k_max < n_ref ? k_max : n_ref;
    return k - 1 > 1 ? k - 1 : 1;
}

//! Argument checks of the C API, as a status code (ATS_STATUS_SUCCESS when valid).
inline int validateShape(int B, int n, int k_max, int n_ref)
{
    if (B < 0)
    {
        return ATS_STATUS_INVALID_BATCH;
    }
    if (n < 1)
    {
        return ATS_STATUS_INVALID_N;
    }
    if (n > ATS_SAMPLER_MAX_N)
    {
        return ATS_STATUS_N_TOO_LARGE;
    }
    if (k_max < 2)
    {
        return ATS_STATUS_INVALID_K_MAX;
    }
    if (n_ref < 1 || n_ref > ATS_SAMPLER_MAX_GRID)
    {
        return ATS_STATUS_INVALID_N_REF;
    }
    return ATS_STATUS_SUCCESS;
}

} // namespace kernel
} // namespace ats

#endif // ATS_SAMPLER_KERNEL_H
