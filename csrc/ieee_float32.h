// A scope in which float32 matrix products (cuBLAS, oneDNN) run in IEEE float32, whatever torch's
// global precision settings say: torch.backends.cuda.matmul.allow_tf32, the fp32_precision flags
// ("tf32", "bf16") and torch.set_float32_matmul_precision("high"/"medium"). Under them our exact
// algebra (folds, inverse maps, chain rule, factored passes) loses three orders of magnitude: with
// oneDNN's bf16 matmuls the CPU round trip at C = 512 was 1.8e-1 instead of 2.5e-5.
#pragma once

#include <ATen/Context.h>

namespace glow_ext {

class IeeeFloat32Scope {
 public:
  IeeeFloat32Scope();
  ~IeeeFloat32Scope();
  IeeeFloat32Scope(const IeeeFloat32Scope&) = delete;
  IeeeFloat32Scope& operator=(const IeeeFloat32Scope&) = delete;

 private:
  at::NoTF32Guard no_tf32_;  // thread-local: cuBLAS's allow_tf32 flag
};

}  // namespace glow_ext
