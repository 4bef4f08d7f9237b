// edgeslm's own minimal stand-in (not copied): Streams over an in-memory byte string.
#ifndef EDGESLM_TVM_SRC_SUPPORT_BYTES_IO_H_
#define EDGESLM_TVM_SRC_SUPPORT_BYTES_IO_H_
#include <tvm/support/io.h>

#include <algorithm>
#include <cstring>
#include <string>

namespace tvm {
namespace support {

/*! \brief Reads from bytes the caller keeps alive (std::string, ffi::Bytes, ffi::String). */
class BytesInStream : public Stream {
 public:
  using Stream::Read;
  using Stream::Write;
  template <typename Bytes>
  explicit BytesInStream(const Bytes& bytes) : data_(bytes.data()), size_(bytes.size()) {}
  BytesInStream(const char* data, size_t size) : data_(data), size_(size) {}
  size_t Read(void* ptr, size_t size) override {
    size_t n = std::min(size, size_ - pos_);
    if (n) std::memcpy(ptr, data_ + pos_, n);
    pos_ += n;
    return n;
  }
  size_t Write(const void*, size_t) override { return 0; }  // read-only
  bool AtEnd() const { return pos_ == size_; }
  size_t Tell() const { return pos_; }

 private:
  const char* data_;
  size_t size_;
  size_t pos_ = 0;
};

/*! \brief Appends to a std::string owned by the caller. */
class BytesOutStream : public Stream {
 public:
  using Stream::Read;
  using Stream::Write;
  explicit BytesOutStream(std::string* out) : out_(out) {}
  size_t Read(void*, size_t) override { return 0; }  // write-only
  size_t Write(const void* ptr, size_t size) override {
    out_->append(static_cast<const char*>(ptr), size);
    return size;
  }

 private:
  std::string* out_;
};

}  // namespace support
}  // namespace tvm
#endif  // EDGESLM_TVM_SRC_SUPPORT_BYTES_IO_H_
