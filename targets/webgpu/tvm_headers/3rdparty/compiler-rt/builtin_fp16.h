// edgeslm's own minimal stand-in (not copied): widening between IEEE binary formats, used by
// the runtime's sort for float16 keys. Written from the IEEE 754 layout, not from compiler-rt.
#ifndef EDGESLM_TVM_BUILTIN_FP16_H_
#define EDGESLM_TVM_BUILTIN_FP16_H_
#include <cstdint>
#include <cstring>

// Converts a narrow float (given as its bit pattern) to a wider float type.
template <typename SRC_T, typename SRC_REP_T, int SRC_SIG_BITS, typename DST_T, typename DST_REP_T,
          int DST_SIG_BITS>
static inline DST_T __extendXfYf2__(SRC_REP_T a) {
  constexpr int src_bits = sizeof(SRC_REP_T) * 8, dst_bits = sizeof(DST_REP_T) * 8;
  constexpr int src_exp_bits = src_bits - SRC_SIG_BITS - 1, dst_exp_bits = dst_bits - DST_SIG_BITS - 1;
  constexpr int src_bias = (1 << (src_exp_bits - 1)) - 1, dst_bias = (1 << (dst_exp_bits - 1)) - 1;
  constexpr SRC_REP_T src_sig_mask = (SRC_REP_T(1) << SRC_SIG_BITS) - 1;
  constexpr SRC_REP_T src_exp_max = (SRC_REP_T(1) << src_exp_bits) - 1;
  DST_REP_T sign = DST_REP_T((a >> (src_bits - 1)) & 1) << (dst_bits - 1);
  SRC_REP_T exp = (a >> SRC_SIG_BITS) & src_exp_max;
  DST_REP_T sig = DST_REP_T(a & src_sig_mask);
  DST_REP_T out;
  if (exp == src_exp_max) {  // inf / nan
    out = (((DST_REP_T(1) << dst_exp_bits) - 1) << DST_SIG_BITS) | (sig << (DST_SIG_BITS - SRC_SIG_BITS));
  } else if (exp != 0) {  // normal
    out = (DST_REP_T(exp - src_bias + dst_bias) << DST_SIG_BITS) | (sig << (DST_SIG_BITS - SRC_SIG_BITS));
  } else if (sig == 0) {  // zero
    out = 0;
  } else {  // subnormal source: normalise
    int e = 1 - src_bias;
    while (!(sig & (DST_REP_T(1) << SRC_SIG_BITS))) {
      sig <<= 1;
      --e;
    }
    sig &= DST_REP_T(src_sig_mask);
    out = (DST_REP_T(e + dst_bias) << DST_SIG_BITS) | (sig << (DST_SIG_BITS - SRC_SIG_BITS));
  }
  out |= sign;
  DST_T result;
  std::memcpy(&result, &out, sizeof(result));
  return result;
}
#endif  // EDGESLM_TVM_BUILTIN_FP16_H_
