/*
 * atsSamplerOrtOp.cpp: ats::AdaptiveTokenSampler as an ONNX Runtime custom op (CPU), so the sampler-as-one-node
 * ONNX that TensorRT runs with the plugin (`ats-deploy export --sampler plugin`) also runs in ONNX Runtime.
 *
 * Static shape mode only (the node's two outputs, indices [B, K_out] int32 and count_out [B] int32); a
 * dynamic-mode node (mode = 1, a third output) is refused when the session is created, with a message that
 * names the portable form. Written against OrtCustomOp / OrtApi version 16 (ONNX Runtime 1.16, the first
 * with CreateKernelV2 / KernelComputeV2, which return errors as statuses): any release's headers from
 * 1.16 on build it, and the library loads in any runtime from 1.16 on.
 *
 *   SessionOptions.register_custom_ops_library("libats_sampler_ort.so")
 */
#include "atsSamplerCpu.h"

#include <onnxruntime_c_api.h>

#include <cstdint>
#include <cstring>

#if defined(_WIN32)
#define ATS_ORT_EXPORT __declspec(dllexport)
#else
#define ATS_ORT_EXPORT __attribute__((visibility("default")))
#endif

namespace
{

constexpr uint32_t kApiVersion = 16;
constexpr char const* kDomain = "ats";
constexpr char const* kOpName = "AdaptiveTokenSampler";

OrtApi const* gApi = nullptr;

struct SamplerKernel
{
    int64_t kMax{0};
    int64_t nRef{0};
    int64_t mode{0};
    bool valid{false};
};

int64_t intAttribute(OrtKernelInfo const* info, char const* name, bool& ok)
{
    int64_t value = 0;
    OrtStatus* status = gApi->KernelInfoGetAttribute_int64(info, name, &value);
    if (status != nullptr)
    {
        gApi->ReleaseStatus(status);
        ok = false;
    }
    return value;
}

OrtStatus* ORT_API_CALL createKernel(OrtCustomOp const* /*op*/, OrtApi const* api, OrtKernelInfo const* info,
    void** out)
{
    gApi = api;
    *out = nullptr;
    bool ok = true;
    SamplerKernel kernel;
    kernel.kMax = intAttribute(info, "k_max", ok);
    kernel.nRef = intAttribute(info, "n_ref", ok);
    kernel.mode = intAttribute(info, "mode", ok);
    if (!ok)
    {
        return api->CreateStatus(ORT_INVALID_GRAPH,
            "ats::AdaptiveTokenSampler: the node lacks an int attribute k_max, n_ref or mode; export it again "
            "with ats-deploy export --sampler plugin");
    }
    if (kernel.mode != 0)
    {
        return api->CreateStatus(ORT_NOT_IMPLEMENTED,
            "ats::AdaptiveTokenSampler: the ONNX Runtime op runs static shape mode only; for ONNX Runtime export "
            "--shape dynamic with --sampler portable");
    }
    if (kernel.kMax < 2 || kernel.nRef < 1 || kernel.nRef > (1 << 24))
    {
        return api->CreateStatus(ORT_INVALID_GRAPH,
            "ats::AdaptiveTokenSampler: k_max must be >= 2 and n_ref in [1, 2^24]; export it again with a valid "
            "--max-k");
    }
    kernel.valid = true;
    *out = new SamplerKernel(kernel);
    return nullptr;
}

char const* ORT_API_CALL opName(OrtCustomOp const* /*op*/)
{
    return kOpName;
}

char const* ORT_API_CALL providerType(OrtCustomOp const* /*op*/)
{
    return nullptr; // the CPU execution provider
}

ONNXTensorElementDataType ORT_API_CALL inputType(OrtCustomOp const* /*op*/, size_t index)
{
    return index == 0 ? ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT : ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32;
}

size_t ORT_API_CALL inputCount(OrtCustomOp const* /*op*/)
{
    return 2;
}

// Outputs: indices and count_out (int32), and the dynamic mode's size tensor (int64), optional so that a
// static node with two outputs matches the schema; a node that has it is refused in createKernel.
ONNXTensorElementDataType ORT_API_CALL outputType(OrtCustomOp const* /*op*/, size_t index)
{
    return index < 2 ? ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32 : ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64;
}

size_t ORT_API_CALL outputCount(OrtCustomOp const* /*op*/)
{
    return 3;
}

OrtCustomOpInputOutputCharacteristic ORT_API_CALL inputCharacteristic(OrtCustomOp const* /*op*/, size_t /*index*/)
{
    return INPUT_OUTPUT_REQUIRED;
}

OrtCustomOpInputOutputCharacteristic ORT_API_CALL outputCharacteristic(OrtCustomOp const* /*op*/, size_t index)
{
    return index < 2 ? INPUT_OUTPUT_REQUIRED : INPUT_OUTPUT_OPTIONAL;
}

OrtMemType ORT_API_CALL inputMemoryType(OrtCustomOp const* /*op*/, size_t /*index*/)
{
    return OrtMemTypeDefault;
}

// Only for variadic inputs or outputs, which this op has none of; ORT reads them from version 14 on.
int ORT_API_CALL variadicArity(OrtCustomOp const* /*op*/)
{
    return 1;
}

int ORT_API_CALL variadicHomogeneity(OrtCustomOp const* /*op*/)
{
    return 1;
}

//! Shape of an input as (B, n); false when the call fails or the rank is not ``rank``.
bool inputShape(OrtValue const* value, size_t rank, int64_t* dims)
{
    OrtTensorTypeAndShapeInfo* info = nullptr;
    if (OrtStatus* st = gApi->GetTensorTypeAndShape(value, &info))
    {
        gApi->ReleaseStatus(st);
        return false;
    }
    size_t count = 0;
    bool ok = true;
    if (OrtStatus* st = gApi->GetDimensionsCount(info, &count))
    {
        gApi->ReleaseStatus(st);
        ok = false;
    }
    ok = ok && count == rank;
    if (ok)
    {
        if (OrtStatus* st = gApi->GetDimensions(info, dims, rank))
        {
            gApi->ReleaseStatus(st);
            ok = false;
        }
    }
    gApi->ReleaseTensorTypeAndShapeInfo(info);
    return ok;
}

template <typename T>
T* tensorData(OrtValue* value)
{
    void* data = nullptr;
    if (OrtStatus* st = gApi->GetTensorMutableData(value, &data))
    {
        gApi->ReleaseStatus(st);
        return nullptr;
    }
    return static_cast<T*>(data);
}

OrtStatus* ORT_API_CALL compute(void* opKernel, OrtKernelContext* context)
{
    auto const* kernel = static_cast<SamplerKernel const*>(opKernel);
    OrtValue const* scoresValue = nullptr;
    OrtValue const* countValue = nullptr;
    if (OrtStatus* st = gApi->KernelContext_GetInput(context, 0, &scoresValue))
    {
        return st;
    }
    if (OrtStatus* st = gApi->KernelContext_GetInput(context, 1, &countValue))
    {
        return st;
    }
    int64_t dims[2] = {0, 0};
    int64_t countDims[1] = {0};
    if (!inputShape(scoresValue, 2, dims) || !inputShape(countValue, 1, countDims) || countDims[0] != dims[0]
        || dims[1] < 1)
    {
        return gApi->CreateStatus(ORT_INVALID_ARGUMENT,
            "ats::AdaptiveTokenSampler: scores must be [B, n] (n >= 1) and count_in [B]");
    }
    int64_t const B = dims[0];
    int64_t const n = dims[1];
    int64_t const kMax = kernel->kMax;
    int64_t const outDims[2] = {B, kMax < n ? kMax : n};
    OrtValue* indicesValue = nullptr;
    OrtValue* countOutValue = nullptr;
    if (OrtStatus* st = gApi->KernelContext_GetOutput(context, 0, outDims, 2, &indicesValue))
    {
        return st;
    }
    if (OrtStatus* st = gApi->KernelContext_GetOutput(context, 1, outDims, 1, &countOutValue))
    {
        return st;
    }
    auto* indices = tensorData<int32_t>(indicesValue);
    auto* countOut = tensorData<int32_t>(countOutValue);
    auto* scores = tensorData<float>(const_cast<OrtValue*>(scoresValue));
    auto* countIn = tensorData<int32_t>(const_cast<OrtValue*>(countValue));
    if ((indices == nullptr || countOut == nullptr || scores == nullptr || countIn == nullptr) && B > 0)
    {
        return gApi->CreateStatus(ORT_FAIL, "ats::AdaptiveTokenSampler: could not read or write a tensor");
    }
    ats::cpu::selectBatch(scores, countIn, indices, countOut, static_cast<int>(B), static_cast<int>(n), kernel->kMax,
        kernel->nRef);
    return nullptr;
}

void ORT_API_CALL destroyKernel(void* opKernel)
{
    delete static_cast<SamplerKernel*>(opKernel);
}

OrtCustomOp makeOp()
{
    OrtCustomOp op;
    std::memset(&op, 0, sizeof(op)); // fields a newer header adds stay zero: version 16 tells ORT to skip them
    op.version = kApiVersion;
    op.CreateKernelV2 = createKernel; // ORT calls the V2 pair when set (and version >= 16)
    op.KernelComputeV2 = compute;
    op.GetName = opName;
    op.GetExecutionProviderType = providerType;
    op.GetInputType = inputType;
    op.GetInputTypeCount = inputCount;
    op.GetOutputType = outputType;
    op.GetOutputTypeCount = outputCount;
    op.KernelDestroy = destroyKernel;
    op.GetInputCharacteristic = inputCharacteristic;
    op.GetOutputCharacteristic = outputCharacteristic;
    op.GetInputMemoryType = inputMemoryType;
    op.GetVariadicInputMinArity = variadicArity;
    op.GetVariadicInputHomogeneity = variadicHomogeneity;
    op.GetVariadicOutputMinArity = variadicArity;
    op.GetVariadicOutputHomogeneity = variadicHomogeneity;
    return op;
}

OrtCustomOp gOp = makeOp();

} // namespace

extern "C" ATS_ORT_EXPORT OrtStatus* ORT_API_CALL RegisterCustomOps(OrtSessionOptions* options, OrtApiBase const* base)
{
    OrtApi const* api = base->GetApi(kApiVersion);
    if (api == nullptr)
    {
        return nullptr; // a runtime older than 1.16 returns no API; nothing is registered
    }
    gApi = api;
    OrtCustomOpDomain* domain = nullptr;
    if (OrtStatus* st = api->CreateCustomOpDomain(kDomain, &domain))
    {
        return st;
    }
    if (OrtStatus* st = api->CustomOpDomain_Add(domain, &gOp))
    {
        return st;
    }
    // The domain must outlive every session made with these options: it is never released.
    return api->AddCustomOpDomain(options, domain);
}
