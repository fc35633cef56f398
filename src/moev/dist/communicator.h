// Collectives between the processes of one training job, on torch's own
// distributed engine c10d: a TCPStore rendezvous (rank 0 serves it) and a Gloo
// process group (CPU; NCCL would slot in here on a CUDA build). Ranks find each
// other by the torchrun convention (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
// MASTER_PORT), read from the environment by the moev command, not here.
//
// Every call has a deadline: a rank that died or hangs makes the others fail
// with a moev::Error naming the operation and the timeout, never wait forever.
// The c10d headers stay in the .cpp: they are heavy and only this file needs them.
#pragma once

#include <chrono>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include <ATen/core/Tensor.h>

namespace moev::dist {

struct DistConfig {
  int rank = 0;                             // this process's rank, 0 .. world_size - 1
  int world_size = 1;                       // processes in the job (1: not distributed)
  int local_rank = 0;                       // rank among the processes of this machine
  std::string master_addr = "127.0.0.1";    // host of rank 0's TCPStore
  int master_port = 29500;                  // port of rank 0's TCPStore
  std::string interface;                    // network interface for Gloo (empty: by master_addr)
  double timeout_s = 120;                   // deadline of the rendezvous and of every collective
};

// Throws moev::Error naming the field when the values cannot describe a job.
void validate(const DistConfig& cfg);

class Communicator {
 public:
  // Joins the job: rank 0 starts the TCPStore, every rank waits for all others.
  explicit Communicator(const DistConfig& cfg);
  ~Communicator();
  Communicator(const Communicator&) = delete;
  Communicator& operator=(const Communicator&) = delete;

  // Wall seconds this rank has spent inside collectives so far (waiting for
  // peers included): what a step pays for communication.
  double seconds_in_collectives() const;

  int rank() const { return cfg_.rank; }
  int size() const { return cfg_.world_size; }
  const DistConfig& config() const { return cfg_; }

  // In place: every tensor becomes its sum over ranks. Same-dtype tensors are
  // packed into flat buckets of about bucket_bytes, one all-reduce per bucket.
  void all_reduce_sum(const std::vector<at::Tensor>& tensors, int64_t bucket_bytes = 4 << 20);
  // In place: every tensor takes root's values.
  void broadcast(const std::vector<at::Tensor>& tensors, int root = 0);
  // Variable-size all-to-all along dim 0: rank r sends input rows
  // [sum(send_counts[:q]), +send_counts[q]) to rank q and receives recv_counts[q]
  // rows from it, placed in rank order. input: [sum(send_counts), ...].
  at::Tensor all_to_all(const at::Tensor& input, const std::vector<int64_t>& send_counts,
                        const std::vector<int64_t>& recv_counts);
  // Concatenation along dim 0 of every rank's tensor (all the same shape), in rank order.
  at::Tensor all_gather(const at::Tensor& t);
  // timeout_s > 0: this wait's own deadline instead of the config's (ranks that
  // wait while rank 0 evaluates alone need longer than one collective does).
  void barrier(double timeout_s = 0);

 private:
  // Each rank joins the store under its RANK, once, and checks that the others have its WORLD_SIZE.
  void join(std::chrono::milliseconds timeout);

  struct Impl;
  DistConfig cfg_;
  std::unique_ptr<Impl> impl_;
};

// all_to_all as a differentiable op: the backward sends the gradient rows back
// the way they came (recv_counts and send_counts swapped). Expert parallelism
// moves tokens to their experts' ranks and back with it, in forward and backward.
at::Tensor all_to_all_rows(Communicator& comm, const at::Tensor& input, const std::vector<int64_t>& send_counts,
                           const std::vector<int64_t>& recv_counts);

}  // namespace moev::dist
