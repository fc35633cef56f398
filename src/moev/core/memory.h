// The machine's physical memory, for refusing up front what cannot fit (a
// model's training state, a folder decoded into memory) rather than meeting the
// kernel's out-of-memory killer halfway through.
#pragma once

#include <unistd.h>

namespace moev {

// Bytes of physical memory; 0 when the system does not say.
inline double physical_memory_bytes() {
  const long pages = ::sysconf(_SC_PHYS_PAGES), page = ::sysconf(_SC_PAGE_SIZE);
  return pages > 0 && page > 0 ? double(pages) * double(page) : 0;
}

}  // namespace moev
