/*
 * atsSamplerCpu.cpp: the selector of atsSamplerCpu.h, one image at a time, O(P log P + M log P).
 *
 * Each grid point's first nearest patch comes from a binary search in the ascending normalised CDF F~ (its
 * two neighbours; the nearer wins, the lower one on a tie) and, when the lower one wins, a second binary
 * search for the first patch whose float32 distance rounds to the same value (fl(y - F~_p) does not increase
 * with p on that side), which is what the reference's first argmin returns.
 */
#include "atsSamplerCpu.h"

#include <algorithm>
#include <cmath>

namespace ats
{
namespace cpu
{

int gridSize(int64_t k_max, int64_t n_ref)
{
    int64_t const k = k_max < n_ref ? k_max : n_ref;
    return k - 1 > 1 ? static_cast<int>(k - 1) : 1;
}

namespace
{

//! First position p in [0, a) with fl(y - ft[p]) == d (ft ascending, d = fl(y - ft[a - 1])).
int firstEqualBelow(float const* ft, int a, float y, float d)
{
    int lo = 0;
    int hi = a - 1; // ft[a - 1] itself has distance d
    while (lo < hi)
    {
        int const mid = lo + (hi - lo) / 2;
        if (y - ft[mid] > d)
        {
            lo = mid + 1;
        }
        else
        {
            hi = mid;
        }
    }
    return lo;
}

} // namespace

int32_t selectOne(float const* scores, int n, int32_t count_in, int64_t k_max, int64_t n_ref, int32_t* indices,
    Scratch& s)
{
    int const k_out = static_cast<int>(std::min<int64_t>(k_max, n));
    std::fill(indices, indices + k_out, 0);
    int const valid = std::max(1, std::min(static_cast<int>(count_in), n));
    int const m = valid - 1; // valid patches
    if (m <= 0 || k_out < 2)
    {
        return 1;
    }
    float const* r = scores + 1;
    // No score above 0 (all zero, or NaN among them, as NumPy's max propagates it): all-equal scores.
    bool usable = false;
    bool nan = false;
    for (int p = 0; p < m; ++p)
    {
        nan = nan || std::isnan(r[p]);
        usable = usable || r[p] > 0.0F;
    }
    bool const ones = nan || !usable;
    auto value = [&](int p) { return ones ? 1.0F : r[p]; };

    s.order.resize(m);
    for (int p = 0; p < m; ++p)
    {
        s.order[p] = p;
    }
    std::stable_sort(s.order.begin(), s.order.end(), [&](int32_t a, int32_t b) { return value(a) < value(b); });
    if (m == 1)
    {
        indices[1] = s.order[0] + 1;
        return 2;
    }
    // Sequential float32 cumsum in ascending-score order, then F~ = (F - F_0) / (F_last - F_0).
    s.ft.resize(m);
    float acc = 0.0F;
    for (int p = 0; p < m; ++p)
    {
        acc = acc + value(s.order[p]);
        s.ft[p] = acc;
    }
    float const f0 = s.ft[0];
    float const span = s.ft[m - 1] - f0;
    float c0 = 1.0F;
    for (int p = 0; p < m; ++p)
    {
        s.ft[p] = (s.ft[p] - f0) / span;
        if (s.ft[p] > 0.0F && s.ft[p] < c0)
        {
            c0 = s.ft[p];
        }
    }
    int const big_m = gridSize(k_max, n_ref);
    float const step = big_m > 1 ? (1.0F - c0) / static_cast<float>(big_m - 1) : 0.0F;
    s.picked.assign(m, 0);
    float const* ft = s.ft.data();
    for (int j = 0; j < big_m; ++j)
    {
        float const jf = static_cast<float>(j);
        float const prod = jf * step; // rounded on its own: no fused multiply-add
        float const y = big_m > 1 ? c0 + prod : c0;
        int const a = static_cast<int>(std::upper_bound(ft, ft + m, y) - ft); // #{p : F~_p <= y}
        int pick;
        if (a == 0)
        {
            pick = 0;
        }
        else
        {
            float const d_lo = std::fabs(y - ft[a - 1]);
            if (a < m && std::fabs(y - ft[a]) < d_lo)
            {
                pick = a;
            }
            else
            {
                pick = firstEqualBelow(ft, a, y, d_lo);
            }
        }
        s.picked[pick] = 1;
    }
    int32_t count = 1;
    for (int p = 0; p < m && count < k_out; ++p)
    {
        if (s.picked[p])
        {
            indices[count++] = s.order[p] + 1;
        }
    }
    return count;
}

void selectBatch(float const* scores, int32_t const* count_in, int32_t* indices, int32_t* count_out, int B, int n,
    int64_t k_max, int64_t n_ref)
{
    int const k_out = static_cast<int>(std::min<int64_t>(k_max, n));
    Scratch scratch;
    for (int b = 0; b < B; ++b)
    {
        count_out[b] = selectOne(scores + static_cast<int64_t>(b) * n, n, count_in[b], k_max, n_ref,
            indices + static_cast<int64_t>(b) * k_out, scratch);
    }
}

} // namespace cpu
} // namespace ats
