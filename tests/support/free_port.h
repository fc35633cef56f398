// Loopback jobs for tests: a TCP port nobody listens on right now, for the
// rendezvous of a test's process group (taken by the test a moment later; a
// clash is possible but rare), and the config of one rank.
#pragma once

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include "moev/dist/communicator.h"

namespace moev::test {

inline int free_port() {
  const int s = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  a.sin_port = 0;
  ::bind(s, reinterpret_cast<sockaddr*>(&a), sizeof a);
  socklen_t len = sizeof a;
  ::getsockname(s, reinterpret_cast<sockaddr*>(&a), &len);
  ::close(s);
  return ntohs(a.sin_port);
}

// Rank `rank` of a job of `world` processes (or threads) meeting on loopback.
inline dist::DistConfig loopback_job(int rank, int world, int port, double timeout_s = 30) {
  dist::DistConfig c;
  c.rank = rank;
  c.world_size = world;
  c.master_port = port;
  c.timeout_s = timeout_s;
  return c;
}

}  // namespace moev::test
