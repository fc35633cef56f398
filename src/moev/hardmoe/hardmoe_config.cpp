#include "moev/hardmoe/hardmoe_config.h"

#include <filesystem>

#include "moev/core/error.h"
#include "moev/core/utf8.h"
#include "moev/io/table.h"
#include "moev/train/trainer.h"

namespace moev::hardmoe {

namespace fs = std::filesystem;
using nlohmann::json;

HardMoEConfig parse_hardmoe_config(const json& file, const io::RunConfig& run, const std::string& source) {
  HardMoEConfig c;
  const json section = file.is_object() && file.contains("hardmoe") ? file["hardmoe"] : json::object();
  MOEV_CHECK(section.is_object(), source, ": [hardmoe] must be a table of keys");
  for (auto& [key, v] : section.items()) {
    const std::string where = source + ": hardmoe." + key;
    auto str = [&](std::string& out) {
      MOEV_CHECK(v.is_string(), where, ": expected a string, got ", io::output_json(v, -1));
      out = v.get<std::string>();
      check_utf8(out, where);
    };
    auto integer = [&](int64_t& out, int64_t min) {
      MOEV_CHECK(v.is_number_integer() && v.get<int64_t>() >= min, where, ": expected an integer >= ", min,
                 ", got ", v.dump());
      out = v.get<int64_t>();
    };
    if (key == "trunk") str(c.trunk);
    else if (key == "dir") str(c.dir);
    else if (key == "experts") integer(c.experts, 1);
    else if (key == "kmeans_iters") integer(c.kmeans_iters, 1);
    else if (key == "kmeans_batch") integer(c.kmeans_batch, -1);
    else if (key == "expert_threads") {
      int64_t t = 0;
      integer(t, 0);
      c.expert_threads = static_cast<int>(t);
    }
    else if (key == "expert_epochs") integer(c.expert_epochs, 0);
    else if (key == "expert_warmup_steps") integer(c.expert_warmup_steps, -1);
    else if (key == "seed") {
      int64_t s = 0;
      integer(s, 0);
      c.seed = static_cast<uint64_t>(s);
    } else if (key == "init") {
      str(c.init);
      MOEV_CHECK(c.init == "trunk" || c.init == "scratch", where, " = '", c.init, "': expected trunk or scratch");
    } else if (key == "share_decoder") {
      MOEV_CHECK(v.is_boolean(), where, ": expected true or false, got ", v.dump());
      c.share_decoder = v.get<bool>();
    } else if (key == "expert_lr") {
      MOEV_CHECK(v.is_number() && v.get<double>() >= 0, where, ": expected a number >= 0, got ", v.dump());
      c.expert_lr = v.get<double>();
    } else {
      fail(where, ": unknown key; expected trunk, dir, experts, kmeans_iters, kmeans_batch, seed, init, ",
           "share_decoder, expert_epochs, expert_lr, expert_warmup_steps, expert_threads");
    }
  }
  if (c.trunk.empty()) c.trunk = train::checkpoint_path(run.train.out_dir);
  if (c.dir.empty()) c.dir = (fs::path(run.train.out_dir) / ("hardmoe" + std::to_string(c.experts))).string();
  return c;
}

std::string model_file(const std::string& dir) { return (fs::path(dir) / "hardmoe.json").string(); }

std::string expert_dir(const std::string& dir, int64_t expert) {
  return (fs::path(dir) / ("expert_" + std::to_string(expert))).string();
}

}  // namespace moev::hardmoe
