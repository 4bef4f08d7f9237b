// edgeslm's own minimal stand-in (not copied): a recycle-all scratch allocator for the RPC code.
#ifndef EDGESLM_TVM_SRC_SUPPORT_ARENA_H_
#define EDGESLM_TVM_SRC_SUPPORT_ARENA_H_
#include <cstddef>
#include <memory>
#include <type_traits>
#include <vector>
namespace tvm {
namespace support {
class Arena {
 public:
  /*! \brief Storage for count default-constructed-free T, valid until RecycleAll. */
  template <typename T>
  T* allocate_(size_t count = 1) {
    static_assert(std::is_trivially_destructible<T>::value, "arena holds plain data only");
    size_t bytes = sizeof(T) * (count ? count : 1) + alignof(std::max_align_t);
    blocks_.emplace_back(new char[bytes]);
    void* p = blocks_.back().get();
    size_t space = bytes;
    return static_cast<T*>(std::align(alignof(std::max_align_t), sizeof(T) * count, p, space));
  }
  void RecycleAll() { blocks_.clear(); }

 private:
  std::vector<std::unique_ptr<char[]>> blocks_;
};
}  // namespace support
}  // namespace tvm
#endif  // EDGESLM_TVM_SRC_SUPPORT_ARENA_H_
