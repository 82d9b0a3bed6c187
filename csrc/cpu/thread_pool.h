// A minimal fork-join loop over independent tasks for the CPU backend.
//
// Tasks are handed out through an atomic counter (cheap dynamic load balancing). Every task
// writes outputs no other task writes and computes them in an order fixed by the task alone,
// so results are bit-identical whatever the thread count or the interleaving.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <exception>
#include <mutex>
#include <new>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

namespace ringattn {
namespace cpu {

// When the hardware thread count is unknown (hardware_concurrency() == 0): at most this many.
constexpr int64_t kThreadsIfHardwareUnknown = 8;

// The threads a call runs on: exec.num_threads, where <= 0 means every hardware thread; never
// more than the hardware threads (a larger request, e.g. torch.set_num_threads(30000), would
// only start threads that wait for a core) nor more than the tasks; at least 1.
// The hardware thread count is read once per process: libstdc++'s hardware_concurrency() reads
// /sys/devices/system/cpu/online at every call, which cost most of a small CPU call (measured
// about 5 of 5.7 us per forward with no query rows).
inline int resolve_num_threads(int requested, int64_t num_tasks) {
  static const unsigned hw = std::thread::hardware_concurrency();
  const int64_t limit = hw == 0 ? kThreadsIfHardwareUnknown : static_cast<int64_t>(hw);
  int64_t n = requested <= 0 ? limit : std::min<int64_t>(requested, limit);
  n = std::min(n, num_tasks);
  return static_cast<int>(std::max<int64_t>(n, 1));
}

// Runs body(state, task) for every task in [0, num_tasks). Each worker first builds its own
// scratch state with make_state() (so scratch allocation happens on, and is private to, the
// worker). Returns an empty string on success, else the message of the first exception a
// worker raised (the remaining tasks are then abandoned).
template <typename MakeState, typename Body>
std::string parallel_for(int64_t num_tasks, int num_threads, MakeState&& make_state, Body&& body) {
  if (num_tasks <= 0) return std::string();
  std::atomic<int64_t> next{0};
  std::atomic<bool> failed{false};
  std::mutex error_mutex;
  std::string error;

  auto record = [&](const char* what) {
    std::lock_guard<std::mutex> lock(error_mutex);
    if (error.empty()) error = (what && *what) ? what : "unknown exception";
    failed.store(true);
  };

  auto worker = [&]() {
    try {
      auto state = make_state();
      while (!failed.load(std::memory_order_relaxed)) {
        const int64_t task = next.fetch_add(1, std::memory_order_relaxed);
        if (task >= num_tasks) break;
        body(state, task);
      }
    } catch (const std::exception& e) {
      record(e.what());
    } catch (...) {
      record("unknown exception");
    }
  };

  std::vector<std::thread> threads;
  try {
    threads.reserve(static_cast<size_t>(std::max(num_threads - 1, 0)));
    for (int t = 1; t < num_threads; ++t) threads.emplace_back(worker);
  } catch (...) {
    // Could not start (all) helper threads: the ones that started and this thread still
    // finish every task, just more slowly.
  }
  worker();
  for (std::thread& t : threads) t.join();
  return error;
}

}  // namespace cpu
}  // namespace ringattn
