// The shape letters used in every shape contract in moev, fixed once here:
//   B  batch (images)          N  tokens per image      D  model width
//   H  expert / MLP hidden     E  experts               K  experts per token (top-K)
//   C  slots per expert (capacity, summed over routing groups)
//   S  tokens per routing group  G  routing groups      T  tokens in a call (B*N)
//   L  classes
// Shape contracts are written above each forward as `x: [B, N, D] -> [B, N, D]`.
#pragma once
