// edgeslm's own minimal stand-in (not copied): the Serializer trait lives with Stream in io.h.
#ifndef EDGESLM_TVM_SUPPORT_SERIALIZER_H_
#define EDGESLM_TVM_SUPPORT_SERIALIZER_H_
#include <tvm/support/io.h>
#endif  // EDGESLM_TVM_SUPPORT_SERIALIZER_H_
