// Storage types of the CPU backend and their conversions to and from the accumulator type.
//
// fp16 and bf16 are plain 16-bit patterns here (no CUDA headers on the CPU path). Every
// float -> 16-bit conversion rounds to nearest, ties to even, and keeps the IEEE special
// values: overflow gives inf, NaN stays NaN (quietened, sign and top payload bits kept),
// results below the smallest normal become correctly rounded subnormals or signed zero.
#pragma once

#include <cstdint>
#include <cstring>

namespace ringattn {
namespace cpu {

struct half_t {
  uint16_t bits;
};
struct bfloat16_t {
  uint16_t bits;
};
static_assert(sizeof(half_t) == 2 && sizeof(bfloat16_t) == 2, "16-bit storage types must be 2 bytes");

inline uint32_t float_to_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
}

inline float bits_to_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

// ---- IEEE binary16: 1 sign, 5 exponent (bias 15), 10 mantissa bits ----

inline float half_bits_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exponent = (h >> 10) & 0x1fu;
  const uint32_t mantissa = h & 0x3ffu;
  if (exponent == 0x1fu) return bits_to_float(sign | 0x7f800000u | (mantissa << 13));  // inf / NaN
  if (exponent == 0) {
    // Zero or subnormal: mantissa * 2^-24, exact in float.
    const float magnitude = static_cast<float>(mantissa) * 5.9604644775390625e-08f;
    return sign ? -magnitude : magnitude;
  }
  return bits_to_float(sign | ((exponent + (127 - 15)) << 23) | (mantissa << 13));
}

// Shifts `value` right by `shift` (1..31) rounding to nearest, ties to even.
inline uint32_t shift_right_round_even(uint32_t value, uint32_t shift) {
  const uint32_t kept = value >> shift;
  const uint32_t rest = value & ((1u << shift) - 1u);
  const uint32_t half = 1u << (shift - 1);
  return kept + ((rest > half || (rest == half && (kept & 1u))) ? 1u : 0u);
}

inline uint16_t float_to_half_bits(float f) {
  const uint32_t x = float_to_bits(f);
  const uint32_t sign = (x >> 16) & 0x8000u;
  const uint32_t magnitude = x & 0x7fffffffu;
  if (magnitude >= 0x7f800000u) {
    if (magnitude == 0x7f800000u) return static_cast<uint16_t>(sign | 0x7c00u);            // inf
    return static_cast<uint16_t>(sign | 0x7e00u | ((magnitude >> 13) & 0x3ffu));          // quiet NaN
  }
  // 65520 = 0x477ff000 is the midpoint between 65504 (largest half) and 2^16: ties to even
  // round it up, so everything from there on is inf.
  if (magnitude >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);
  if (magnitude < 0x38800000u) {  // below 2^-14, the smallest normal half
    // Half subnormals are multiples of 2^-24. At or below 2^-25 (0x33000000) the value
    // rounds to zero (2^-25 itself is a tie and goes to the even neighbour, zero).
    if (magnitude <= 0x33000000u) return static_cast<uint16_t>(sign);
    const uint32_t exponent = magnitude >> 23;                     // 102 .. 112
    const uint32_t significand = (magnitude & 0x7fffffu) | 0x800000u;  // 24 bits
    // value = significand * 2^(exponent - 150); in units of 2^-24: significand >> (126 - exponent).
    // A carry into bit 10 correctly produces the smallest normal 0x0400.
    return static_cast<uint16_t>(sign | shift_right_round_even(significand, 126u - exponent));
  }
  // Normal: rebias the exponent (127 -> 15) and drop 13 mantissa bits. A carry out of the
  // mantissa bumps the exponent, which is the correct rounding (up to inf is excluded above).
  const uint32_t rebiased = magnitude - ((127u - 15u) << 23);
  return static_cast<uint16_t>(sign | shift_right_round_even(rebiased, 13));
}

// ---- bfloat16: the top 16 bits of a float ----

inline float bf16_bits_to_float(uint16_t b) { return bits_to_float(static_cast<uint32_t>(b) << 16); }

inline uint16_t float_to_bf16_bits(float f) {
  const uint32_t x = float_to_bits(f);
  if ((x & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((x >> 16) | 0x0040u);  // quiet NaN
  // Round to nearest even on the low 16 bits; a carry propagates into the exponent, and the
  // largest finite values round up to inf exactly as IEEE rounding says. Subnormals work the
  // same way because bf16 and float share the exponent field.
  const uint32_t rounding = 0x7fffu + ((x >> 16) & 1u);
  return static_cast<uint16_t>((x + rounding) >> 16);
}

// ---- element traits: storage type -> accumulator type, load and store ----

template <typename T>
struct Element;

template <>
struct Element<float> {
  using Acc = float;
  static Acc load(const float* p) { return *p; }
  static void store(float* p, Acc x) { *p = x; }
};

template <>
struct Element<double> {
  using Acc = double;
  static Acc load(const double* p) { return *p; }
  static void store(double* p, Acc x) { *p = x; }
};

template <>
struct Element<half_t> {
  using Acc = float;
  static Acc load(const half_t* p) { return half_bits_to_float(p->bits); }
  static void store(half_t* p, Acc x) { p->bits = float_to_half_bits(x); }
};

template <>
struct Element<bfloat16_t> {
  using Acc = float;
  static Acc load(const bfloat16_t* p) { return bf16_bits_to_float(p->bits); }
  static void store(bfloat16_t* p, Acc x) { p->bits = float_to_bf16_bits(x); }
};

}  // namespace cpu
}  // namespace ringattn
