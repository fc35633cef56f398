#include "moev/models/placement.h"

#include <sstream>

#include "moev/core/error.h"

namespace moev::models {

std::vector<int64_t> moe_blocks(const Placement& p, int64_t depth) {
  std::vector<int64_t> out;
  if (p.kind == "none") return out;
  if (p.kind == "every") {
    MOEV_CHECK(p.n >= 1 && p.n <= depth, "moe placement every-", p.n, ": n must be in [1, ", depth,
               "] for a model of ", depth, " blocks");
    for (int64_t b = p.n - 1; b < depth; b += p.n) out.push_back(b);
  } else if (p.kind == "last") {
    const int64_t odd = depth / 2;
    MOEV_CHECK(p.n >= 1 && p.n <= odd, "moe placement last-", p.n, ": a model of ", depth,
               " blocks has ", odd, " odd blocks, so n must be in [1, ", odd, "]");
    int64_t b = (depth % 2 == 0) ? depth - 1 : depth - 2;
    for (int64_t i = 0; i < p.n; ++i, b -= 2) out.push_back(b);
    std::reverse(out.begin(), out.end());
  } else if (p.kind == "list") {
    MOEV_CHECK(!p.blocks.empty(), "moe placement: empty block list");
    for (int64_t b : p.blocks)
      MOEV_CHECK(b >= 0 && b < depth, "moe placement: block ", b, " is outside a model of ", depth,
                 " blocks (valid: 0..", depth - 1, ")");
    out = p.blocks;
    std::sort(out.begin(), out.end());
    out.erase(std::unique(out.begin(), out.end()), out.end());
  } else {
    fail("moe placement '", p.kind, "': expected none, every, last or list");
  }
  return out;
}

void refuse_repeated_blocks(const Placement& p) {
  if (p.kind != "list") return;
  auto blocks = p.blocks;
  std::sort(blocks.begin(), blocks.end());
  const auto twice = std::adjacent_find(blocks.begin(), blocks.end());
  MOEV_CHECK(twice == blocks.end(), "moe placement '", to_string(p), "': block ", twice == blocks.end() ? 0 : *twice,
             " is listed twice; expected each block once");
}

Placement parse_placement(const std::string& text) {
  Placement p;
  auto dash = text.find('-');
  if (text == "none" || text.empty()) return p;
  if (text == "all") return parse_placement("every-1");  // as a sweep's placements say it
  if (dash != std::string::npos && (text.rfind("every", 0) == 0 || text.rfind("last", 0) == 0)) {
    p.kind = text.substr(0, dash);
    try {
      size_t used = 0;
      p.n = std::stoll(text.substr(dash + 1), &used);
      MOEV_CHECK(used == text.size() - dash - 1, "");
    } catch (const std::exception&) {
      fail("moe placement '", text, "': expected every-N, last-N, all, none or a block list like 3,5");
    }
    return p;
  }
  p.kind = "list";
  std::stringstream ss(text + ",");  // so that a trailing comma leaves an empty item
  std::string item;
  while (std::getline(ss, item, ',')) {
    // Spaces around a block are allowed on both sides ("3, 5"), as stoll allows them before it.
    const auto first = item.find_first_not_of(" \t"), last = item.find_last_not_of(" \t");
    item = first == std::string::npos ? std::string() : item.substr(first, last - first + 1);
    try {
      size_t used = 0;
      p.blocks.push_back(std::stoll(item, &used));
      MOEV_CHECK(used == item.size(), "");
    } catch (const std::exception&) {
      fail("moe placement '", text, "': expected every-N, last-N, all, none or a block list like 3,5");
    }
  }
  return p;
}

std::string to_string(const Placement& p) {
  if (p.kind == "every" || p.kind == "last") return p.kind + "-" + std::to_string(p.n);
  if (p.kind == "list") {
    std::string s;
    for (size_t i = 0; i < p.blocks.size(); ++i) s += (i ? "," : "") + std::to_string(p.blocks[i]);
    return s;
  }
  return "none";
}

}  // namespace moev::models
