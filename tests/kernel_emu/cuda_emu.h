/*
 * cuda_emu.h: just enough of CUDA to compile plugins/ats_sampler/atsSamplerKernel.cu as host C++ and run it.
 *
 * Used by tests/unit/test_kernel_cpu.py so the real kernel source is checked in CI without a GPU.
 * Model: a launch runs its blocks one after another. Every CUDA thread of a block is its own thread of
 * execution with its own stack (a ucontext fiber), so its locals and control flow are exactly the kernel's;
 * the fibers of a block take turns on one OS thread (a CI machine stays responsive: no 256 OS threads).
 *   - __syncthreads(): a barrier over the block's fibers; a fiber that reaches it waits until all have.
 *     A barrier nobody else can reach (divergent __syncthreads) aborts with a message instead of hanging.
 *   - __shfl_xor_sync / __shfl_up_sync: each lane writes its value into a per-warp exchange array, the warp
 *     meets at a barrier, each lane reads its source lane, the warp meets again (so the array can be reused).
 *     Stronger than CUDA (a full warp barrier); needs all 32 lanes, which holds for every shuffle here.
 *   - __shared__ variables: function statics (one block runs at a time, so that is block-shared memory).
 *   - extern __shared__: a heap buffer of exactly the launch's byte count, refilled with random bytes before
 *     each block, so a read of never-written shared memory shows as a wrong result and an access past its
 *     end as an AddressSanitizer error.
 *   - atomicExch: std::atomic_ref (a real atomic operation).
 *   - the _rn float intrinsics: plain float arithmetic (compile with -ffp-contract=off: no FMA contraction).
 * Sanitizers: fiber switches are announced to AddressSanitizer and ThreadSanitizer. Under ThreadSanitizer
 * each fiber counts as a thread and the only happens-before edges are the barriers (and the launch itself),
 * as on a GPU, so two CUDA threads writing one location between two barriers are reported as a data race.
 * Not modelled: the GPU memory model beyond those barriers, warps running out of step, concurrent blocks,
 * timing.
 */
#ifndef ATS_CUDA_EMU_H
#define ATS_CUDA_EMU_H

#include <ucontext.h>

#include <atomic>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <random>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/common_interface_defs.h>
#define ATS_EMU_ASAN 1
#endif
#if defined(__SANITIZE_THREAD__)
#include <sanitizer/tsan_interface.h>
#define ATS_EMU_TSAN 1
#endif

// ---- cuda_runtime_api.h subset ------------------------------------------------------------------------------
typedef int cudaError_t;
struct CUstream_st;
typedef CUstream_st* cudaStream_t;
constexpr cudaError_t cudaSuccess = 0;
constexpr cudaError_t cudaErrorInvalidConfiguration = 9;

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static

struct dim3
{
    unsigned x = 1, y = 1, z = 1;
};

namespace ats_emu
{

struct Barrier
{
    int participants = 0;
    int arrived = 0;
    unsigned generation = 0;
    char sync[2] = {0, 0}; // ThreadSanitizer sync objects, one per generation parity
};

struct Fiber
{
    ucontext_t context;
    char* stack = nullptr;
    dim3 thread;
    Barrier* waiting = nullptr;
    unsigned waitGeneration = 0;
    bool started = false;
    bool done = false;
    void* asanFakeStack = nullptr;
    void* tsanFiber = nullptr;
};

struct Block
{
    std::vector<Fiber> fibers;
    Barrier block;
    std::vector<Barrier> warps;
    std::vector<uint64_t> exchange;
    ucontext_t scheduler;
    Fiber* current = nullptr;
    dim3 blockIdx, blockDim, gridDim;
    void (*body)(void*) = nullptr;
    void* bodyArg = nullptr;
    void* tsanScheduler = nullptr;
    char tsanLaunch = 0; // sync object: the launch happens before every fiber of a block
    char tsanDone = 0;   // sync object: every fiber of a block happens before the next block
    void const* asanSchedulerBottom = nullptr;
    size_t asanSchedulerSize = 0;
};

inline Block* g_block = nullptr;
inline unsigned char* g_dynamic_shared = nullptr;
inline cudaError_t g_last_error = cudaSuccess;
constexpr size_t kStackBytes = 256 * 1024;

// The emulator's own bookkeeping is not the kernel's memory: keep it out of ThreadSanitizer's view.
#if ATS_EMU_TSAN
#define ATS_EMU_NO_TSAN inline __attribute__((noinline, no_sanitize_thread))
#else
#define ATS_EMU_NO_TSAN inline
#endif

ATS_EMU_NO_TSAN dim3 threadIndex()
{
    return g_block->current->thread;
}

ATS_EMU_NO_TSAN dim3 blockIndex()
{
    return g_block->blockIdx;
}

ATS_EMU_NO_TSAN dim3 blockDimension()
{
    return g_block->blockDim;
}

ATS_EMU_NO_TSAN dim3 gridDimension()
{
    return g_block->gridDim;
}

inline unsigned char* dynamicShared()
{
    return g_dynamic_shared;
}

//! Fiber side: hand control back to the scheduler (and come back here when it resumes this fiber).
ATS_EMU_NO_TSAN void yieldToScheduler(bool exiting = false)
{
    Fiber* f = g_block->current;
#if ATS_EMU_ASAN
    __sanitizer_start_switch_fiber(
        exiting ? nullptr : &f->asanFakeStack, g_block->asanSchedulerBottom, g_block->asanSchedulerSize);
#endif
#if ATS_EMU_TSAN
    __tsan_switch_to_fiber(g_block->tsanScheduler, __tsan_switch_to_fiber_no_sync);
#endif
    if (exiting)
    {
        setcontext(&g_block->scheduler);
    }
    swapcontext(&f->context, &g_block->scheduler);
#if ATS_EMU_ASAN
    __sanitizer_finish_switch_fiber(f->asanFakeStack, &g_block->asanSchedulerBottom, &g_block->asanSchedulerSize);
#endif
}

ATS_EMU_NO_TSAN void arrive(Barrier& b)
{
    Fiber* f = g_block->current;
#if ATS_EMU_TSAN
    __tsan_release(&b.sync[b.generation & 1U]);
#endif
    unsigned const generation = b.generation;
    f->waiting = &b;
    f->waitGeneration = generation;
    if (++b.arrived == b.participants)
    {
        b.arrived = 0;
        ++b.generation;
    }
    yieldToScheduler();
#if ATS_EMU_TSAN
    __tsan_acquire(&b.sync[generation & 1U]);
#endif
}

ATS_EMU_NO_TSAN void fiberEntry()
{
    Block* blk = g_block;
#if ATS_EMU_ASAN
    __sanitizer_finish_switch_fiber(nullptr, &blk->asanSchedulerBottom, &blk->asanSchedulerSize);
#endif
#if ATS_EMU_TSAN
    __tsan_acquire(&blk->tsanLaunch);
#endif
    blk->body(blk->bodyArg);
#if ATS_EMU_TSAN
    __tsan_release(&blk->tsanDone);
#endif
    blk->current->done = true;
    yieldToScheduler(true);
}

//! Scheduler side: run one block's fibers until all have returned.
ATS_EMU_NO_TSAN void runBlock(Block& blk)
{
#if ATS_EMU_TSAN
    __tsan_release(&blk.tsanLaunch);
#endif
    for (;;)
    {
        bool progress = false;
        bool allDone = true;
        for (Fiber& f : blk.fibers)
        {
            if (f.done)
            {
                continue;
            }
            allDone = false;
            if (f.waiting != nullptr && f.waiting->generation == f.waitGeneration)
            {
                continue; // its barrier is still closed
            }
            f.waiting = nullptr;
            blk.current = &f;
            progress = true;
#if ATS_EMU_ASAN
            void* fake = nullptr;
            __sanitizer_start_switch_fiber(&fake, f.stack, kStackBytes);
#endif
#if ATS_EMU_TSAN
            __tsan_switch_to_fiber(f.tsanFiber, __tsan_switch_to_fiber_no_sync);
#endif
            swapcontext(&blk.scheduler, &f.context);
#if ATS_EMU_ASAN
            __sanitizer_finish_switch_fiber(fake, nullptr, nullptr);
#endif
        }
        if (allDone)
        {
            break;
        }
        if (!progress)
        {
            std::fprintf(stderr, "cuda_emu: deadlock: threads wait at a barrier the others never reach\n");
            std::abort();
        }
    }
#if ATS_EMU_TSAN
    __tsan_acquire(&blk.tsanDone);
#endif
}

template <typename T>
T shuffle(T v, int source)
{
    static_assert(sizeof(T) <= sizeof(uint64_t), "shuffle of a type wider than 64 bits");
    dim3 const t = threadIndex();
    int const lane = static_cast<int>(t.x) & 31;
    int const w = static_cast<int>(t.x) >> 5;
    uint64_t* slots = g_block->exchange.data() + static_cast<size_t>(w) * 32;
    uint64_t bits = 0;
    std::memcpy(&bits, &v, sizeof(T));
    slots[lane] = bits;
    arrive(g_block->warps[w]);
    uint64_t const got = slots[source >= 0 && source < 32 ? source : lane];
    arrive(g_block->warps[w]);
    T out;
    std::memcpy(&out, &got, sizeof(T));
    return out;
}

template <typename F>
void trampoline(void* f)
{
    (*static_cast<F*>(f))();
}

//! kernel<<<grid, block, sharedBytes, stream>>>(args...) for a 1-D grid and block.
template <typename... Params, typename... Args>
void launch(void (*kernel)(Params...), int grid, int block, size_t sharedBytes, cudaStream_t, Args... args)
{
    if (grid < 1 || block < 1 || block > 1024 || block % 32 != 0)
    {
        g_last_error = cudaErrorInvalidConfiguration;
        return;
    }
    auto body = [&]() { kernel(args...); };
    Block blk;
    blk.fibers.resize(static_cast<size_t>(block));
    blk.block.participants = block;
    blk.warps.resize(static_cast<size_t>(block / 32));
    for (Barrier& w : blk.warps)
    {
        w.participants = 32;
    }
    blk.exchange.resize(static_cast<size_t>(block));
    blk.blockDim = dim3{static_cast<unsigned>(block), 1, 1};
    blk.gridDim = dim3{static_cast<unsigned>(grid), 1, 1};
    blk.body = &trampoline<decltype(body)>;
    blk.bodyArg = &body;
    std::vector<std::unique_ptr<char[]>> stacks;
    for (int t = 0; t < block; ++t)
    {
        stacks.emplace_back(new char[kStackBytes]);
    }
    // Exactly the bytes the launch asks for (at least one, so the pointer is a real allocation).
    std::unique_ptr<unsigned char[]> shared(new unsigned char[sharedBytes > 0 ? sharedBytes : 1]);
    std::mt19937 noise(12345U + static_cast<unsigned>(grid) * 7919U + static_cast<unsigned>(sharedBytes));
#if ATS_EMU_TSAN
    blk.tsanScheduler = __tsan_get_current_fiber();
#endif
    g_block = &blk;
    g_dynamic_shared = sharedBytes > 0 ? shared.get() : nullptr;
    for (int b = 0; b < grid; ++b)
    {
        for (size_t i = 0; i < sharedBytes; ++i)
        {
            shared[i] = static_cast<unsigned char>(noise());
        }
        blk.blockIdx = dim3{static_cast<unsigned>(b), 1, 1};
        for (int t = 0; t < block; ++t)
        {
            Fiber& f = blk.fibers[static_cast<size_t>(t)];
            f = Fiber{};
            f.thread = dim3{static_cast<unsigned>(t), 1, 1};
            f.stack = stacks[static_cast<size_t>(t)].get();
            getcontext(&f.context);
            f.context.uc_stack.ss_sp = f.stack;
            f.context.uc_stack.ss_size = kStackBytes;
            f.context.uc_link = nullptr;
            makecontext(&f.context, &fiberEntry, 0);
#if ATS_EMU_TSAN
            f.tsanFiber = __tsan_create_fiber(0);
#endif
        }
        runBlock(blk);
#if ATS_EMU_TSAN
        for (Fiber& f : blk.fibers)
        {
            __tsan_destroy_fiber(f.tsanFiber);
        }
#endif
    }
    g_block = nullptr;
    g_dynamic_shared = nullptr;
}

} // namespace ats_emu

#define threadIdx (::ats_emu::threadIndex())
#define blockIdx (::ats_emu::blockIndex())
#define blockDim (::ats_emu::blockDimension())
#define gridDim (::ats_emu::gridDimension())

// ---- device functions and intrinsics ------------------------------------------------------------------------
inline void __syncthreads()
{
    ats_emu::arrive(ats_emu::g_block->block);
}

template <typename T>
T __shfl_xor_sync(unsigned, T v, int laneMask)
{
    return ats_emu::shuffle(v, (static_cast<int>(threadIdx.x) & 31) ^ laneMask);
}

template <typename T>
T __shfl_up_sync(unsigned, T v, unsigned delta)
{
    // A source below lane 0 leaves the value unchanged, as in CUDA.
    return ats_emu::shuffle(v, (static_cast<int>(threadIdx.x) & 31) - static_cast<int>(delta));
}

inline int atomicExch(int* address, int value)
{
    return std::atomic_ref<int>(*address).exchange(value);
}

inline unsigned atomicExch(unsigned* address, unsigned value)
{
    return std::atomic_ref<unsigned>(*address).exchange(value);
}

inline uint32_t __float_as_uint(float v)
{
    uint32_t u;
    std::memcpy(&u, &v, sizeof u);
    return u;
}

inline float __uint_as_float(uint32_t u)
{
    float v;
    std::memcpy(&v, &u, sizeof v);
    return v;
}

inline int __clz(int v)
{
    return v == 0 ? 32 : __builtin_clz(static_cast<unsigned>(v));
}

inline float __fadd_rn(float a, float b)
{
    return a + b;
}

inline float __fsub_rn(float a, float b)
{
    return a - b;
}

inline float __fmul_rn(float a, float b)
{
    return a * b;
}

inline float __fdiv_rn(float a, float b)
{
    return a / b;
}

using std::fabs;
using std::isnan;

template <typename T>
inline T min(T a, T b)
{
    return b < a ? b : a;
}

inline cudaError_t cudaGetLastError()
{
    cudaError_t const e = ats_emu::g_last_error;
    ats_emu::g_last_error = cudaSuccess;
    return e;
}

inline cudaError_t cudaMemsetAsync(void* p, int value, size_t bytes, cudaStream_t)
{
    std::memset(p, value, bytes);
    return cudaSuccess;
}

inline char const* cudaGetErrorString(cudaError_t e)
{
    return e == cudaSuccess ? "no error" : "emulated CUDA error";
}

#endif // ATS_CUDA_EMU_H
