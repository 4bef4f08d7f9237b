// edgeslm's own minimal stand-in (not copied): NVTX ranges mean nothing in a browser, so the
// scoped range is a no-op.
#ifndef EDGESLM_TVM_SUPPORT_CUDA_NVTX_H_
#define EDGESLM_TVM_SUPPORT_CUDA_NVTX_H_
#include <string>
namespace tvm {
namespace support {
class NVTXScopedRange {
 public:
  explicit NVTXScopedRange(const char*) {}
  explicit NVTXScopedRange(const std::string&) {}
  NVTXScopedRange(const NVTXScopedRange&) = delete;
  NVTXScopedRange& operator=(const NVTXScopedRange&) = delete;
};
}  // namespace support
}  // namespace tvm
#endif  // EDGESLM_TVM_SUPPORT_CUDA_NVTX_H_
