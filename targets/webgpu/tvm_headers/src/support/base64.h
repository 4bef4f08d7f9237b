// edgeslm's own minimal stand-in (not copied): base64 Streams over another Stream (RFC 4648
// alphabet, '=' padding), for the runtime's tensor-to-JSON hooks.
#ifndef EDGESLM_TVM_SRC_SUPPORT_BASE64_H_
#define EDGESLM_TVM_SRC_SUPPORT_BASE64_H_
#include <tvm/support/io.h>

#include <cstdint>
#include <string>

namespace tvm {
namespace support {
namespace b64 {
inline const char* Alphabet() { return "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"; }
inline int Value(char c) {
  if (c >= 'A' && c <= 'Z') return c - 'A';
  if (c >= 'a' && c <= 'z') return c - 'a' + 26;
  if (c >= '0' && c <= '9') return c - '0' + 52;
  if (c == '+') return 62;
  if (c == '/') return 63;
  return -1;
}
}  // namespace b64

class Base64OutStream : public Stream {
 public:
  using Stream::Read;
  using Stream::Write;
  explicit Base64OutStream(Stream* out) : out_(out) {}
  size_t Read(void*, size_t) override { return 0; }
  size_t Write(const void* ptr, size_t size) override {
    const uint8_t* p = static_cast<const uint8_t*>(ptr);
    for (size_t i = 0; i < size; ++i) {
      pending_[npending_++] = p[i];
      if (npending_ == 3) Flush3();
    }
    return size;
  }
  /*! \brief Emits the last partial group with '=' padding. */
  void Finish() {
    if (npending_ == 0) return;
    uint8_t b0 = pending_[0], b1 = npending_ > 1 ? pending_[1] : 0;
    char c[4] = {b64::Alphabet()[b0 >> 2], b64::Alphabet()[((b0 & 3) << 4) | (b1 >> 4)],
                 npending_ > 1 ? b64::Alphabet()[(b1 & 15) << 2] : '=', '='};
    out_->Write(static_cast<const void*>(c), 4);
    npending_ = 0;
  }

 private:
  void Flush3() {
    uint32_t v = (uint32_t(pending_[0]) << 16) | (uint32_t(pending_[1]) << 8) | pending_[2];
    char c[4];
    for (int i = 0; i < 4; ++i) c[i] = b64::Alphabet()[(v >> (18 - 6 * i)) & 63];
    out_->Write(static_cast<const void*>(c), 4);
    npending_ = 0;
  }
  Stream* out_;
  uint8_t pending_[3];
  int npending_ = 0;
};

class Base64InStream : public Stream {
 public:
  using Stream::Read;
  using Stream::Write;
  explicit Base64InStream(Stream* in) : in_(in) {}
  /*! \brief Kept for the runtime's call sequence; decoding starts lazily. */
  void InitPosition() {}
  size_t Write(const void*, size_t) override { return 0; }
  size_t Read(void* ptr, size_t size) override {
    uint8_t* p = static_cast<uint8_t*>(ptr);
    size_t n = 0;
    while (n < size) {
      if (pos_ == len_ && !Refill()) break;
      p[n++] = decoded_[pos_++];
    }
    return n;
  }

 private:
  bool Refill() {  // decodes the next 4 significant characters
    char c[4];
    int got = 0;
    while (got < 4) {
      char ch;
      if (in_->Read(&ch, 1) != 1) return false;
      if (ch == '=' || b64::Value(ch) >= 0) c[got++] = ch;
    }
    uint32_t v = 0;
    int valid = 0;
    for (int i = 0; i < 4; ++i) {
      int x = c[i] == '=' ? 0 : b64::Value(c[i]);
      if (c[i] != '=') ++valid;
      v = (v << 6) | uint32_t(x);
    }
    decoded_[0] = uint8_t(v >> 16);
    decoded_[1] = uint8_t(v >> 8);
    decoded_[2] = uint8_t(v);
    len_ = valid - 1;
    pos_ = 0;
    return len_ > 0;
  }
  Stream* in_;
  uint8_t decoded_[3];
  int len_ = 0, pos_ = 0;
};

}  // namespace support
}  // namespace tvm
#endif  // EDGESLM_TVM_SRC_SUPPORT_BASE64_H_
