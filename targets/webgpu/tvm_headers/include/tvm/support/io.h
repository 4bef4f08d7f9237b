// edgeslm's own minimal stand-in for a header the apache-tvm 0.27 wheel does not ship.
// Written for edgeslm (not copied): just what the TVM web runtime sources need to compile.
//
// A byte Stream plus a Serializer<T> trait. The byte layout is the one TVM's compiler side writes
// (the dmlc convention): trivially copyable values as raw little-endian bytes; strings and
// sequences as a uint64 count followed by the items; maps as a uint64 count of (key, value)
// pairs. The VM executable and WebGPU shader table embedded in a compiled model are read with it,
// so this layout must match exactly.
#ifndef EDGESLM_TVM_SUPPORT_IO_H_
#define EDGESLM_TVM_SUPPORT_IO_H_

#include <tvm/ffi/container/array.h>
#include <tvm/ffi/container/map.h>
#include <tvm/ffi/string.h>

#include <cstddef>
#include <cstdint>
#include <map>
#include <string>
#include <type_traits>
#include <unordered_map>
#include <utility>
#include <vector>

namespace tvm {
namespace support {

template <typename T, typename Enable = void>
struct Serializer;

class Stream {
 public:
  virtual ~Stream() = default;
  /*! \brief Reads up to size bytes; returns how many were read. */
  virtual size_t Read(void* ptr, size_t size) = 0;
  /*! \brief Writes size bytes; returns how many were written. */
  virtual size_t Write(const void* ptr, size_t size) = 0;

  template <typename T>
  void Write(const T& value) {
    Serializer<T>::Write(this, value);
  }
  template <typename T>
  bool Read(T* out) {
    return Serializer<T>::Read(this, out);
  }
  template <typename T>
  void WriteArray(const T* data, size_t n) {
    if constexpr (std::is_trivially_copyable_v<T>) {
      if (n) this->Write(static_cast<const void*>(data), sizeof(T) * n);
    } else {
      for (size_t i = 0; i < n; ++i) this->Write<T>(data[i]);
    }
  }
  template <typename T>
  bool ReadArray(T* data, size_t n) {
    if constexpr (std::is_trivially_copyable_v<T>) {
      return n == 0 || this->Read(static_cast<void*>(data), sizeof(T) * n) == sizeof(T) * n;
    } else {
      for (size_t i = 0; i < n; ++i) {
        if (!this->Read<T>(data + i)) return false;
      }
      return true;
    }
  }
};

// Raw bytes for numbers, enums and plain structs (DLDataType, DLDevice).
template <typename T>
struct Serializer<T, std::enable_if_t<std::is_trivially_copyable_v<T>>> {
  static constexpr bool enabled = true;
  static void Write(Stream* s, const T& v) { s->Write(static_cast<const void*>(&v), sizeof(T)); }
  static bool Read(Stream* s, T* v) { return s->Read(static_cast<void*>(v), sizeof(T)) == sizeof(T); }
};

namespace detail {
inline void WriteCount(Stream* s, uint64_t n) { s->Write(static_cast<const void*>(&n), sizeof(n)); }
inline bool ReadCount(Stream* s, uint64_t* n) {
  return s->Read(static_cast<void*>(n), sizeof(*n)) == sizeof(*n);
}
inline void WriteBytes(Stream* s, const char* data, size_t n) {
  WriteCount(s, n);
  if (n) s->Write(static_cast<const void*>(data), n);
}
inline bool ReadBytes(Stream* s, std::string* out) {
  uint64_t n;
  if (!ReadCount(s, &n)) return false;
  out->resize(n);
  return n == 0 || s->Read(&(*out)[0], n) == n;
}
}  // namespace detail

template <>
struct Serializer<std::string> {
  static constexpr bool enabled = true;
  static void Write(Stream* s, const std::string& v) { detail::WriteBytes(s, v.data(), v.size()); }
  static bool Read(Stream* s, std::string* v) { return detail::ReadBytes(s, v); }
};

template <>
struct Serializer<ffi::String> {
  static constexpr bool enabled = true;
  static void Write(Stream* s, const ffi::String& v) { detail::WriteBytes(s, v.data(), v.size()); }
  static bool Read(Stream* s, ffi::String* v) {
    std::string tmp;
    if (!detail::ReadBytes(s, &tmp)) return false;
    *v = ffi::String(std::move(tmp));
    return true;
  }
};

template <typename A, typename B>
struct Serializer<std::pair<A, B>> {
  static constexpr bool enabled = true;
  static void Write(Stream* s, const std::pair<A, B>& v) {
    Serializer<A>::Write(s, v.first);
    Serializer<B>::Write(s, v.second);
  }
  static bool Read(Stream* s, std::pair<A, B>* v) {
    return Serializer<A>::Read(s, &v->first) && Serializer<B>::Read(s, &v->second);
  }
};

template <typename T, typename Alloc>
struct Serializer<std::vector<T, Alloc>> {
  static constexpr bool enabled = true;
  static void Write(Stream* s, const std::vector<T, Alloc>& v) {
    detail::WriteCount(s, v.size());
    s->WriteArray(v.data(), v.size());
  }
  static bool Read(Stream* s, std::vector<T, Alloc>* v) {
    uint64_t n;
    if (!detail::ReadCount(s, &n)) return false;
    v->resize(n);
    return s->ReadArray(v->data(), n);
  }
};

template <typename T>
struct Serializer<ffi::Array<T>> {
  static constexpr bool enabled = true;
  static void Write(Stream* s, const ffi::Array<T>& v) {
    detail::WriteCount(s, v.size());
    for (const T& item : v) Serializer<T>::Write(s, item);
  }
  static bool Read(Stream* s, ffi::Array<T>* v) {
    uint64_t n;
    if (!detail::ReadCount(s, &n)) return false;
    std::vector<T> items;
    items.reserve(n);
    for (uint64_t i = 0; i < n; ++i) {
      T item;
      if (!Serializer<T>::Read(s, &item)) return false;
      items.push_back(std::move(item));
    }
    *v = ffi::Array<T>(items.begin(), items.end());
    return true;
  }
};

namespace detail {
template <typename K, typename V, typename MapT>
void WriteMap(Stream* s, const MapT& m) {
  WriteCount(s, m.size());
  for (const auto& kv : m) {
    Serializer<K>::Write(s, kv.first);
    Serializer<V>::Write(s, kv.second);
  }
}
template <typename K, typename V, typename Insert>
bool ReadMap(Stream* s, Insert insert) {
  uint64_t n;
  if (!ReadCount(s, &n)) return false;
  for (uint64_t i = 0; i < n; ++i) {
    K key;
    V value;
    if (!Serializer<K>::Read(s, &key) || !Serializer<V>::Read(s, &value)) return false;
    insert(std::move(key), std::move(value));
  }
  return true;
}
}  // namespace detail

template <typename K, typename V, typename... Rest>
struct Serializer<std::unordered_map<K, V, Rest...>> {
  static constexpr bool enabled = true;
  using MapT = std::unordered_map<K, V, Rest...>;
  static void Write(Stream* s, const MapT& m) { detail::WriteMap<K, V>(s, m); }
  static bool Read(Stream* s, MapT* m) {
    m->clear();
    return detail::ReadMap<K, V>(s, [m](K k, V v) { (*m)[std::move(k)] = std::move(v); });
  }
};

template <typename K, typename V, typename... Rest>
struct Serializer<std::map<K, V, Rest...>> {
  static constexpr bool enabled = true;
  using MapT = std::map<K, V, Rest...>;
  static void Write(Stream* s, const MapT& m) { detail::WriteMap<K, V>(s, m); }
  static bool Read(Stream* s, MapT* m) {
    m->clear();
    return detail::ReadMap<K, V>(s, [m](K k, V v) { (*m)[std::move(k)] = std::move(v); });
  }
};

template <typename K, typename V>
struct Serializer<ffi::Map<K, V>> {
  static constexpr bool enabled = true;
  static void Write(Stream* s, const ffi::Map<K, V>& m) { detail::WriteMap<K, V>(s, m); }
  static bool Read(Stream* s, ffi::Map<K, V>* m) {
    ffi::Map<K, V> out;
    bool ok = detail::ReadMap<K, V>(s, [&out](K k, V v) { out.Set(std::move(k), std::move(v)); });
    *m = std::move(out);
    return ok;
  }
};

}  // namespace support
}  // namespace tvm

#endif  // EDGESLM_TVM_SUPPORT_IO_H_
