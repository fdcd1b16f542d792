/*
 * atsSamplerCpu.h: the Adaptive Token Sampling selector on the CPU, for the ONNX Runtime custom op.
 *
 * Same contract and the same float32 arithmetic as ats_deploy/model/reference.py (docs/ATS_RULE.md sections 2
 * and 4), so results equal select_reference(..., dtype=np.float32) bit for bit:
 *   scores    [B, n]      float32, slot 0 (CLS) ignored
 *   count_in  [B]         int32, valid slots including CLS (valid slots first); clamped to [1, n]
 *   indices   [B, K_out]  int32, K_out = min(k_max, n): 0 (CLS), kept slot ids in ascending-score order, 0 padding
 *   count_out [B]         int32, 1 + K'
 * Build without fast math and without floating-point contraction (the CMake file sets -ffp-contract=off):
 * y_j = c0 + j * step is two roundings, never one fused multiply-add.
 */
#ifndef ATS_SAMPLER_CPU_H
#define ATS_SAMPLER_CPU_H

#include <cstdint>
#include <vector>

namespace ats
{
namespace cpu
{

//! Grid size M = max(min(k_max, n_ref) - 1, 1), as reference.grid_size.
int gridSize(int64_t k_max, int64_t n_ref);

//! Scratch buffers reused across images and calls (one per kernel instance).
struct Scratch
{
    std::vector<int32_t> order;
    std::vector<float> ft;
    std::vector<uint8_t> picked;
};

//! One image: writes k_out indices and returns count_out.
int32_t selectOne(float const* scores, int n, int32_t count_in, int64_t k_max, int64_t n_ref, int32_t* indices,
    Scratch& scratch);

//! The batch; k_out = min(k_max, n).
void selectBatch(float const* scores, int32_t const* count_in, int32_t* indices, int32_t* count_out, int B, int n,
    int64_t k_max, int64_t n_ref);

} // namespace cpu
} // namespace ats

#endif // ATS_SAMPLER_CPU_H
