// The warp specialisation both tier-2 kernels use: warpgroup 0 is the producer (TMA loads),
// warpgroups 1 and 2 are consumers (wgmma), with the register split that setmaxnreg sets up.
// Each kernel writes the split inline (setmaxnreg_dec at the top of the producer's branch,
// setmaxnreg_inc after it): ptxas sizes a warpgroup's code by the setmaxnreg that dominates it,
// and a helper returning the role (both paths meeting again before the branch on it) left the
// consumers at the launch cap of 168 registers, with hundreds of bytes of spills.
#pragma once

namespace ringattn {
namespace cuda {
namespace sm90 {

struct WarpSpecialization {
  static constexpr int kNumConsumerWarpgroups = 2;
  static constexpr int kThreads = 128 * (1 + kNumConsumerWarpgroups);
  static constexpr int kConsumerWarps = 4 * kNumConsumerWarpgroups;
  static constexpr int kProducerRegs = 24;
  static constexpr int kConsumerRegs = 240;
  // setmaxnreg moves registers between warpgroups within what the launch allocated (the
  // __launch_bounds__(kThreads, 1) cap, 65536 / kThreads rounded down to 8): the consumers can
  // only grow by what the producer gives back, or setmaxnreg.inc waits forever.
  static constexpr int kLaunchRegs = (65536 / kThreads) / 8 * 8;
  static_assert(128 * (kLaunchRegs - kProducerRegs) >= 128 * kNumConsumerWarpgroups * (kConsumerRegs - kLaunchRegs),
                "setmaxnreg: the consumers ask for more registers than the producer frees");
};

}  // namespace sm90
}  // namespace cuda
}  // namespace ringattn
