// The arguments of a boxed kernel under PyTorch's stable ABI: reading them without taking them
// (so that a call can be handed on unchanged to another op), and freeing them.
//
// A boxed kernel receives one StableIValue per schema argument and owns what they refer to:
// tensors are owning AtenTensorHandles, lists StableListHandles that own their elements, and an
// optional (`T?`) is 0 (None) or a pointer to a heap StableIValue that holds the value. Every
// conversion below goes through torch::stable::detail::to / from, so the encoding stays the one
// of the headers the shim is built against.
//
// Minimum PyTorch version of what this file uses: 2.10 (StableListHandle and torch_list_*:
// the schemas' Tensor[] / SymInt[] arguments); aoti_torch_* calls are older.
#ifndef RINGATTN_TORCH_SHIM_STACK_ARGS_H_
#define RINGATTN_TORCH_SHIM_STACK_ARGS_H_

#include <torch/csrc/inductor/aoti_torch/c/shim.h>
#include <torch/csrc/stable/c/shim.h>
#include <torch/csrc/stable/stableivalue_conversions.h>

#include <cstddef>
#include <cstdint>
#include <optional>

namespace ringattn {
namespace torch_shim {

// torch::stable::detail's conversions (the global from / to are deprecated aliases).
template <typename T>
inline StableIValue from_value(T value) {
  return torch::stable::detail::from(value);
}
template <typename T>
inline T to_value(StableIValue value) {
  return torch::stable::detail::to<T>(value);
}

// The kinds of schema arguments of grouped_fwd / grouped_bwd.
enum class ArgKind : uint8_t {
  kScalar,                 // int, SymInt, float, bool: nothing to free
  kTensor,                 // Tensor
  kOptionalTensor,         // Tensor?
  kTensorList,             // Tensor[]
  kListOfOptionalTensors,  // Tensor?[]
  kOptionalListOfOptionalTensors,  // Tensor?[]?
  kIntList,                // int[], SymInt[]
};

// The tensor an argument of kind kTensor refers to (borrowed).
inline AtenTensorHandle tensor_arg(StableIValue value) { return to_value<AtenTensorHandle>(value); }

// The tensor an argument of kind kOptionalTensor refers to (borrowed), or nullptr for None.
inline AtenTensorHandle optional_tensor_arg(StableIValue value) {
  const StableIValue* box = to_value<StableIValue*>(value);
  return box == nullptr ? nullptr : to_value<AtenTensorHandle>(*box);
}

// A list argument, read without taking its elements.
class ListArg {
 public:
  ListArg() = default;
  // False when the list cannot be read (then size() is 0).
  bool open(StableListHandle handle) {
    handle_ = handle;
    size_ = 0;
    return handle != nullptr && torch_list_size(handle, &size_) == AOTI_TORCH_SUCCESS;
  }
  size_t size() const { return size_; }
  // Element i; false when it cannot be read.
  bool get(size_t i, StableIValue* element) const {
    return torch_list_get_item(handle_, i, element) == AOTI_TORCH_SUCCESS;
  }

 private:
  StableListHandle handle_ = nullptr;
  size_t size_ = 0;
};

inline void free_tensor(AtenTensorHandle tensor) {
  if (tensor != nullptr) aoti_torch_delete_tensor_object(tensor);
}

inline void free_optional_tensor(StableIValue value) {
  const std::optional<AtenTensorHandle> tensor = to_value<std::optional<AtenTensorHandle>>(value);
  if (tensor.has_value()) free_tensor(*tensor);
}

// Frees a list and the elements it owns (each freed with `free_element`).
template <typename FreeElement>
void free_list(StableListHandle list, FreeElement free_element) {
  if (list == nullptr) return;
  size_t size = 0;
  if (torch_list_size(list, &size) == AOTI_TORCH_SUCCESS) {
    for (size_t i = 0; i < size; ++i) {
      StableIValue element = 0;
      if (torch_list_get_item(list, i, &element) == AOTI_TORCH_SUCCESS) free_element(element);
    }
  }
  torch_delete_list(list);
}

inline void free_arg(ArgKind kind, StableIValue value) {
  switch (kind) {
    case ArgKind::kScalar:
      return;
    case ArgKind::kTensor:
      free_tensor(tensor_arg(value));
      return;
    case ArgKind::kOptionalTensor:
      free_optional_tensor(value);
      return;
    case ArgKind::kTensorList:
      free_list(to_value<StableListHandle>(value), [](StableIValue e) { free_tensor(tensor_arg(e)); });
      return;
    case ArgKind::kListOfOptionalTensors:
      free_list(to_value<StableListHandle>(value), free_optional_tensor);
      return;
    case ArgKind::kOptionalListOfOptionalTensors: {
      const std::optional<StableListHandle> list = to_value<std::optional<StableListHandle>>(value);
      if (list.has_value()) free_list(*list, free_optional_tensor);
      return;
    }
    case ArgKind::kIntList:
      free_list(to_value<StableListHandle>(value), [](StableIValue) {});
      return;
  }
}

// Owns a kernel's arguments (a copy of the stack's first `count` values) until they are freed at
// destruction or handed on to another op (hand_on: the callee owns them then).
class OwnedArgs {
 public:
  OwnedArgs(const StableIValue* stack, const ArgKind* kinds, size_t count) : kinds_(kinds), count_(count) {
    for (size_t i = 0; i < count; ++i) values_[i] = stack[i];
  }
  ~OwnedArgs() {
    if (!owned_) return;
    for (size_t i = 0; i < count_; ++i) free_arg(kinds_[i], values_[i]);
  }
  OwnedArgs(const OwnedArgs&) = delete;
  OwnedArgs& operator=(const OwnedArgs&) = delete;

  StableIValue operator[](size_t i) const { return values_[i]; }
  size_t size() const { return count_; }
  // Copies the values into `stack` and gives up their ownership.
  void hand_on(StableIValue* stack) {
    for (size_t i = 0; i < count_; ++i) stack[i] = values_[i];
    owned_ = false;
  }

  static constexpr size_t kCapacity = 24;

 private:
  StableIValue values_[kCapacity] = {};
  const ArgKind* kinds_;
  size_t count_;
  bool owned_ = true;
};

// One owned tensor (an output or a workspace being built).
class OwnedTensor {
 public:
  OwnedTensor() = default;
  ~OwnedTensor() { free_tensor(handle_); }
  OwnedTensor(const OwnedTensor&) = delete;
  OwnedTensor& operator=(const OwnedTensor&) = delete;
  AtenTensorHandle get() const { return handle_; }
  AtenTensorHandle* out() {
    free_tensor(handle_);
    handle_ = nullptr;
    return &handle_;
  }
  AtenTensorHandle release() {
    AtenTensorHandle handle = handle_;
    handle_ = nullptr;
    return handle;
  }

 private:
  AtenTensorHandle handle_ = nullptr;
};

}  // namespace torch_shim
}  // namespace ringattn

#endif  // RINGATTN_TORCH_SHIM_STACK_ARGS_H_
