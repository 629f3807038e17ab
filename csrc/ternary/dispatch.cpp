#include "ternary/dispatch.h"

#include <atomic>
#include <cstdlib>

#include "common/cpu.h"
#include "ternary/ternary.h"

namespace nanochat {

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::scalar: return "scalar";
    case Isa::neon: return "neon";
    case Isa::neon_dotprod: return "neon_dotprod";
    case Isa::avx2: return "avx2";
    case Isa::avx_vnni: return "avx_vnni";
    case Isa::avx512: return "avx512";
    case Isa::avx512vnni: return "avx512_vnni";
  }
  return "?";
}

Isa isa_from_name(const std::string& name) {
  std::string names;
  for (Isa i : kAllIsas) {
    if (name == isa_name(i)) return i;
    names += std::string(names.empty() ? "" : ", ") + isa_name(i);
  }
  throw Error("unknown ISA '" + name + "' (expected one of " + names + ")");
}

bool isa_supported(Isa isa) {
  switch (isa) {
    case Isa::scalar: return true;
#ifdef NANOCHAT_HAVE_X86_KERNELS
    case Isa::avx2: return cpu_features().avx2;
    case Isa::avx_vnni: return cpu_features().avx_vnni;
    case Isa::avx512: return cpu_features().avx512bw;
    case Isa::avx512vnni: return cpu_features().avx512vnni;
#endif
#ifdef NANOCHAT_HAVE_ARM_KERNELS
    case Isa::neon: return cpu_features().neon;
    case Isa::neon_dotprod: return cpu_features().dotprod;
#endif
    default: return false;
  }
  return false;
}

std::vector<Isa> supported_isas() {
  std::vector<Isa> out;
  for (Isa i : kAllIsas)
    if (isa_supported(i)) out.push_back(i);
  return out;
}

Isa best_isa() { return supported_isas().back(); }

namespace {

Isa default_isa() {
  if (const char* env = std::getenv("NANOCHAT_ISA")) {
    if (*env) {
      const Isa i = isa_from_name(env);
      if (!isa_supported(i))
        throw Error(std::string("NANOCHAT_ISA=") + env + " is not supported by this CPU/build");
      return i;
    }
  }
  return best_isa();
}

// -1: not chosen yet (read NANOCHAT_ISA lazily so a bad value throws at first use).
std::atomic<int> g_isa{-1};

}  // namespace

Isa active_isa() {
  int v = g_isa.load(std::memory_order_acquire);
  if (v < 0) {
    v = int(default_isa());
    g_isa.store(v, std::memory_order_release);
  }
  return Isa(v);
}

void set_isa(Isa isa) {
  if (!isa_supported(isa))
    throw Error(std::string("ISA ") + isa_name(isa) + " is not supported by this CPU/build");
  g_isa.store(int(isa), std::memory_order_release);
}

void reset_isa() { g_isa.store(-1, std::memory_order_release); }

GemmKernel gemm_kernel(Isa isa) {
  switch (isa) {
#ifdef NANOCHAT_HAVE_X86_KERNELS
    case Isa::avx2: return gemm_avx2;
    case Isa::avx_vnni: return gemm_avxvnni;
    case Isa::avx512: return gemm_avx512;
    case Isa::avx512vnni: return gemm_avx512vnni;
#endif
#ifdef NANOCHAT_HAVE_ARM_KERNELS
    case Isa::neon: return gemm_neon;
    case Isa::neon_dotprod:
      return cpu_features().i8mm && cpu_features().dotprod ? gemm_neon_i8mm : gemm_neon_dotprod;
#endif
    default: return gemm_scalar;
  }
}

}  // namespace nanochat
