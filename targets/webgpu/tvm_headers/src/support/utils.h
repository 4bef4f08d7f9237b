// edgeslm's own minimal stand-in (not copied): the string helpers the runtime sources call.
#ifndef EDGESLM_TVM_SRC_SUPPORT_UTILS_H_
#define EDGESLM_TVM_SRC_SUPPORT_UTILS_H_
#include <string>
#include <vector>
namespace tvm {
namespace support {
inline bool StartsWith(const std::string& s, const std::string& prefix) {
  return s.size() >= prefix.size() && s.compare(0, prefix.size(), prefix) == 0;
}
inline bool EndsWith(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}
inline std::vector<std::string> Split(const std::string& s, char sep) {
  std::vector<std::string> parts(1);
  for (char c : s) {
    if (c == sep) parts.emplace_back(); else parts.back() += c;
  }
  return parts;
}
}  // namespace support
}  // namespace tvm
#endif  // EDGESLM_TVM_SRC_SUPPORT_UTILS_H_
