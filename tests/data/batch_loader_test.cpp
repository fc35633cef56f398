// BatchLoader: coverage, determinism in (seed, epoch, batch), exact resume,
// normalisation known answers, augmentation properties, clean shutdown.
#include "moev/data/batch_loader.h"

#include <gtest/gtest.h>
#include <torch/torch.h>

#include <chrono>
#include <numeric>
#include <set>

#include "support/expect_error.h"

namespace moev::data {
namespace {

using moev::test::expect_error;

// n random images [C, H, W]; label i = i so a batch's labels say which examples it holds.
ImageSet numbered_set(int64_t n, int64_t c = 3, int64_t h = 8, int64_t w = 8) {
  torch::manual_seed(7);
  ImageSet set;
  set.images = torch::randint(0, 256, {n, c, h, w}, torch::kInt64).to(torch::kUInt8);
  set.labels = torch::arange(n, torch::kInt64);
  set.source = "numbered";
  return set;
}

std::vector<Batch> run(const ImageSet& set, const LoaderOptions& options, int64_t epoch,
                       int64_t start_batch = 0) {
  BatchLoader loader(set, options, epoch, start_batch);
  std::vector<Batch> batches;
  for (Batch b; loader.next(b);) batches.push_back(b);
  return batches;
}

std::vector<int64_t> order_of(const std::vector<Batch>& batches) {
  std::vector<int64_t> order;
  for (const auto& b : batches) {
    for (int64_t i = 0; i < b.y.size(0); ++i) order.push_back(b.y[i].item<int64_t>());
  }
  return order;
}

// A data-parallel rank's rows [begin, end) of every batch are those rows of
// the whole batches, augmentation ids included.
void expect_share_as_in_whole_batch(const ImageSet& set, LoaderOptions o, int64_t epoch,
                                    const std::vector<Batch>& whole, int64_t begin, int64_t end) {
  o.rows_begin = begin;
  o.rows_end = end;
  const auto share = run(set, o, epoch);
  ASSERT_EQ(share.size(), whole.size());
  for (size_t bi = 0; bi < share.size(); ++bi) {
    EXPECT_TRUE(torch::equal(share[bi].x, whole[bi].x.slice(0, begin, end)));
    EXPECT_TRUE(torch::equal(share[bi].aug, whole[bi].aug.slice(0, begin, end)));
  }
}

LoaderOptions small(int64_t batch_size, bool augment) {
  LoaderOptions o;
  o.batch_size = batch_size;
  o.seed = 42;
  o.augment = augment;
  o.mean = {0.5f};
  o.std = {0.25f};
  return o;
}

TEST(Loader, CoversEveryExampleOncePerEpochWithShuffle) {
  const ImageSet set = numbered_set(103);
  LoaderOptions o = small(10, /*augment=*/false);
  o.drop_last = false;
  const auto batches = run(set, o, /*epoch=*/0);
  ASSERT_EQ(batches.size(), 11u);
  EXPECT_EQ(batches.back().x.size(0), 3);
  const auto order = order_of(batches);
  EXPECT_EQ(std::set<int64_t>(order.begin(), order.end()).size(), 103u);
  EXPECT_EQ(order.size(), 103u);
  std::vector<int64_t> identity(103);
  std::iota(identity.begin(), identity.end(), 0);
  EXPECT_NE(order, identity);  // it really shuffled
  // Images travel with their labels.
  for (const auto& b : batches) {
    EXPECT_TRUE(
        torch::equal(b.x, normalize_images(set.images.index_select(0, b.y), o.mean, o.std)));
  }
}

TEST(Loader, DropLastAndNoShuffle) {
  const ImageSet set = numbered_set(103);
  LoaderOptions o = small(10, false);
  o.shuffle = false;
  BatchLoader loader(set, o, 3);
  EXPECT_EQ(loader.batches_per_epoch(), 10);
  const auto order = order_of(run(set, o, 3));
  std::vector<int64_t> identity(100);
  std::iota(identity.begin(), identity.end(), 0);
  EXPECT_EQ(order, identity);
}

TEST(Loader, NearEqualBatchSize) {
  EXPECT_EQ(data::near_equal_batch_size(500, 128), 125);
  EXPECT_EQ(data::near_equal_batch_size(129, 128), 65);
  EXPECT_EQ(data::near_equal_batch_size(50, 12), 10);
  EXPECT_EQ(data::near_equal_batch_size(7, 128), 7);
  for (int64_t n = 1; n <= 300; ++n)
    for (int64_t m = 1; m <= 140; ++m) {
      const int64_t b = data::near_equal_batch_size(n, m), k = (n + b - 1) / b;
      ASSERT_LE(b, m) << n << " " << m;
      ASSERT_EQ(k, (n + m - 1) / m) << n << " " << m;       // no more batches than needed
      ASSERT_LT(k * b - n, k) << n << " " << m;             // the last one short by < k
      ASSERT_GT(n, (k - 1) * b) << n << " " << m;           // and not empty
      if (b > 1) {  // one less would need another batch
        ASSERT_GT((n + b - 2) / (b - 1), k) << n << " " << m;
      }
    }
  expect_error([] { data::near_equal_batch_size(0, 4); }, {"0 examples", ">= 1"});
}

TEST(Loader, DeterministicPerSeedAndEpochAndDifferentAcross) {
  const ImageSet set = numbered_set(64);
  const LoaderOptions o = small(8, /*augment=*/true);
  const auto a = run(set, o, 1), b = run(set, o, 1), c = run(set, o, 2);
  ASSERT_EQ(a.size(), b.size());
  for (size_t i = 0; i < a.size(); ++i) {
    EXPECT_TRUE(torch::equal(a[i].x, b[i].x));
    EXPECT_TRUE(torch::equal(a[i].y, b[i].y));
  }
  EXPECT_NE(order_of(a), order_of(c));
  LoaderOptions other = o;
  other.seed = 43;
  EXPECT_NE(order_of(a), order_of(run(set, other, 1)));
}

TEST(Loader, StartBatchResumesBitExactly) {
  const ImageSet set = numbered_set(70);
  LoaderOptions o = small(8, /*augment=*/true);
  o.drop_last = false;
  const auto full = run(set, o, 5);
  ASSERT_EQ(full.size(), 9u);
  for (int64_t k : {1, 4, 8, 9}) {
    const auto resumed = run(set, o, 5, /*start_batch=*/k);
    ASSERT_EQ(resumed.size(), full.size() - k) << k;
    for (size_t i = 0; i < resumed.size(); ++i) {
      EXPECT_TRUE(torch::equal(resumed[i].x, full[k + i].x)) << "k=" << k << " i=" << i;
      EXPECT_TRUE(torch::equal(resumed[i].y, full[k + i].y));
    }
  }
  expect_error([&] { BatchLoader(set, o, 5, /*start_batch=*/10); }, {"start_batch 10"});
}

TEST(Loader, NormalisationKnownAnswer) {
  ImageSet set;
  set.images = torch::tensor({0, 255, 51, 102}, torch::kUInt8).reshape({1, 2, 1, 2});
  set.labels = torch::tensor({4}, torch::kInt64);
  LoaderOptions o;
  o.batch_size = 1;
  o.mean = {0.5f, 0.0f};
  o.std = {0.25f, 0.5f};
  Batch b;
  BatchLoader loader(set, o, 0);
  ASSERT_TRUE(loader.next(b));
  const torch::Tensor expected = torch::tensor({-2.0f, 2.0f, 0.4f, 0.8f}).reshape({1, 2, 1, 2});
  EXPECT_TRUE(torch::allclose(b.x, expected, /*rtol=*/0, /*atol=*/1e-6));
  EXPECT_EQ(b.y.item<int64_t>(), 4);
  EXPECT_FALSE(loader.next(b));
  EXPECT_TRUE(torch::equal(normalize_images(set.images, o.mean, o.std), b.x));
  EXPECT_TRUE(torch::equal(normalize_images(set.images[0], o.mean, o.std), b.x[0]));
  expect_error([&] { normalize_images(set.images, {0.1f, 0.2f, 0.3f}, {1.0f}); }, {"mean has 3"});
  expect_error([&] { normalize_images(set.images, {0.1f}, {0.0f}); }, {"std > 0"});
}

TEST(Loader, HflipOnlyMirrorsOrKeeps) {
  const ImageSet set = numbered_set(64, 1, 6, 7);
  LoaderOptions o = small(16, /*augment=*/true);
  o.crop_padding = 0;
  int flipped = 0, kept = 0;
  for (const auto& b : run(set, o, 0)) {
    const torch::Tensor plain = normalize_images(set.images.index_select(0, b.y), o.mean, o.std);
    for (int64_t i = 0; i < b.x.size(0); ++i) {
      const bool same = torch::equal(b.x[i], plain[i]);
      const bool mirror = torch::equal(b.x[i], plain[i].flip({2}));
      EXPECT_TRUE(same || mirror);
      flipped += mirror;
      kept += same;
    }
  }
  EXPECT_GT(flipped, 16);
  EXPECT_GT(kept, 16);
}

TEST(Loader, CropIsAShiftWithZeroPadding) {
  const int64_t h = 6, w = 7, pad = 2;
  const ImageSet set = numbered_set(48, 2, h, w);
  LoaderOptions o = small(16, /*augment=*/true);
  o.hflip = false;
  o.crop_padding = pad;
  std::set<std::pair<int64_t, int64_t>> shifts_seen;
  for (const auto& b : run(set, o, 0)) {
    for (int64_t i = 0; i < b.x.size(0); ++i) {
      // The reference: pad the raw image with zeros, cut the shifted window, normalise.
      const torch::Tensor padded =
          torch::constant_pad_nd(set.images[b.y[i].item<int64_t>()], {pad, pad, pad, pad}, 0);
      bool found = false;
      for (int64_t dy = -pad; dy <= pad && !found; ++dy) {
        for (int64_t dx = -pad; dx <= pad && !found; ++dx) {
          const torch::Tensor window =
              padded.slice(1, pad + dy, pad + dy + h).slice(2, pad + dx, pad + dx + w);
          if (torch::equal(b.x[i], normalize_images(window.contiguous(), o.mean, o.std))) {
            found = true;
            shifts_seen.insert({dy, dx});
          }
        }
      }
      EXPECT_TRUE(found) << "example " << i;
    }
  }
  EXPECT_GT(shifts_seen.size(), 10u);  // of 25 possible
}

// Random erasing: about the asked share of images differ from the un-erased
// batch, and only inside one rectangle of 2%..1/3 of the image set to 0 (the
// mean) in every channel; crops and flips are the same as with erasing off;
// a rank's share of a batch is erased as in the whole batch.
TEST(Loader, RandomErasingOneRectangleAtTheMeanLeavingCropsAndFlipsAlone) {
  const int64_t h = 12, w = 10;
  const ImageSet set = numbered_set(400, 2, h, w);
  LoaderOptions o = small(40, /*augment=*/true);
  o.crop_padding = 1;
  const auto plain = run(set, o, 3);
  o.random_erase = 0.5;
  const auto erased = run(set, o, 3);
  ASSERT_EQ(plain.size(), erased.size());
  int64_t changed = 0, total = 0;
  for (size_t bi = 0; bi < plain.size(); ++bi) {
    ASSERT_TRUE(torch::equal(plain[bi].y, erased[bi].y));
    for (int64_t i = 0; i < plain[bi].x.size(0); ++i, ++total) {
      // An erased image has no crop/flip id (a teacher must not cache it); the others keep theirs.
      const int64_t id = erased[bi].aug[i].item<int64_t>();
      if (id >= 0) {
        EXPECT_EQ(id, plain[bi].aug[i].item<int64_t>());
      }
      const auto diff = (plain[bi].x[i] != erased[bi].x[i]);  // [C, H, W]
      if (!diff.any().item<bool>()) continue;
      EXPECT_EQ(id, -1);
      ++changed;
      // The erased pixels are 0, and form one rectangle shared by the channels.
      const auto any_c = diff.any(0);  // [H, W]
      const auto rows = torch::nonzero(any_c.any(1)).view(-1), cols = torch::nonzero(any_c.any(0)).view(-1);
      const int64_t r0 = rows.min().item<int64_t>(), r1 = rows.max().item<int64_t>() + 1;
      const int64_t c0 = cols.min().item<int64_t>(), c1 = cols.max().item<int64_t>() + 1;
      const auto box = erased[bi].x[i].slice(1, r0, r1).slice(2, c0, c1);
      EXPECT_TRUE(torch::equal(box, torch::zeros_like(box)));
      const double frac = double((r1 - r0) * (c1 - c0)) / double(h * w);
      EXPECT_LE(frac, 1.0 / 3.0 + 0.05);
      // Outside the box nothing changed.
      auto outside = erased[bi].x[i].clone();
      outside.slice(1, r0, r1).slice(2, c0, c1).copy_(plain[bi].x[i].slice(1, r0, r1).slice(2, c0, c1));
      EXPECT_TRUE(torch::equal(outside, plain[bi].x[i]));
    }
  }
  // p = 0.5, less the rectangles that happen to cover pixels already at the mean.
  EXPECT_GT(changed, total * 35 / 100);
  EXPECT_LT(changed, total * 60 / 100);

  expect_share_as_in_whole_batch(set, o, 3, erased, 10, 30);

  o.random_erase = 1.5;
  expect_error([&] { BatchLoader(set, o, 0); }, {"random_erase 1.5", "[0, 1]"});
}

// AutoAugment after the crop and flip: with the policy off the batches are
// those of the plain loader; with it on, an image whose id is kept (no step
// ran) is exactly the plain one, about the policy's share of images gets id
// -1, the crops and flips underneath are unchanged (the policy draws from
// streams of its own), and a rank's share of a batch is augmented as in the
// whole batch.
TEST(Loader, AutoAugmentAfterCropAndFlipWithItsOwnDraws) {
  const ImageSet set = numbered_set(300, 1, 12, 12);
  LoaderOptions o = small(30, /*augment=*/true);
  o.crop_padding = 1;
  const auto plain = run(set, o, 2);
  o.auto_augment = AutoAugmentPolicy::kImageNet;
  const auto aa = run(set, o, 2);
  const auto again = run(set, o, 2);
  ASSERT_EQ(plain.size(), aa.size());
  int64_t keyless = 0, total = 0;
  for (size_t bi = 0; bi < plain.size(); ++bi) {
    ASSERT_TRUE(torch::equal(plain[bi].y, aa[bi].y));
    EXPECT_TRUE(torch::equal(aa[bi].x, again[bi].x));
    for (int64_t i = 0; i < aa[bi].x.size(0); ++i, ++total) {
      const int64_t id = aa[bi].aug[i].item<int64_t>();
      if (id < 0) {
        ++keyless;
        continue;
      }
      EXPECT_EQ(id, plain[bi].aug[i].item<int64_t>());
      EXPECT_TRUE(torch::equal(aa[bi].x[i], plain[bi].x[i]));
    }
  }
  EXPECT_GT(keyless, total * 65 / 100);
  EXPECT_LT(keyless, total * 95 / 100);

  expect_share_as_in_whole_batch(set, o, 2, aa, 5, 20);
}

TEST(Loader, DestroyedMidEpochDoesNotHang) {
  const ImageSet set = numbered_set(2000, 1, 8, 8);
  const auto start = std::chrono::steady_clock::now();
  for (int trial = 0; trial < 20; ++trial) {
    LoaderOptions o = small(10, true);
    o.prefetch = 1 + trial % 3;
    BatchLoader loader(set, o, trial);
    Batch b;
    for (int i = 0; i < trial % 4; ++i) ASSERT_TRUE(loader.next(b));
  }  // destructor joins while the producer waits on a full queue
  EXPECT_LT(std::chrono::steady_clock::now() - start, std::chrono::seconds(5));
}

TEST(Loader, RejectsBadOptions) {
  const ImageSet set = numbered_set(5);
  LoaderOptions o = small(8, false);
  expect_error([&] { BatchLoader(set, o, 0); }, {"numbered", "batch_size 8"});
  o.batch_size = 2;
  o.prefetch = 0;
  expect_error([&] { BatchLoader(set, o, 0); }, {"prefetch 0"});
  o.prefetch = 2;
  ImageSet labelled = set;
  labelled.class_names = {"a", "b", "c"};
  expect_error([&] { BatchLoader(labelled, o, 0); }, {"numbered", "example 3 has label 3"});
  o.prefetch = 2;
  o.mean = {0.1f, 0.2f};
  expect_error([&] { BatchLoader(set, o, 0); }, {"mean has 2"});
}

TEST(Loader, ChannelStatsKnownAnswer) {
  ImageSet set;
  // Channel 0 holds 0 and 255 (mean 0.5, std 0.5); channel 1 holds only 51 (0.2, 0).
  set.images = torch::tensor({0, 255, 51, 51, 255, 0, 51, 51}, torch::kUInt8).reshape({2, 2, 1, 2});
  set.labels = torch::tensor({0, 1}, torch::kInt64);
  const auto [mean, stdev] = channel_stats(set);
  ASSERT_EQ(mean.size(), 2u);
  EXPECT_NEAR(mean[0], 0.5f, 1e-6);
  EXPECT_NEAR(stdev[0], 0.5f, 1e-6);
  EXPECT_NEAR(mean[1], 0.2f, 1e-6);
  EXPECT_NEAR(stdev[1], 0.0f, 1e-6);
}

}  // namespace
}  // namespace moev::data
