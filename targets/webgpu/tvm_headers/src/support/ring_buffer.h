// edgeslm's own minimal stand-in (not copied): the FIFO byte queue the RPC endpoint uses.
// A deque-backed queue is enough here: the browser runner never drives RPC.
#ifndef EDGESLM_TVM_SRC_SUPPORT_RING_BUFFER_H_
#define EDGESLM_TVM_SRC_SUPPORT_RING_BUFFER_H_
#include <algorithm>
#include <cstddef>
#include <cstring>
#include <deque>
#include <vector>
namespace tvm {
namespace support {
class RingBuffer {
 public:
  size_t bytes_available() const { return data_.size(); }
  void Reserve(size_t) {}
  void Read(void* out, size_t size) {
    char* dst = static_cast<char*>(out);
    std::copy(data_.begin(), data_.begin() + size, dst);
    data_.erase(data_.begin(), data_.begin() + size);
  }
  void Write(const void* in, size_t size) {
    const char* src = static_cast<const char*>(in);
    data_.insert(data_.end(), src, src + size);
  }
  /*! \brief Hands up to max_nbytes queued bytes to f(const void*, size_t) -> consumed count. */
  template <typename F>
  size_t ReadWithCallback(F f, size_t max_nbytes) {
    size_t n = std::min(max_nbytes, data_.size());
    std::vector<char> tmp(data_.begin(), data_.begin() + n);
    size_t used = f(tmp.data(), n);
    data_.erase(data_.begin(), data_.begin() + used);
    return used;
  }
  /*! \brief Lets f(void*, size_t) -> produced count fill up to max_nbytes, then queues them. */
  template <typename F>
  size_t WriteWithCallback(F f, size_t max_nbytes) {
    std::vector<char> tmp(max_nbytes);
    size_t got = f(tmp.data(), max_nbytes);
    data_.insert(data_.end(), tmp.begin(), tmp.begin() + got);
    return got;
  }

 private:
  std::deque<char> data_;
};
}  // namespace support
}  // namespace tvm
#endif  // EDGESLM_TVM_SRC_SUPPORT_RING_BUFFER_H_
