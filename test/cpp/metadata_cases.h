// Malformed (and a few well-formed) sequence metadata for one problem shape, each with the
// ringattn_metadata_error bits a GPU call must set in exec.metadata_errors and the start of the
// message the host check (the CPU backend, or check_metadata = 1) rejects it with. The CPU
// suite checks the messages; the GPU suite checks the bits and that check_metadata = 1 gives the
// same message, so the two checks agree case by case.
//
// Shape: B = 2 sequences, G = 2 query groups with total_q = {12, 10}, total_k = 16; group 1
// has seqused_k. A well-formed base: cu_seqlens_k {0, 9, 16}, cu_seqlens_q {0, 5, 12} and
// {0, 4, 10}, seqused_k of group 1 {9, 7}.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "ringattn/ringattn.h"

namespace ratest {

struct MetadataCase {
  std::string name;
  std::vector<int32_t> cu_k;                  // [B + 1]
  std::vector<std::vector<int32_t>> cu_q;     // [G][B + 1]
  std::vector<int32_t> seqused_k1;            // [B], group 1's (group 0 has none)
  uint32_t bits;                              // what the device check sets
  std::string host_error;                     // how the host check's message starts ("" when accepted)
};

constexpr int kMetadataCaseBatch = 2;
constexpr int kMetadataCaseGroups = 2;
constexpr int64_t kMetadataCaseTotalQ[kMetadataCaseGroups] = {12, 10};
constexpr int64_t kMetadataCaseTotalK = 16;

inline std::vector<MetadataCase> metadata_cases() {
  const std::vector<int32_t> k{0, 9, 16}, q0{0, 5, 12}, q1{0, 4, 10}, used{9, 7};
  return {
      {"well_formed", k, {q0, q1}, used, 0u, ""},
      {"well_formed_empty_sequences", {0, 16, 16}, {{0, 12, 12}, {0, 0, 10}}, {16, 0}, 0u, ""},
      {"well_formed_short_of_the_tensors", {0, 9, 14}, {{0, 5, 11}, {0, 4, 9}}, {0, 5}, 0u, ""},
      {"q_first_not_0", k, {{1, 5, 12}, q1}, used, RINGATTN_METADATA_CU_SEQLENS_Q_FIRST,
       "forward: cu_seqlens_q[0] (group 0): expected 0, got 1"},
      {"q_decreasing", k, {q0, {0, 11, 10}}, used, RINGATTN_METADATA_CU_SEQLENS_Q_DECREASING,
       "forward: cu_seqlens_q[2] (group 1): expected >= cu_seqlens_q[1] (11)"},
      {"q_negative_inside", k, {{0, -3, 12}, q1}, used, RINGATTN_METADATA_CU_SEQLENS_Q_DECREASING,
       "forward: cu_seqlens_q[1] (group 0): expected >= cu_seqlens_q[0] (0)"},
      {"q_past_its_tokens", k, {{0, 5, 13}, q1}, used, RINGATTN_METADATA_CU_SEQLENS_Q_PAST_END,
       "forward: cu_seqlens_q[2] (group 0): expected <= the number of tokens in the tensor (12), got 13"},
      {"k_first_not_0", {2, 9, 16}, {q0, q1}, {7, 7}, RINGATTN_METADATA_CU_SEQLENS_K_FIRST,
       "forward: cu_seqlens_k[0]: expected 0, got 2"},
      // cu_seqlens_k[2] < cu_seqlens_k[1] also makes sequence 1's key count negative, below
      // seqused_k: the device reports both; the host stops at the first.
      {"k_decreasing", {0, 17, 16}, {q0, q1}, used,
       RINGATTN_METADATA_CU_SEQLENS_K_DECREASING | RINGATTN_METADATA_SEQUSED_K_RANGE,
       "forward: cu_seqlens_k[2]: expected >= cu_seqlens_k[1] (17)"},
      {"k_past_its_tokens", {0, 9, 20}, {q0, q1}, used, RINGATTN_METADATA_CU_SEQLENS_K_PAST_END,
       "forward: cu_seqlens_k[2]: expected <= the number of tokens in the tensor (16), got 20"},
      {"seqused_k_too_large", k, {q0, q1}, {9, 8}, RINGATTN_METADATA_SEQUSED_K_RANGE,
       "forward: seqused_k[1] (group 1): expected 0 to the key length of sequence 1 from cu_seqlens_k (7), got 8"},
      {"seqused_k_negative", k, {q0, q1}, {-1, 7}, RINGATTN_METADATA_SEQUSED_K_RANGE,
       "forward: seqused_k[0] (group 1): expected 0 to the key length of sequence 0 from cu_seqlens_k (9), got -1"},
      {"q_decreasing_and_seqused_k_too_large", k, {{0, 6, 5}, q1}, {10, 7},
       RINGATTN_METADATA_CU_SEQLENS_Q_DECREASING | RINGATTN_METADATA_SEQUSED_K_RANGE,
       "forward: cu_seqlens_q[2] (group 0): expected >= cu_seqlens_q[1] (6)"},
  };
}

}  // namespace ratest
