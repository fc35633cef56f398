// Fixed-width integers stored most significant byte first (IDX headers, PNG
// chunks), read from raw bytes.
#pragma once

#include <cstdint>

namespace moev {

inline uint32_t big_endian32(const unsigned char* p) {
  return uint32_t{p[0]} << 24 | uint32_t{p[1]} << 16 | uint32_t{p[2]} << 8 | uint32_t{p[3]};
}

}  // namespace moev
