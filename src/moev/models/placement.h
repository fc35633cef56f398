// Which blocks of a model get an MoE layer. V-MoE's conventions (Riquelme et al.
// 2021): "Every-n" = blocks n-1, 2n-1, ...; "Last-n" = the last n odd blocks
// (0-indexed), e.g. 8 blocks, Last-2 -> {5, 7}. An explicit list is also accepted.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace moev::models {

struct Placement {
  std::string kind = "none";       // none | every | last | list
  int64_t n = 2;                   // the n of Every-n / Last-n
  std::vector<int64_t> blocks;     // kind == list: explicit 0-indexed blocks
};

// Throws moev::Error when the placement does not fit a model of `depth` blocks.
std::vector<int64_t> moe_blocks(const Placement& p, int64_t depth);

// "last-2", "every-2", "none", "1,3,5" -> Placement.
Placement parse_placement(const std::string& text);
std::string to_string(const Placement& p);

// A block list naming a block twice ("3,3" builds one MoE layer): an error for
// a new run. Not part of moe_blocks(), so models saved with one still load.
void refuse_repeated_blocks(const Placement& p);

}  // namespace moev::models
