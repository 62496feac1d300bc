#include "ieee_float32.h"

#include <torch/version.h>

#include <mutex>

namespace glow_ext {
namespace {

// The precision settings are process-wide (torch has no thread-local scope for them), so the first
// of any overlapping scopes, in any thread, saves and overrides them and the last restores them.
// Meanwhile other threads' float32 products run in IEEE too: slower, never less exact.
std::mutex scope_mutex;
int open_scopes = 0;

#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 9)
// Per-backend settings: a backend's matmul setting, else its ALL setting, else the generic one.
using at::Float32Backend;
using at::Float32Op;
using at::Float32Precision;
constexpr Float32Backend kBackends[] = {Float32Backend::CUDA, Float32Backend::MKLDNN};
Float32Precision saved[2];

bool reduced(Float32Backend backend) {
  auto& context = at::globalContext();
  for (const auto& [b, op] : {std::pair{backend, Float32Op::MATMUL}, std::pair{backend, Float32Op::ALL},
                              std::pair{Float32Backend::GENERIC, Float32Op::ALL}}) {
    const auto precision = context.float32Precision(b, op);
    if (precision == Float32Precision::TF32 || precision == Float32Precision::BF16) return true;
    if (precision == Float32Precision::IEEE) return false;
  }
  return false;
}

bool lower_settings() {
  if (!reduced(Float32Backend::CUDA) && !reduced(Float32Backend::MKLDNN)) return false;
  auto& context = at::globalContext();
  for (int i = 0; i < 2; ++i) {
    saved[i] = context.float32Precision(kBackends[i], Float32Op::MATMUL);
    context.setFloat32Precision(kBackends[i], Float32Op::MATMUL, Float32Precision::IEEE);
  }
  return true;
}

void restore_settings() {
  for (int i = 0; i < 2; ++i) {
    at::globalContext().setFloat32Precision(kBackends[i], Float32Op::MATMUL, saved[i]);
  }
}
#else
// One generic setting: set_float32_matmul_precision.
at::Float32MatmulPrecision saved = at::Float32MatmulPrecision::HIGHEST;

bool lower_settings() {
  saved = at::globalContext().float32MatmulPrecision();
  if (saved == at::Float32MatmulPrecision::HIGHEST) return false;
  at::globalContext().setFloat32MatmulPrecision("highest");
  return true;
}

void restore_settings() {
  at::globalContext().setFloat32MatmulPrecision(saved == at::Float32MatmulPrecision::HIGH ? "high"
                                                                                         : "medium");
}
#endif

bool lowered = false;  // whether the open scopes hold overridden settings

}  // namespace

IeeeFloat32Scope::IeeeFloat32Scope() {
  const std::lock_guard<std::mutex> lock(scope_mutex);
  if (open_scopes++ == 0) lowered = lower_settings();
}

IeeeFloat32Scope::~IeeeFloat32Scope() {
  const std::lock_guard<std::mutex> lock(scope_mutex);
  if (--open_scopes == 0 && lowered) {
    restore_settings();
    lowered = false;
  }
}

}  // namespace glow_ext
