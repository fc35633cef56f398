// Expert parallelism against the single-process MoE layer: two ranks (threads
// with a real Gloo process group over loopback) each hold half of the experts
// and half of the batch; outputs and every gradient must be those of one layer
// holding all experts and the whole batch.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <unistd.h>

#include <thread>

#include "moev/dist/communicator.h"
#include "moev/moe/moe_layer.h"
#include "support/free_port.h"

namespace {


moev::moe::MoELayer make_layer(int64_t E, double capacity) {
  moev::moe::RouterConfig rc;
  rc.num_experts = E;
  rc.k = 2;
  rc.capacity_factor = capacity;
  rc.group_size = 2;
  torch::manual_seed(11);
  auto layer = moev::moe::MoELayer(moev::moe::MoELayerOptions(16, 24, rc));
  torch::NoGradGuard ng;
  layer->router_weight.normal_(0, 0.5);  // a spread routing: some experts overflow
  return layer;
}

}  // namespace

TEST(ExpertParallel, TwoRanksMatchOneLayerOutputsAndGradients) {
  for (double capacity : {1.05, 0.5}) {
    const int64_t E = 4, B = 8, N = 5, D = 16;
    torch::manual_seed(5);
    auto x = torch::randn({B, N, D});
    auto g = torch::randn({B, N, D});
    // The reference: one layer, all experts, the whole batch.
    auto ref = make_layer(E, capacity);
    ref->eval();  // no router noise: both sides route identically
    auto xr = x.clone().requires_grad_();
    auto y = ref->forward(xr);
    (y * g).sum().backward();

    const int port = moev::test::free_port();
    std::vector<at::Tensor> ys(2), gx(2), gw1(2), gb2(2), grouter(2);
    std::vector<int64_t> first(2);
    // Built here, one after the other: make_layer seeds the global generator,
    // which the two rank threads would otherwise draw from at the same time.
    std::vector<moev::moe::MoELayer> layers{make_layer(E, capacity), make_layer(E, capacity)};
    auto rank_main = [&](int rank) {
      moev::dist::Communicator comm(moev::test::loopback_job(rank, 2, port));
      auto& layer = layers[rank];
      layer->shard_experts(&comm);
      layer->eval();
      first[rank] = layer->first_expert();
      EXPECT_EQ(layer->experts->w1.size(0), E / 2);
      auto xs = x.narrow(0, rank * B / 2, B / 2).clone().requires_grad_();
      auto out = layer->forward(xs);
      (out * g.narrow(0, rank * B / 2, B / 2)).sum().backward();
      ys[rank] = out.detach();
      gx[rank] = xs.grad();
      gw1[rank] = layer->experts->w1.grad();
      gb2[rank] = layer->experts->b2.grad();
      grouter[rank] = layer->router_weight.grad();
    };
    std::thread other(rank_main, 1);
    rank_main(0);
    other.join();
    const std::string at = "capacity " + std::to_string(capacity);
    EXPECT_EQ(first[0], 0);
    EXPECT_EQ(first[1], 2);
    EXPECT_TRUE(torch::allclose(torch::cat(ys), y.detach(), 1e-5, 1e-6)) << at;
    EXPECT_TRUE(torch::allclose(torch::cat(gx), xr.grad(), 1e-5, 1e-6)) << at;
    // Each rank's experts get the gradient of the whole batch's tokens they served.
    EXPECT_TRUE(torch::allclose(torch::cat(gw1), ref->experts->w1.grad(), 1e-5, 1e-6)) << at;
    EXPECT_TRUE(torch::allclose(torch::cat(gb2), ref->experts->b2.grad(), 1e-5, 1e-6)) << at;
    // The router is data parallel: its gradient is the sum of the ranks'.
    EXPECT_TRUE(torch::allclose(grouter[0] + grouter[1], ref->router_weight.grad(), 1e-5, 1e-6)) << at;
    // Experts' gradients are not trivially zero (tokens did reach both ranks).
    EXPECT_GT(gw1[0].abs().sum().item<double>(), 0);
    EXPECT_GT(gw1[1].abs().sum().item<double>(), 0);
  }
}

TEST(ExpertParallel, JobOfOneRunsTheExchangePathAndMatchesTheLocalLayer) {
  moev::dist::DistConfig c;  // world_size 1: no rendezvous, every collective the identity
  moev::dist::Communicator comm(c);
  auto local = make_layer(4, 0.5), sharded = make_layer(4, 0.5);
  sharded->shard_experts(&comm);
  EXPECT_TRUE(sharded->sharded());
  EXPECT_EQ(sharded->experts->w1.size(0), 4);
  local->eval();
  sharded->eval();
  auto x = torch::randn({4, 5, 16});
  EXPECT_TRUE(torch::allclose(sharded->forward(x), local->forward(x), 1e-6, 1e-7));
  EXPECT_THROW(sharded->shard_experts(&comm), std::exception);  // once only
}
