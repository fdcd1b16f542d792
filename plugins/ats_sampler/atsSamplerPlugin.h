/*
 * atsSamplerPlugin.h: TensorRT IPluginV3 "AdaptiveTokenSampler" (version "1", namespace "ats").
 *
 * The plugin selects, the graph moves data (docs/ATS_RULE.md section 4): inputs scores [B, n] float32 and
 * count_in [B] int32; outputs indices and count_out as produced by the kernel C API (atsSampler.h).
 * Fields: k_max, n_ref, mode (INT32; mode 0 static [B, K_out] indices, mode 1 dynamic [B, s] indices plus a
 * 0-D int64 size tensor s = max(count_out) declared with IExprBuilder::declareSizeTensor).
 * Needs TensorRT >= 10.0 (IPluginV3, size tensors); written against the 10.3 and 11.x headers.
 */
#ifndef ATS_SAMPLER_PLUGIN_H
#define ATS_SAMPLER_PLUGIN_H

#include "NvInfer.h"
#include "NvInferRuntime.h"

#include <cstdint>
#include <vector>

namespace ats
{
namespace plugin
{

//! Registered identity; ats_deploy/exporters/plugin_lib.py mirrors these (tests check they agree).
constexpr char const* kPLUGIN_NAME{"AdaptiveTokenSampler"};
constexpr char const* kPLUGIN_VERSION{"1"};
constexpr char const* kPLUGIN_NAMESPACE{"ats"};
//! Field (ONNX attribute) names.
constexpr char const* kFIELD_K_MAX{"k_max"};
constexpr char const* kFIELD_N_REF{"n_ref"};
constexpr char const* kFIELD_MODE{"mode"};

enum class SamplerMode : int32_t
{
    kSTATIC = 0,  //!< indices [B, K_out], count_out [B]
    kDYNAMIC = 1, //!< indices [B, s], count_out [B], s (0-D int64 size tensor)
};

class AtsSamplerPlugin : public nvinfer1::IPluginV3,
                         public nvinfer1::IPluginV3OneCore,
                         public nvinfer1::IPluginV3OneBuild,
                         public nvinfer1::IPluginV3OneRuntime
{
public:
    AtsSamplerPlugin(int32_t kMax, int32_t nRef, SamplerMode mode);
    AtsSamplerPlugin(AtsSamplerPlugin const& other);
    AtsSamplerPlugin& operator=(AtsSamplerPlugin const&) = delete;
    ~AtsSamplerPlugin() override = default;

    // IPluginV3
    nvinfer1::IPluginCapability* getCapabilityInterface(nvinfer1::PluginCapabilityType type) noexcept override;
    nvinfer1::IPluginV3* clone() noexcept override;

    // IPluginV3OneCore
    nvinfer1::AsciiChar const* getPluginName() const noexcept override;
    nvinfer1::AsciiChar const* getPluginVersion() const noexcept override;
    nvinfer1::AsciiChar const* getPluginNamespace() const noexcept override;

    // IPluginV3OneBuild
    int32_t configurePlugin(nvinfer1::DynamicPluginTensorDesc const* in, int32_t nbInputs,
        nvinfer1::DynamicPluginTensorDesc const* out, int32_t nbOutputs) noexcept override;
    int32_t getOutputDataTypes(nvinfer1::DataType* outputTypes, int32_t nbOutputs,
        nvinfer1::DataType const* inputTypes, int32_t nbInputs) const noexcept override;
    int32_t getOutputShapes(nvinfer1::DimsExprs const* inputs, int32_t nbInputs,
        nvinfer1::DimsExprs const* shapeInputs, int32_t nbShapeInputs, nvinfer1::DimsExprs* outputs,
        int32_t nbOutputs, nvinfer1::IExprBuilder& exprBuilder) noexcept override;
    bool supportsFormatCombination(int32_t pos, nvinfer1::DynamicPluginTensorDesc const* inOut, int32_t nbInputs,
        int32_t nbOutputs) noexcept override;
    int32_t getNbOutputs() const noexcept override;
    size_t getWorkspaceSize(nvinfer1::DynamicPluginTensorDesc const* inputs, int32_t nbInputs,
        nvinfer1::DynamicPluginTensorDesc const* outputs, int32_t nbOutputs) const noexcept override;

    // IPluginV3OneRuntime
    int32_t onShapeChange(nvinfer1::PluginTensorDesc const* in, int32_t nbInputs,
        nvinfer1::PluginTensorDesc const* out, int32_t nbOutputs) noexcept override;
    int32_t enqueue(nvinfer1::PluginTensorDesc const* inputDesc, nvinfer1::PluginTensorDesc const* outputDesc,
        void const* const* inputs, void* const* outputs, void* workspace, cudaStream_t stream) noexcept override;
    nvinfer1::IPluginV3* attachToContext(nvinfer1::IPluginResourceContext* context) noexcept override;
    nvinfer1::PluginFieldCollection const* getFieldsToSerialize() noexcept override;

private:
    static constexpr int32_t kNB_INPUTS = 2;

    int32_t mKMax;
    int32_t mNRef;
    SamplerMode mMode;
    //! Rebuilt by getFieldsToSerialize() so the pointers always refer to this object's members.
    std::vector<nvinfer1::PluginField> mDataToSerialize;
    nvinfer1::PluginFieldCollection mFCToSerialize{};
};

class AtsSamplerPluginCreator : public nvinfer1::IPluginCreatorV3One
{
public:
    AtsSamplerPluginCreator();
    ~AtsSamplerPluginCreator() override = default;

    nvinfer1::AsciiChar const* getPluginName() const noexcept override;
    nvinfer1::AsciiChar const* getPluginVersion() const noexcept override;
    nvinfer1::AsciiChar const* getPluginNamespace() const noexcept override;
    nvinfer1::PluginFieldCollection const* getFieldNames() noexcept override;
    nvinfer1::IPluginV3* createPlugin(nvinfer1::AsciiChar const* name, nvinfer1::PluginFieldCollection const* fc,
        nvinfer1::TensorRTPhase phase) noexcept override;

private:
    std::vector<nvinfer1::PluginField> mFields;
    nvinfer1::PluginFieldCollection mFC{};
};

} // namespace plugin
} // namespace ats

#endif // ATS_SAMPLER_PLUGIN_H
