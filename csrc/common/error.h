// Thread-local last-error state behind ringattn_last_error().
#pragma once

#include <string>

#include "ringattn/ringattn.h"

namespace ringattn {

// Records `message` as this thread's last error and returns `status`, so call sites read
// `return fail(RINGATTN_STATUS_INVALID_ARGUMENT, "...")`.
ringattn_status fail(ringattn_status status, const std::string& message);

// printf-style convenience.
ringattn_status failf(ringattn_status status, const char* fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 2, 3)))
#endif
    ;

void clear_error();
const char* last_error();

}  // namespace ringattn
