/*
 * atsSamplerPlugin.cpp: IPluginV3 wrapper of the ATS selector kernel, its creator and the library entry points.
 *
 * Every noexcept entry point wraps its body in try/catch and reports through the ILogger TensorRT hands out
 * (setLoggerFinder for libraries loaded with IPluginRegistry::loadLibrary, else the global getLogger()).
 * Loading:
 *   - dlopen / ctypes.CDLL / trtexec --staticPlugins: the creator registers itself at load time
 *     (ATS_SELF_REGISTER, the default build) under namespace "ats".
 *   - IPluginRegistry::loadLibrary / trtexec --dynamicPlugins: TensorRT calls setLoggerFinder and getCreators.
 *     loadLibrary refuses creators that are already registered, so build that library with
 *     -DATS_SELF_REGISTER=OFF (see README.md, Known issues).
 */
#include "atsSamplerPlugin.h"

#include "atsSampler.h"
#include "atsSamplerKernel.h"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <exception>
#include <mutex>
#include <sstream>
#include <stdexcept>
#include <string>

#if defined(_WIN32)
#define ATS_PLUGIN_EXPORT __declspec(dllexport)
#else
#define ATS_PLUGIN_EXPORT __attribute__((visibility("default")))
#endif

using namespace nvinfer1;

namespace ats
{
namespace plugin
{
namespace
{

//! Logger finder handed over by TensorRT (setLoggerFinder); the first non-null one wins.
class LoggerFinderSlot
{
public:
    void set(ILoggerFinder* finder) noexcept
    {
        std::lock_guard<std::mutex> lock(mMutex);
        if (mFinder == nullptr && finder != nullptr)
        {
            mFinder = finder;
        }
    }

    ILogger* logger() noexcept
    {
        std::lock_guard<std::mutex> lock(mMutex);
        if (mFinder != nullptr)
        {
            return mFinder->findLogger();
        }
        return ::getLogger(); // the process-wide logger of libnvinfer when no finder was set
    }

private:
    std::mutex mMutex;
    ILoggerFinder* mFinder{nullptr};
};

LoggerFinderSlot& loggerSlot() noexcept
{
    static LoggerFinderSlot slot;
    return slot;
}

void log(ILogger::Severity severity, char const* message) noexcept
{
    try
    {
        ILogger* logger = loggerSlot().logger();
        if (logger != nullptr)
        {
            std::string const text = std::string{kPLUGIN_NAME} + ": " + message;
            logger->log(severity, text.c_str());
        }
    }
    catch (...)
    {
        // Logging must never throw out of a noexcept entry point.
    }
}

void logError(char const* where, std::exception const& e) noexcept
{
    try
    {
        std::string const text = std::string{where} + ": " + e.what();
        log(ILogger::Severity::kERROR, text.c_str());
    }
    catch (...)
    {
    }
}

//! PLUGIN_VALIDATE-style check: throws std::invalid_argument naming the condition and the source line.
#define ATS_VALIDATE(condition, message)                                                                              \
    do                                                                                                                 \
    {                                                                                                                  \
        if (!(condition))                                                                                              \
        {                                                                                                              \
            std::ostringstream ats_validate_stream;                                                                    \
            ats_validate_stream << message << " (check `" #condition "` failed at " << __FILE__ << ":" << __LINE__     \
                                << ")";                                                                                \
            throw std::invalid_argument(ats_validate_stream.str());                                                    \
        }                                                                                                              \
    } while (0)

//! Reads one integer field. TensorRT's ONNX parser narrows INT attributes to INT32; accept the other integer
//! encodings too, so a hand-built PluginFieldCollection works.
int32_t readIntField(PluginField const& field)
{
    ATS_VALIDATE(field.data != nullptr && field.length >= 1, "field '" << field.name << "' has no data");
    int64_t value = 0;
    switch (field.type)
    {
    case PluginFieldType::kINT32: value = *static_cast<int32_t const*>(field.data); break;
    case PluginFieldType::kINT64: value = *static_cast<int64_t const*>(field.data); break;
    case PluginFieldType::kINT16: value = *static_cast<int16_t const*>(field.data); break;
    case PluginFieldType::kINT8: value = *static_cast<int8_t const*>(field.data); break;
    default: ATS_VALIDATE(false, "field '" << field.name << "' must be an integer (INT32)");
    }
    ATS_VALIDATE(value >= INT32_MIN && value <= INT32_MAX, "field '" << field.name << "' does not fit in int32");
    return static_cast<int32_t>(value);
}

void validateFields(int32_t kMax, int32_t nRef, int32_t mode)
{
    ATS_VALIDATE(kMax >= 2, "k_max must be >= 2 (CLS plus at least one token), got " << kMax);
    ATS_VALIDATE(nRef >= 1 && nRef <= ATS_SAMPLER_MAX_GRID, "n_ref must be in [1, 2^24], got " << nRef);
    ATS_VALIDATE(mode == 0 || mode == 1, "mode must be 0 (static) or 1 (dynamic), got " << mode);
}

constexpr int32_t kOUT_INDICES = 0;
constexpr int32_t kOUT_COUNT = 1;
constexpr int32_t kOUT_SIZE = 2;

} // namespace

// ------------------------------------------------------------------------------------------------ plugin

AtsSamplerPlugin::AtsSamplerPlugin(int32_t kMax, int32_t nRef, SamplerMode mode)
    : mKMax(kMax)
    , mNRef(nRef)
    , mMode(mode)
{
    validateFields(kMax, nRef, static_cast<int32_t>(mode));
}

AtsSamplerPlugin::AtsSamplerPlugin(AtsSamplerPlugin const& other)
    : IPluginV3(other)
    , IPluginV3OneCore(other)
    , IPluginV3OneBuild(other)
    , IPluginV3OneRuntime(other)
    , mKMax(other.mKMax)
    , mNRef(other.mNRef)
    , mMode(other.mMode)
{
    // mDataToSerialize is deliberately not copied: its pointers would refer to `other`.
}

IPluginCapability* AtsSamplerPlugin::getCapabilityInterface(PluginCapabilityType type) noexcept
{
    try
    {
        switch (type)
        {
        case PluginCapabilityType::kBUILD: return static_cast<IPluginV3OneBuild*>(this);
        case PluginCapabilityType::kRUNTIME: return static_cast<IPluginV3OneRuntime*>(this);
        case PluginCapabilityType::kCORE: return static_cast<IPluginV3OneCore*>(this);
        }
        ATS_VALIDATE(false, "unknown capability type " << static_cast<int32_t>(type));
    }
    catch (std::exception const& e)
    {
        logError("getCapabilityInterface", e);
    }
    return nullptr;
}

IPluginV3* AtsSamplerPlugin::clone() noexcept
{
    try
    {
        return new AtsSamplerPlugin(*this);
    }
    catch (std::exception const& e)
    {
        logError("clone", e);
    }
    return nullptr;
}

AsciiChar const* AtsSamplerPlugin::getPluginName() const noexcept
{
    return kPLUGIN_NAME;
}

AsciiChar const* AtsSamplerPlugin::getPluginVersion() const noexcept
{
    return kPLUGIN_VERSION;
}

AsciiChar const* AtsSamplerPlugin::getPluginNamespace() const noexcept
{
    return kPLUGIN_NAMESPACE;
}

int32_t AtsSamplerPlugin::getNbOutputs() const noexcept
{
    return mMode == SamplerMode::kDYNAMIC ? 3 : 2;
}

int32_t AtsSamplerPlugin::configurePlugin(
    DynamicPluginTensorDesc const* in, int32_t nbInputs, DynamicPluginTensorDesc const* out, int32_t nbOutputs) noexcept
{
    try
    {
        ATS_VALIDATE(in != nullptr && out != nullptr, "null tensor descriptions");
        ATS_VALIDATE(nbInputs == kNB_INPUTS, "expects 2 inputs (scores, count_in), got " << nbInputs);
        ATS_VALIDATE(nbOutputs == getNbOutputs(), "expects " << getNbOutputs() << " outputs, got " << nbOutputs);
        ATS_VALIDATE(in[0].desc.dims.nbDims == 2, "scores must be 2-D [B, n]");
        ATS_VALIDATE(in[1].desc.dims.nbDims == 1, "count_in must be 1-D [B]");
        int64_t const nMax = in[0].max.d[1];
        ATS_VALIDATE(nMax <= ATS_SAMPLER_MAX_N,
            "scores has up to " << nMax << " slots; the kernel supports n <= " << ATS_SAMPLER_MAX_N);
        int64_t const bScores = in[0].desc.dims.d[0];
        int64_t const bCounts = in[1].desc.dims.d[0];
        ATS_VALIDATE(bScores < 0 || bCounts < 0 || bScores == bCounts,
            "scores batch " << bScores << " != count_in batch " << bCounts);
        return 0;
    }
    catch (std::exception const& e)
    {
        logError("configurePlugin", e);
    }
    return -1;
}

int32_t AtsSamplerPlugin::getOutputDataTypes(
    DataType* outputTypes, int32_t nbOutputs, DataType const* inputTypes, int32_t nbInputs) const noexcept
{
    try
    {
        ATS_VALIDATE(outputTypes != nullptr && inputTypes != nullptr, "null type arrays");
        ATS_VALIDATE(nbInputs == kNB_INPUTS, "expects 2 inputs, got " << nbInputs);
        ATS_VALIDATE(nbOutputs == getNbOutputs(), "expects " << getNbOutputs() << " outputs, got " << nbOutputs);
        ATS_VALIDATE(inputTypes[0] == DataType::kFLOAT, "scores must be float32 (keep the score path in fp32)");
        ATS_VALIDATE(inputTypes[1] == DataType::kINT32, "count_in must be int32");
        outputTypes[kOUT_INDICES] = DataType::kINT32;
        outputTypes[kOUT_COUNT] = DataType::kINT32;
        if (mMode == SamplerMode::kDYNAMIC)
        {
            outputTypes[kOUT_SIZE] = DataType::kINT64;
        }
        return 0;
    }
    catch (std::exception const& e)
    {
        logError("getOutputDataTypes", e);
    }
    return -1;
}

int32_t AtsSamplerPlugin::getOutputShapes(DimsExprs const* inputs, int32_t nbInputs, DimsExprs const* /*shapeInputs*/,
    int32_t nbShapeInputs, DimsExprs* outputs, int32_t nbOutputs, IExprBuilder& exprBuilder) noexcept
{
    try
    {
        ATS_VALIDATE(inputs != nullptr && outputs != nullptr, "null shape arrays");
        ATS_VALIDATE(nbInputs == kNB_INPUTS, "expects 2 inputs, got " << nbInputs);
        ATS_VALIDATE(nbShapeInputs == 0, "takes no shape inputs");
        ATS_VALIDATE(nbOutputs == getNbOutputs(), "expects " << getNbOutputs() << " outputs, got " << nbOutputs);
        ATS_VALIDATE(inputs[0].nbDims == 2, "scores must be 2-D [B, n], got " << inputs[0].nbDims << "-D");
        ATS_VALIDATE(inputs[1].nbDims == 1, "count_in must be 1-D [B], got " << inputs[1].nbDims << "-D");

        IDimensionExpr const* batch = inputs[0].d[0];
        IDimensionExpr const* n = inputs[0].d[1];
        if (n->isConstant())
        {
            ATS_VALIDATE(n->getConstantValue() >= 1 && n->getConstantValue() <= ATS_SAMPLER_MAX_N,
                "scores has " << n->getConstantValue() << " slots; supported: 1.." << ATS_SAMPLER_MAX_N);
        }
        // K_out = min(k_max, n)
        IDimensionExpr const* kMax = exprBuilder.constant(mKMax);
        ATS_VALIDATE(kMax != nullptr, "exprBuilder.constant failed");
        IDimensionExpr const* kOut = exprBuilder.operation(DimensionOperation::kMIN, *kMax, *n);
        ATS_VALIDATE(kOut != nullptr, "exprBuilder.operation(kMIN) failed");

        outputs[kOUT_INDICES].nbDims = 2;
        outputs[kOUT_INDICES].d[0] = batch;
        outputs[kOUT_COUNT].nbDims = 1;
        outputs[kOUT_COUNT].d[0] = batch;
        if (mMode == SamplerMode::kSTATIC)
        {
            outputs[kOUT_INDICES].d[1] = kOut;
        }
        else
        {
            // s = max(count_out) <= K_out. The auto-tuning value must not depend on a size tensor, and from
            // the second dynamic ATS block on n is the previous block's s: there tune for half the grid's
            // bound, a constant (s <= min(k_max, n_ref)); the first block tunes for K_out itself.
            IDimensionExpr const* opt = n->isConstant()
                ? kOut
                : exprBuilder.constant(std::max<int64_t>(1, std::min<int64_t>(mKMax, mNRef) / 2));
            ATS_VALIDATE(opt != nullptr, "exprBuilder.constant failed");
            IDimensionExpr const* s = exprBuilder.declareSizeTensor(kOUT_SIZE, *opt, *kOut);
            ATS_VALIDATE(s != nullptr, "declareSizeTensor failed");
            outputs[kOUT_INDICES].d[1] = s;
            outputs[kOUT_SIZE].nbDims = 0; // 0-D int64 size tensor
        }
        return 0;
    }
    catch (std::exception const& e)
    {
        logError("getOutputShapes", e);
    }
    return -1;
}

bool AtsSamplerPlugin::supportsFormatCombination(
    int32_t pos, DynamicPluginTensorDesc const* inOut, int32_t nbInputs, int32_t nbOutputs) noexcept
{
    try
    {
        ATS_VALIDATE(inOut != nullptr, "null tensor descriptions");
        ATS_VALIDATE(nbInputs == kNB_INPUTS && nbOutputs == getNbOutputs(), "unexpected input/output count");
        ATS_VALIDATE(pos >= 0 && pos < nbInputs + nbOutputs, "position " << pos << " out of range");
        PluginTensorDesc const& desc = inOut[pos].desc;
        if (desc.format != TensorFormat::kLINEAR)
        {
            return false;
        }
        switch (pos)
        {
        case 0: return desc.type == DataType::kFLOAT;                    // scores
        case 1: return desc.type == DataType::kINT32;                    // count_in
        case 2: return desc.type == DataType::kINT32;                    // indices
        case 3: return desc.type == DataType::kINT32;                    // count_out
        case 4: return desc.type == DataType::kINT64;                    // s (dynamic mode)
        default: return false;
        }
    }
    catch (std::exception const& e)
    {
        logError("supportsFormatCombination", e);
    }
    return false;
}

size_t AtsSamplerPlugin::getWorkspaceSize(DynamicPluginTensorDesc const* inputs, int32_t nbInputs,
    DynamicPluginTensorDesc const* /*outputs*/, int32_t /*nbOutputs*/) const noexcept
{
    try
    {
        if (mMode == SamplerMode::kSTATIC)
        {
            return 0;
        }
        ATS_VALIDATE(inputs != nullptr && nbInputs == kNB_INPUTS, "unexpected inputs");
        // Static-layout rows for the largest shape of the profile; the repack reads them. Where the slot
        // count has no positive bound here (n derived from an earlier size tensor), size for the most
        // slots the kernel takes, so enqueue never finds the workspace too small.
        auto const batch = static_cast<int>(inputs[0].max.d[0]);
        auto const maxN = inputs[0].max.d[1];
        auto const n = maxN >= 1 && maxN <= ATS_SAMPLER_MAX_N ? static_cast<int>(maxN) : ATS_SAMPLER_MAX_N;
        return atsSamplerWorkspaceSize(batch, n, mKMax);
    }
    catch (std::exception const& e)
    {
        logError("getWorkspaceSize", e);
    }
    return 0;
}

int32_t AtsSamplerPlugin::onShapeChange(
    PluginTensorDesc const* in, int32_t nbInputs, PluginTensorDesc const* out, int32_t nbOutputs) noexcept
{
    try
    {
        ATS_VALIDATE(in != nullptr && out != nullptr, "null tensor descriptions");
        ATS_VALIDATE(nbInputs == kNB_INPUTS && nbOutputs == getNbOutputs(), "unexpected input/output count");
        ATS_VALIDATE(in[0].dims.nbDims == 2 && in[1].dims.nbDims == 1, "scores must be [B, n], count_in [B]");
        ATS_VALIDATE(in[0].dims.d[0] == in[1].dims.d[0],
            "scores batch " << in[0].dims.d[0] << " != count_in batch " << in[1].dims.d[0]);
        int32_t const status = ats::kernel::validateShape(static_cast<int>(in[0].dims.d[0]),
            static_cast<int>(in[0].dims.d[1]), mKMax, mNRef);
        ATS_VALIDATE(status == ATS_STATUS_SUCCESS, atsSamplerStatusString(status));
        return 0;
    }
    catch (std::exception const& e)
    {
        logError("onShapeChange", e);
    }
    return -1;
}

int32_t AtsSamplerPlugin::enqueue(PluginTensorDesc const* inputDesc, PluginTensorDesc const* /*outputDesc*/,
    void const* const* inputs, void* const* outputs, void* workspace, cudaStream_t stream) noexcept
{
    try
    {
        ATS_VALIDATE(inputDesc != nullptr && inputs != nullptr && outputs != nullptr, "null buffers");
        int const batch = static_cast<int>(inputDesc[0].dims.d[0]);
        int const n = static_cast<int>(inputDesc[0].dims.d[1]);
        auto const* scores = static_cast<float const*>(inputs[0]);
        auto const* countIn = static_cast<int32_t const*>(inputs[1]);
        auto* indices = static_cast<int32_t*>(outputs[kOUT_INDICES]);
        auto* countOut = static_cast<int32_t*>(outputs[kOUT_COUNT]);
        int status = ATS_STATUS_SUCCESS;
        if (mMode == SamplerMode::kSTATIC)
        {
            status = atsSamplerLaunch(scores, countIn, indices, countOut, batch, n, mKMax, mNRef, stream);
        }
        else
        {
            auto* size = static_cast<int64_t*>(outputs[kOUT_SIZE]);
            // TensorRT sized the workspace for the profile's largest shape (getWorkspaceSize).
            size_t const wsBytes = atsSamplerWorkspaceSize(batch, n, mKMax);
            status = atsSamplerLaunchDynamic(
                scores, countIn, indices, countOut, size, workspace, wsBytes, batch, n, mKMax, mNRef, stream);
        }
        ATS_VALIDATE(status == ATS_STATUS_SUCCESS, "kernel launch failed: " << atsSamplerStatusString(status));
        return 0;
    }
    catch (std::exception const& e)
    {
        logError("enqueue", e);
    }
    return -1;
}

IPluginV3* AtsSamplerPlugin::attachToContext(IPluginResourceContext* /*context*/) noexcept
{
    // No per-context resources: every execution context gets its own copy.
    return clone();
}

PluginFieldCollection const* AtsSamplerPlugin::getFieldsToSerialize() noexcept
{
    try
    {
        mDataToSerialize.clear();
        mDataToSerialize.emplace_back(kFIELD_K_MAX, &mKMax, PluginFieldType::kINT32, 1);
        mDataToSerialize.emplace_back(kFIELD_N_REF, &mNRef, PluginFieldType::kINT32, 1);
        mDataToSerialize.emplace_back(kFIELD_MODE, &mMode, PluginFieldType::kINT32, 1); // int32-backed enum
        mFCToSerialize.nbFields = static_cast<int32_t>(mDataToSerialize.size());
        mFCToSerialize.fields = mDataToSerialize.data();
        return &mFCToSerialize;
    }
    catch (std::exception const& e)
    {
        logError("getFieldsToSerialize", e);
    }
    return nullptr;
}

// ----------------------------------------------------------------------------------------------- creator

AtsSamplerPluginCreator::AtsSamplerPluginCreator()
{
    mFields.emplace_back(kFIELD_K_MAX, nullptr, PluginFieldType::kINT32, 1);
    mFields.emplace_back(kFIELD_N_REF, nullptr, PluginFieldType::kINT32, 1);
    mFields.emplace_back(kFIELD_MODE, nullptr, PluginFieldType::kINT32, 1);
    mFC.nbFields = static_cast<int32_t>(mFields.size());
    mFC.fields = mFields.data();
}

AsciiChar const* AtsSamplerPluginCreator::getPluginName() const noexcept
{
    return kPLUGIN_NAME;
}

AsciiChar const* AtsSamplerPluginCreator::getPluginVersion() const noexcept
{
    return kPLUGIN_VERSION;
}

AsciiChar const* AtsSamplerPluginCreator::getPluginNamespace() const noexcept
{
    return kPLUGIN_NAMESPACE;
}

PluginFieldCollection const* AtsSamplerPluginCreator::getFieldNames() noexcept
{
    return &mFC;
}

IPluginV3* AtsSamplerPluginCreator::createPlugin(
    AsciiChar const* /*name*/, PluginFieldCollection const* fc, TensorRTPhase /*phase*/) noexcept
{
    try
    {
        ATS_VALIDATE(fc != nullptr, "null field collection");
        ATS_VALIDATE(fc->nbFields == 0 || fc->fields != nullptr, "null fields");
        bool haveKMax = false;
        bool haveNRef = false;
        int32_t kMax = 0;
        int32_t nRef = 0;
        int32_t mode = 0; // static unless asked otherwise
        for (int32_t i = 0; i < fc->nbFields; ++i)
        {
            PluginField const& field = fc->fields[i];
            if (field.name == nullptr)
            {
                continue;
            }
            if (std::strcmp(field.name, kFIELD_K_MAX) == 0)
            {
                kMax = readIntField(field);
                haveKMax = true;
            }
            else if (std::strcmp(field.name, kFIELD_N_REF) == 0)
            {
                nRef = readIntField(field);
                haveNRef = true;
            }
            else if (std::strcmp(field.name, kFIELD_MODE) == 0)
            {
                mode = readIntField(field);
            }
        }
        ATS_VALIDATE(haveKMax, "missing field 'k_max'");
        ATS_VALIDATE(haveNRef, "missing field 'n_ref'");
        validateFields(kMax, nRef, mode);
        return new AtsSamplerPlugin(kMax, nRef, static_cast<SamplerMode>(mode));
    }
    catch (std::exception const& e)
    {
        logError("createPlugin", e);
    }
    return nullptr;
}

namespace
{

AtsSamplerPluginCreator& creatorInstance()
{
    static AtsSamplerPluginCreator creator;
    return creator;
}

#if defined(ATS_SELF_REGISTER) && ATS_SELF_REGISTER
//! Load-time registration, what REGISTER_TENSORRT_PLUGIN does, but under namespace "ats": the macro registers
//! with namespace "", which would not match the creator's own namespace and the ONNX node's plugin_namespace.
struct SelfRegistrar
{
    SelfRegistrar()
    {
        IPluginRegistry* registry = ::getPluginRegistry();
        if (registry == nullptr || !registry->registerCreator(creatorInstance(), kPLUGIN_NAMESPACE))
        {
            log(ILogger::Severity::kWARNING, "could not register the creator (already registered?)");
        }
    }
};
SelfRegistrar const gSelfRegistrar{};
#endif

} // namespace

} // namespace plugin
} // namespace ats

// ------------------------------------------------------------------------- library entry points (TRT >= 10)

//! IPluginRegistry::loadLibrary / trtexec --dynamicPlugins: hands over TensorRT's logger finder.
extern "C" ATS_PLUGIN_EXPORT void setLoggerFinder(nvinfer1::ILoggerFinder* finder)
{
    ats::plugin::loggerSlot().set(finder);
}

//! IPluginRegistry::loadLibrary / trtexec --dynamicPlugins: the IPluginV3 creators of this library.
extern "C" ATS_PLUGIN_EXPORT nvinfer1::IPluginCreatorInterface* const* getCreators(int32_t& nbCreators)
{
    static nvinfer1::IPluginCreatorInterface* const kCreators[] = {&ats::plugin::creatorInstance()};
    nbCreators = static_cast<int32_t>(sizeof(kCreators) / sizeof(kCreators[0]));
    return kCreators;
}
