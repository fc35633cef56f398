#include "moev/dist/communicator.h"

#include <chrono>
#include <map>

#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>
#include <torch/torch.h>

#include <glog/logging.h>

#include "moev/core/error.h"

namespace moev::dist {

void validate(const DistConfig& c) {
  MOEV_CHECK(c.world_size >= 1, "WORLD_SIZE = ", c.world_size, ": expected >= 1");
  MOEV_CHECK(c.rank >= 0 && c.rank < c.world_size, "RANK = ", c.rank, ": expected 0 .. WORLD_SIZE - 1 = ",
             c.world_size - 1);
  MOEV_CHECK(c.local_rank >= 0, "LOCAL_RANK = ", c.local_rank, ": expected >= 0");
  MOEV_CHECK(c.master_port > 0 && c.master_port < 65536, "MASTER_PORT = ", c.master_port,
             ": expected a TCP port 1 .. 65535");
  MOEV_CHECK(!c.master_addr.empty(), "MASTER_ADDR is empty: expected the host of rank 0");
  MOEV_CHECK(c.timeout_s > 0, "train.dist_timeout = ", c.timeout_s, ": expected > 0 seconds");
}

struct Communicator::Impl {
  c10::intrusive_ptr<c10d::TCPStore> store;
  c10::intrusive_ptr<c10d::ProcessGroupGloo> pg;
  double seconds = 0;  // in wait(): from the call that issued a collective to its end

  // Waits for one collective; a dead or stuck peer surfaces here as an exception
  // from Gloo (connection closed, or the deadline passed).
  void wait(const c10::intrusive_ptr<c10d::Work>& work, const DistConfig& cfg, const char* what,
            std::chrono::steady_clock::time_point issued) {
    try {
      work->wait();
      seconds += std::chrono::duration<double>(std::chrono::steady_clock::now() - issued).count();
    } catch (const std::exception& e) {
      fail("rank ", cfg.rank, " of ", cfg.world_size, ": ", what, " failed (another rank died, or none ",
           "answered within train.dist_timeout = ", cfg.timeout_s, " s): ", first_line(e.what()));
    }
  }

  static std::string first_line(const std::string& s) { return s.substr(0, s.find('\n')); }
};

namespace {
// c10d logs each failed connection attempt of the rendezvous through glog, and an error line at its deadline,
// before moev's own message, which says the same with the settings to check: quiet while the job is joined.
class QuietLibTorchLog {
 public:
  QuietLibTorchLog() : saved_(FLAGS_minloglevel) { FLAGS_minloglevel = google::GLOG_FATAL; }
  ~QuietLibTorchLog() { FLAGS_minloglevel = saved_; }
  QuietLibTorchLog(const QuietLibTorchLog&) = delete;
  QuietLibTorchLog& operator=(const QuietLibTorchLog&) = delete;

 private:
  int saved_;
};

bool is_loopback(const std::string& host) {
  return host == "localhost" || host.rfind("127.", 0) == 0 || host == "::1";
}
}  // namespace

Communicator::Communicator(const DistConfig& cfg) : cfg_(cfg), impl_(std::make_unique<Impl>()) {
  validate(cfg);
  if (cfg.world_size == 1) return;  // a job of one: every collective is the identity
  const auto timeout = std::chrono::milliseconds(static_cast<int64_t>(cfg.timeout_s * 1000));
  const QuietLibTorchLog quiet;
  try {
    c10d::TCPStoreOptions so;
    so.port = static_cast<std::uint16_t>(cfg.master_port);
    so.isServer = cfg.rank == 0;
    so.numWorkers = static_cast<size_t>(cfg.world_size);
    // The ranks are counted below, each by its own key: a server waiting for a count of workers could not tell
    // a rank not started from one with another WORLD_SIZE, or a RANK given twice.
    so.waitWorkers = false;
    so.timeout = timeout;
    impl_->store = c10::make_intrusive<c10d::TCPStore>(cfg.master_addr, so);
    join(timeout);
  } catch (const Error&) {
    throw;
  } catch (const std::exception& e) {
    // Rank 0 serves the store: its bind fails at once, not after the timeout.
    MOEV_CHECK(cfg.rank != 0 || std::string(e.what()).find("in use") == std::string::npos, "rank 0: MASTER_PORT = ",
               cfg.master_port, " is in use on this machine; choose another port (moev launch --master-port)");
    fail("rank ", cfg.rank, ": rendezvous at MASTER_ADDR:MASTER_PORT = ", cfg.master_addr, ":",
         cfg.master_port, " failed within ", cfg.timeout_s, " s (is rank 0 running, and are all ",
         cfg.world_size, " ranks started?): ", Impl::first_line(e.what()));
  }
  try {
    auto opts = c10d::ProcessGroupGloo::Options::create(timeout);
    if (!cfg.interface.empty())
      opts->devices.push_back(c10d::ProcessGroupGloo::createDeviceForInterface(cfg.interface));
    else if (is_loopback(cfg.master_addr))
      opts->devices.push_back(c10d::ProcessGroupGloo::createDeviceForHostname("127.0.0.1"));
    else
      opts->devices.push_back(c10d::ProcessGroupGloo::createDefaultDevice());
    opts->threads = 1;
    impl_->pg = c10::make_intrusive<c10d::ProcessGroupGloo>(impl_->store, cfg.rank, cfg.world_size, opts);
  } catch (const Error&) {
    throw;
  } catch (const std::exception& e) {
    // Rank 0 serves the store without waiting for the others, so a rank never started fails here too.
    fail("rank ", cfg.rank, ": could not connect the Gloo process group of ", cfg.world_size, " ranks at ",
         "MASTER_ADDR:MASTER_PORT = ", cfg.master_addr, ":", cfg.master_port, " within ", cfg.timeout_s,
         " s (are all ", cfg.world_size, " ranks started, with the same MASTER_ADDR and MASTER_PORT? if so, did ",
         "one die, or do their hostnames resolve to addresses the others cannot reach? GLOO_SOCKET_IFNAME names ",
         "the interface): ", Impl::first_line(e.what()));
  }
}

void Communicator::join(std::chrono::milliseconds timeout) {
  auto& store = *impl_->store;
  const std::string r = std::to_string(cfg_.rank), w = std::to_string(cfg_.world_size);
  // A rank given twice (a job started twice by hand, a copied command line) trained as the other's twin until a
  // collective timed out, long after train.dist_timeout.
  const int64_t joined = store.add("moev/joined/" + r, 1);
  MOEV_CHECK(joined == 1, "rank ", cfg_.rank, ": another process has joined this job at MASTER_ADDR:MASTER_PORT = ",
             cfg_.master_addr, ":", cfg_.master_port, " as rank ", cfg_.rank, " already: each process needs its own ",
             "RANK, 0..WORLD_SIZE-1 (is this job, or this rank, started twice?)");
  store.set("moev/world_size/" + r, std::vector<uint8_t>(w.begin(), w.end()));
  // Ranks of other WORLD_SIZEs waited the whole timeout, then blamed the network.
  auto agree = [&](int other) {
    const std::string key = "moev/world_size/" + std::to_string(other);
    try {
      store.wait({key}, timeout);
    } catch (const std::exception&) {
      fail("rank ", cfg_.rank, ": rank ", other, " did not join the job at MASTER_ADDR:MASTER_PORT = ",
           cfg_.master_addr, ":", cfg_.master_port, " within train.dist_timeout = ", cfg_.timeout_s, " s (are all ",
           cfg_.world_size, " ranks started, with the same MASTER_ADDR and MASTER_PORT?)");
    }
    const auto v = store.get(key);
    const std::string theirs(v.begin(), v.end());
    MOEV_CHECK(theirs == w, "rank ", cfg_.rank, ": WORLD_SIZE = ", w, " here, but rank ", other, " was started with ",
               "WORLD_SIZE = ", theirs, ": every rank of a job needs the same WORLD_SIZE (and its own RANK below it)");
  };
  if (cfg_.rank != 0) {
    agree(0);
  } else {
    for (int other = 1; other < cfg_.world_size; ++other) agree(other);
  }
}

Communicator::~Communicator() = default;

double Communicator::seconds_in_collectives() const { return impl_->seconds; }

void Communicator::all_reduce_sum(const std::vector<at::Tensor>& tensors, int64_t bucket_bytes) {
  if (size() == 1 || tensors.empty()) return;
  // Buckets of consecutive same-dtype tensors: few collectives, bounded memory.
  size_t i = 0;
  while (i < tensors.size()) {
    size_t j = i;
    int64_t bytes = 0;
    while (j < tensors.size() && tensors[j].scalar_type() == tensors[i].scalar_type() &&
           (j == i || bytes + static_cast<int64_t>(tensors[j].nbytes()) <= bucket_bytes)) {
      bytes += static_cast<int64_t>(tensors[j].nbytes());
      ++j;
    }
    std::vector<at::Tensor> flat_parts;
    for (size_t t = i; t < j; ++t) flat_parts.push_back(tensors[t].reshape(-1));
    std::vector<at::Tensor> bucket{torch::cat(flat_parts)};
    const auto issued = std::chrono::steady_clock::now();
    impl_->wait(impl_->pg->allreduce(bucket), cfg_, "all-reduce", issued);
    int64_t off = 0;
    for (size_t t = i; t < j; ++t) {
      const int64_t n = tensors[t].numel();
      tensors[t].copy_(bucket[0].narrow(0, off, n).view_as(tensors[t]));
      off += n;
    }
    i = j;
  }
}

void Communicator::broadcast(const std::vector<at::Tensor>& tensors, int root) {
  if (size() == 1) return;
  c10d::BroadcastOptions o;
  o.rootRank = root;
  for (const auto& t : tensors) {
    std::vector<at::Tensor> one{t.is_contiguous() ? t : t.contiguous()};
    const auto issued = std::chrono::steady_clock::now();
    impl_->wait(impl_->pg->broadcast(one, o), cfg_, "broadcast", issued);
    if (!one[0].is_same(t)) t.copy_(one[0]);
  }
}

at::Tensor Communicator::all_to_all(const at::Tensor& input, const std::vector<int64_t>& send_counts,
                                    const std::vector<int64_t>& recv_counts) {
  MOEV_CHECK(static_cast<int>(send_counts.size()) == size() && static_cast<int>(recv_counts.size()) == size(),
             "all_to_all: expected ", size(), " send and receive counts");
  int64_t rows = 0;
  for (auto c : recv_counts) rows += c;
  auto sizes = input.sizes().vec();
  sizes[0] = rows;
  auto out = at::empty(sizes, input.options());
  if (size() == 1) return out.copy_(input);
  auto in = input.contiguous();
  auto sc = send_counts, rc = recv_counts;
  const auto issued = std::chrono::steady_clock::now();
  impl_->wait(impl_->pg->alltoall_base(out, in, rc, sc), cfg_, "all-to-all", issued);
  return out;
}

at::Tensor Communicator::all_gather(const at::Tensor& t) {
  if (size() == 1) return t.clone();
  std::vector<at::Tensor> in{t.contiguous()};
  std::vector<std::vector<at::Tensor>> out(1);
  for (int r = 0; r < size(); ++r) out[0].push_back(at::empty_like(in[0]));
  const auto issued = std::chrono::steady_clock::now();
  impl_->wait(impl_->pg->allgather(out, in), cfg_, "all-gather", issued);
  return torch::cat(out[0]);
}

namespace {
struct AllToAllRows : public torch::autograd::Function<AllToAllRows> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x, int64_t comm,
                            const std::vector<int64_t>& send, const std::vector<int64_t>& recv) {
    ctx->saved_data["comm"] = comm;
    ctx->saved_data["send"] = c10::IValue(send);
    ctx->saved_data["recv"] = c10::IValue(recv);
    return reinterpret_cast<Communicator*>(comm)->all_to_all(x, send, recv);
  }
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    auto* comm = reinterpret_cast<Communicator*>(ctx->saved_data["comm"].toInt());
    auto g = comm->all_to_all(grads[0], ctx->saved_data["recv"].toIntVector(),
                              ctx->saved_data["send"].toIntVector());
    return {g, at::Tensor(), at::Tensor(), at::Tensor()};
  }
};
}  // namespace

at::Tensor all_to_all_rows(Communicator& comm, const at::Tensor& input, const std::vector<int64_t>& send_counts,
                           const std::vector<int64_t>& recv_counts) {
  return AllToAllRows::apply(input, reinterpret_cast<int64_t>(&comm), send_counts, recv_counts);
}

void Communicator::barrier(double timeout_s) {
  if (size() == 1) return;
  c10d::BarrierOptions o;
  if (timeout_s > 0) o.timeout = std::chrono::milliseconds(static_cast<int64_t>(timeout_s * 1000));
  const auto issued = std::chrono::steady_clock::now();
  impl_->wait(impl_->pg->barrier(o), cfg_, "barrier", issued);
}

}  // namespace moev::dist
