// The CUDA backend of a build without the CUDA toolkit (RINGATTN_ENABLE_CUDA=OFF): every entry
// reports that GPU kernels are not compiled in.
#include "common/backends.h"
#include "common/error.h"

namespace ringattn {
namespace cuda {
namespace {
ringattn_status not_compiled() {
  return fail(RINGATTN_STATUS_UNSUPPORTED,
              "this libringattn was built without CUDA (RINGATTN_ENABLE_CUDA=OFF); rebuild it with the CUDA "
              "toolkit to run on a GPU");
}
}  // namespace

bool compiled() { return false; }
int compiled_archs(int*, int) { return 0; }
bool supports_head_dim(int) { return false; }
ringattn_status check_support(int, int, int) { return not_compiled(); }
ringattn_status fwd_workspace_size(const ringattn_fwd_params&, size_t*) { return not_compiled(); }
ringattn_status bwd_workspace_size(const ringattn_bwd_params&, size_t*) { return not_compiled(); }
ringattn_status grouped_fwd(const ringattn_fwd_params&) { return not_compiled(); }
ringattn_status grouped_bwd(const ringattn_bwd_params&) { return not_compiled(); }
ringattn_status copy_to_host(const int32_t*, int, int32_t*, int, void*) { return not_compiled(); }
}  // namespace cuda
}  // namespace ringattn
