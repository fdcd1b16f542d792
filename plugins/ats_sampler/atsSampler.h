/*
 * atsSampler.h: C API of the Adaptive Token Sampling selector kernel (docs/ATS_RULE.md sections 2 and 4).
 *
 * This header has no TensorRT dependency: the kernel-only library (libats_sampler_kernel.so, built with
 * -DATS_KERNEL_ONLY=ON) exports exactly these functions, so tests can drive the kernel through ctypes and
 * the TensorRT plugin calls the same entry points from enqueue().
 *
 * Contract (per image b, all pointers are device pointers, row-major, contiguous):
 *   scores    [B, n]      float32, slot 0 (CLS) ignored; valid patch scores must be finite and >= 0
 *   count_in  [B]         int32, valid slots including CLS (valid slots first); clamped to [1, n]
 *   indices   [B, K_out]  int32, K_out = min(k_max, n): 0 (CLS), kept slot ids in ascending-score order, 0 padding
 *   count_out [B]         int32, 1 + K' (number of valid entries of the indices row)
 * The float32 arithmetic follows ats_deploy/model/reference.py exactly, so results equal
 * select_reference(..., dtype=np.float32) bit for bit.
 *
 * Status: every function returns 0 (ATS_STATUS_SUCCESS) on success, a negative ATS_STATUS_* value when an
 * argument is rejected (nothing was launched), or a positive cudaError_t value when a launch failed.
 */
#ifndef ATS_SAMPLER_H
#define ATS_SAMPLER_H

#include <cuda_runtime_api.h>
#include <stddef.h>
#include <stdint.h>

#if defined(_WIN32)
#define ATS_SAMPLER_API __declspec(dllexport)
#else
#define ATS_SAMPLER_API __attribute__((visibility("default")))
#endif

#ifdef __cplusplus
extern "C" {
#endif

/* Largest supported slot count n (CLS included). One block sorts all n-1 patch scores in shared memory
 * (16 bytes per padded slot: 32 KiB at the maximum), which stays under the 48 KiB default of every GPU. */
#define ATS_SAMPLER_MAX_N 2048
/* Largest accepted grid size min(k_max, n_ref) - 1: grid indices must be exact in float32. */
#define ATS_SAMPLER_MAX_GRID (1 << 24)

enum AtsSamplerStatus
{
    ATS_STATUS_SUCCESS = 0,
    ATS_STATUS_NULL_POINTER = -1,   /* a required pointer is NULL while B > 0 */
    ATS_STATUS_INVALID_BATCH = -2,  /* B < 0 */
    ATS_STATUS_INVALID_N = -3,      /* n < 1 */
    ATS_STATUS_N_TOO_LARGE = -4,    /* n > ATS_SAMPLER_MAX_N */
    ATS_STATUS_INVALID_K_MAX = -5,  /* k_max < 2 (CLS plus at least one kept token) */
    ATS_STATUS_INVALID_N_REF = -6,  /* n_ref < 1 or n_ref > ATS_SAMPLER_MAX_GRID */
    ATS_STATUS_WORKSPACE_TOO_SMALL = -7 /* dynamic mode: workspace_size < atsSamplerWorkspaceSize(B, n, k_max) */
};

/* Static mode: one launch (one block per image), no host synchronisation, deterministic. */
ATS_SAMPLER_API int atsSamplerLaunch(float const* scores, int32_t const* count_in, int32_t* indices,
    int32_t* count_out, int B, int n, int k_max, int n_ref, cudaStream_t stream);

/* Bytes of device workspace atsSamplerLaunchDynamic needs (the static [B, K_out] rows, 256-byte aligned).
 * Static mode needs none. Returns 0 for invalid arguments. */
ATS_SAMPLER_API size_t atsSamplerWorkspaceSize(int B, int n, int k_max);

/* Dynamic mode: indices is written as [B, s] (row stride s, not K_out) with s = max_b count_out[b]
 * (s = 0 when B = 0), and s is stored to *size_out (a device int64 scalar). Two launches on `stream`:
 * the selector writes the static rows into `workspace`, then a small repack kernel computes s (every block
 * reduces count_out itself, so no grid-wide synchronisation or atomics are needed) and copies the first s
 * entries of each row. `indices` must hold B * K_out int32 (the upper bound). No host synchronisation. */
ATS_SAMPLER_API int atsSamplerLaunchDynamic(float const* scores, int32_t const* count_in, int32_t* indices,
    int32_t* count_out, int64_t* size_out, void* workspace, size_t workspace_size, int B, int n, int k_max,
    int n_ref, cudaStream_t stream);

/* Static slot count K_out = min(k_max, n), or 0 for invalid arguments. */
ATS_SAMPLER_API int atsSamplerOutputSlots(int n, int k_max);

/* Constant description of a status code (negative ATS_STATUS_* or positive cudaError_t). */
ATS_SAMPLER_API char const* atsSamplerStatusString(int status);

#ifdef __cplusplus
} /* extern "C" */
#endif

#endif /* ATS_SAMPLER_H */
