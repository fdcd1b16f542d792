// driver.cpp: runs the emulated kernel's C API on cases read from a file, for the sanitizer builds
// (AddressSanitizer/UBSan/ThreadSanitizer need an instrumented executable, not a library loaded by Python).
//
// Input (little-endian): repeated { int32 B, n, k_max, n_ref; float32 scores[B*n]; int32 count_in[B] }.
// Output, per case: int32 status, indices[B*K_out], count_out[B] (static layout), then int32 status,
// int64 s, indices[B*K_out], count_out[B] (dynamic layout: the first B*s entries are the [B, s] rows).
#include "atsSampler.h"

#include <cstdio>
#include <vector>

int main(int argc, char** argv)
{
    if (argc != 3)
    {
        std::fprintf(stderr, "usage: %s CASES OUT\n", argv[0]);
        return 2;
    }
    std::FILE* in = std::fopen(argv[1], "rb");
    std::FILE* out = std::fopen(argv[2], "wb");
    if (in == nullptr || out == nullptr)
    {
        std::fprintf(stderr, "cannot open %s or %s\n", argv[1], argv[2]);
        return 2;
    }
    int32_t head[4];
    int cases = 0;
    while (std::fread(head, sizeof(int32_t), 4, in) == 4)
    {
        int const B = head[0], n = head[1], k = head[2], nRef = head[3];
        std::vector<float> scores(static_cast<size_t>(B) * n);
        std::vector<int32_t> countIn(B);
        if (std::fread(scores.data(), sizeof(float), scores.size(), in) != scores.size()
            || std::fread(countIn.data(), sizeof(int32_t), countIn.size(), in) != countIn.size())
        {
            std::fprintf(stderr, "truncated case file\n");
            return 2;
        }
        int const kOut = atsSamplerOutputSlots(n, k);
        // Exactly sized heap buffers, so any write past them is an AddressSanitizer error.
        std::vector<int32_t> idx(static_cast<size_t>(B) * kOut, -7), cnt(B, -7);
        int32_t status = atsSamplerLaunch(scores.data(), countIn.data(), idx.data(), cnt.data(), B, n, k, nRef, nullptr);
        std::fwrite(&status, sizeof status, 1, out);
        std::fwrite(idx.data(), sizeof(int32_t), idx.size(), out);
        std::fwrite(cnt.data(), sizeof(int32_t), cnt.size(), out);

        size_t const wsBytes = atsSamplerWorkspaceSize(B, n, k);
        std::vector<unsigned char> ws(wsBytes > 0 ? wsBytes : 1);
        std::vector<int32_t> didx(static_cast<size_t>(B) * kOut, -7), dcnt(B, -7);
        int64_t size = -7;
        status = atsSamplerLaunchDynamic(scores.data(), countIn.data(), didx.data(), dcnt.data(), &size, ws.data(),
            wsBytes, B, n, k, nRef, nullptr);
        std::fwrite(&status, sizeof status, 1, out);
        std::fwrite(&size, sizeof size, 1, out);
        std::fwrite(didx.data(), sizeof(int32_t), didx.size(), out);
        std::fwrite(dcnt.data(), sizeof(int32_t), dcnt.size(), out);
        ++cases;
    }
    std::fclose(in);
    std::fclose(out);
    std::printf("driver-ok %d cases\n", cases);
    return 0;
}
