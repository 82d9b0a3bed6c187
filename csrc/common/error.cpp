#include "common/error.h"

#include <cstdarg>
#include <cstdio>
#include <vector>

namespace ringattn {
namespace {
thread_local std::string t_last_error;
}

ringattn_status fail(ringattn_status status, const std::string& message) {
  t_last_error = message;
  return status;
}

ringattn_status failf(ringattn_status status, const char* fmt, ...) {
  va_list args;
  va_start(args, fmt);
  va_list copy;
  va_copy(copy, args);
  const int n = std::vsnprintf(nullptr, 0, fmt, copy);
  va_end(copy);
  std::vector<char> buf(n > 0 ? static_cast<size_t>(n) + 1 : 1, '\0');
  if (n > 0) std::vsnprintf(buf.data(), buf.size(), fmt, args);
  va_end(args);
  t_last_error.assign(buf.data());
  return status;
}

void clear_error() { t_last_error.clear(); }
const char* last_error() { return t_last_error.c_str(); }

}  // namespace ringattn
