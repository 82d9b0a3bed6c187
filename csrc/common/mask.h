// The attention mask of a (group, sequence): which keys each query row sees. Shared by the GPU
// kernels, their work-list schedulers and the CPU backend, so every layer agrees on one definition.
#pragma once

namespace ringattn {

// Mask modes the kernels are instantiated for (a template parameter of every kernel).
enum class MaskMode : int {
  kNone = 0,    // every key of the sequence
  kCausal = 1,  // bottom-right aligned: query i of Lq sees key j of Lk iff j <= i + Lk - Lq
};

}  // namespace ringattn
