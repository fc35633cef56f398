// Config files and overrides: layering, types, and errors that name file and key.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>

#include <nlohmann/json.hpp>

#include "support/expect_error.h"
#include "support/temp_dir.h"
#include "moev/io/run_config.h"
#include "moev/models/model_config.h"

using namespace moev;

TEST(RunConfig, TomlJsonAndOverridesLayer) {
  test::TempDir dir;
  std::ofstream(dir.file("a.toml")) << "[model]\npreset = \"vmoe-tiny\"\nmoe = \"every-2\"\n"
                                       "[moe]\nk = 1\ncapacity = 0.5\nbpr = true\n"
                                       "[train]\nlr = 0.01\n";
  auto c = io::load_run_config(dir.file("a.toml"));
  EXPECT_EQ(c.model.router.num_experts, 8);  // from the preset
  EXPECT_EQ(c.model.router.k, 1);
  EXPECT_DOUBLE_EQ(c.model.router.capacity_factor, 0.5);
  EXPECT_TRUE(c.model.router.bpr);
  EXPECT_EQ(c.model.moe.kind, "every");
  EXPECT_DOUBLE_EQ(c.train.lr, 0.01);
  io::apply_override(c, "train.lr=0.002");
  io::apply_override(c, "train.device=cpu");
  io::apply_override(c, "moe.router=expert_choice");
  EXPECT_DOUBLE_EQ(c.train.lr, 0.002);
  EXPECT_EQ(c.model.router.kind, moe::RouterKind::kExpertChoice);
  // A name without an extension (`--config <(...)`: /dev/fd/63) is read by its first character.
  std::ofstream(dir.file("plain_json")) << "\n  {\"train\": {\"epochs\": 7}}";
  EXPECT_EQ(io::load_run_config(dir.file("plain_json")).train.epochs, 7);
  std::ofstream(dir.file("plain_toml")) << "# comment\n[train]\nepochs = 6\n";
  EXPECT_EQ(io::load_run_config(dir.file("plain_toml")).train.epochs, 6);
  std::ofstream(dir.file("plain_bad")) << "train: {epochs: 5}\n";
  test::expect_error([&] { io::load_run_config(dir.file("plain_bad")); },
                     {"plain_bad", "invalid TOML", "does not start with '{'"});
  std::ofstream(dir.file("c.yaml")) << "[train]\nepochs = 6\n";
  test::expect_error([&] { io::load_run_config(dir.file("c.yaml")); }, {"c.yaml", "expected a .toml or .json"});
  // An ensemble's config given to a run is named as such, not as an unknown key.
  std::ofstream(dir.file("e.toml")) << "[ensemble]\nmembers = [\"a.pt\"]\n";
  test::expect_error([&] { io::load_run_config(dir.file("e.toml")); }, {"e.toml", "[ensemble]", "moev ensemble"});
  // The extension in capitals (a case-blind file system's copy) is the same kind.
  std::ofstream(dir.file("C.TOML")) << "[train]\nepochs = 4\n";
  EXPECT_EQ(io::load_run_config(dir.file("C.TOML")).train.epochs, 4);
  std::ofstream(dir.file("C.Json")) << R"({"train": {"epochs": 2}})";
  EXPECT_EQ(io::load_run_config(dir.file("C.Json")).train.epochs, 2);
  // JSON round trip keeps every field.
  auto back = io::from_json_string(io::to_json_string(c), "roundtrip");
  EXPECT_EQ(io::to_json_string(back), io::to_json_string(c));
  std::ofstream(dir.file("b.json")) << R"({"moe": {"num_experts": 16}, "train": {"epochs": 3}})";
  auto j = io::load_run_config(dir.file("b.json"));
  EXPECT_EQ(j.model.router.num_experts, 16);
  EXPECT_EQ(j.train.epochs, 3);
  // A list-of-strings field takes one string as a list of one.
  io::apply_override(c, "train.teacher=runs/t/checkpoint.pt");
  EXPECT_EQ(c.train.teacher, std::vector<std::string>{"runs/t/checkpoint.pt"});
  io::apply_override(c, "train.teacher=[\"a.pt\", \"b.pt\"]");
  EXPECT_EQ(c.train.teacher, (std::vector<std::string>{"a.pt", "b.pt"}));
  test::expect_error([&] { io::apply_override(c, "train.teacher=[1, 2]"); },
                     {"train.teacher", "expected a string or a list of strings"});
}

TEST(RunConfig, BadInputsNameFileAndKey) {
  test::TempDir dir;
  std::ofstream(dir.file("unknown.toml")) << "[train]\nlrr = 0.1\n";
  test::expect_error([&] { io::load_run_config(dir.file("unknown.toml")); },
                     {"unknown.toml", "train.lrr", "unknown config key", "did you mean 'train.lr'?"});
  // A key of another section is named in its own; one far from every key gets no guess.
  test::expect_error([] { io::override_json("train.augment=true"); }, {"did you mean 'data.augment'?"});
  try {
    io::override_json("model.zzzzzz=1");
    ADD_FAILURE() << "model.zzzzzz was taken";
  } catch (const Error& e) {
    EXPECT_EQ(std::string(e.what()).find("did you mean"), std::string::npos) << e.what();
  }
  std::ofstream(dir.file("type.toml")) << "[train]\nepochs = \"ten\"\n";
  test::expect_error([&] { io::load_run_config(dir.file("type.toml")); },
                     {"type.toml", "train.epochs", "expected an integer"});
  // A router kind or a preset of another name: the key and the file were not named.
  std::ofstream(dir.file("router.toml")) << "[moe]\nrouter = \"foo\"\n";
  test::expect_error([&] { io::load_run_config(dir.file("router.toml")); },
                     {"router.toml: moe.router", "'foo'", "expected topk or expert_choice"});
  io::RunConfig rc;
  test::expect_error([&] { io::apply_override(rc, "moe.router=foo"); }, {"--set moe.router=foo", "'foo'"});
  std::ofstream(dir.file("preset.toml")) << "[model]\npreset = \"vmoe-tin\"\n";
  test::expect_error([&] { io::load_run_config(dir.file("preset.toml")); },
                     {"preset.toml: model.preset", "'vmoe-tin' is unknown"});
  std::ofstream(dir.file("syntax.toml")) << "[train\nepochs = 1\n";
  test::expect_error([&] { io::load_run_config(dir.file("syntax.toml")); },
                     {"syntax.toml", "invalid TOML"});
  std::ofstream(dir.file("syntax.json")) << "{\"train\": {";
  test::expect_error([&] { io::load_run_config(dir.file("syntax.json")); },
                     {"syntax.json", "invalid JSON"});
  // JSON would keep the last of two equal keys (here dropping the preset), and
  // a number past double's range had no file or key in its message.
  std::ofstream(dir.file("twice.json")) << R"({"model": {"preset": "vit-tiny"}, "model": {"width": 64}})";
  test::expect_error([&] { io::load_run_config(dir.file("twice.json")); },
                     {"twice.json", "key 'model' appears twice"});
  std::ofstream(dir.file("twice_inner.json")) << R"({"train": {"lr": 0.1, "epochs": 2, "lr": 0.2}})";
  test::expect_error([&] { io::load_run_config(dir.file("twice_inner.json")); }, {"key 'lr' appears twice"});
  std::ofstream(dir.file("same_key_two_tables.json")) << R"({"model": {"width": 64}, "train": {"epochs": 2}, "data": {"augment": true}})";
  EXPECT_NO_THROW(io::load_run_config(dir.file("same_key_two_tables.json")));
  std::ofstream(dir.file("huge.json")) << R"({"train": {"lr": 1e400}})";
  test::expect_error([&] { io::load_run_config(dir.file("huge.json")); }, {"huge.json", "invalid JSON", "1e400"});
  {
    io::RunConfig h;
    test::expect_error([&] { io::apply_override(h, "train.lr=1e400"); }, {"--set train.lr=1e400", "not a number"});
    // 2^64 - 1 read as -1, 2^40 threads as 0: out of range, named as written.
    test::expect_error([&] { io::apply_override(h, "model.width=18446744073709551615"); },
                       {"model.width", "18446744073709551615 is out of range"});
    test::expect_error([&] { io::apply_override(h, "train.threads=1099511627776"); },
                       {"train.threads", "1099511627776 is out of range", "2147483647"});
    test::expect_error([&] { io::apply_override(h, "model.dims=[16,18446744073709551615]"); },
                       {"model.dims", "out of range"});
    io::apply_override(h, "train.seed=18446744073709551615");  // a uint64 seed holds it
    EXPECT_EQ(h.train.seed, 18446744073709551615ull);
  }
  // 200,000 levels segfaulted (an error message dumped the value recursively); TOML stops at 256 itself.
  {
    std::string deep = R"({"model": {"dims": )";
    for (int i = 0; i < 200000; ++i) deep += R"({"a":)";
    deep += "1" + std::string(200000, '}') + "}}";
    std::ofstream(dir.file("deep.json")) << deep;
    test::expect_error([&] { io::load_run_config(dir.file("deep.json")); }, {"deep.json", "deeper than 256"});
    io::RunConfig h;
    test::expect_error([&] { io::apply_override(h, "model.dims=" + std::string(100000, '[')); },
                       {"--set model.dims", "deeper than 256"});
    std::string ok = R"({"model": {"dims": )" + std::string(200, '[') + std::string(200, ']') + "}}";
    std::ofstream(dir.file("shallow.json")) << ok;  // deep enough to reach the type check, which names the key
    test::expect_error([&] { io::load_run_config(dir.file("shallow.json")); }, {"shallow.json", "model.dims"});
  }
  // A directory read as an empty config (the defaults, trained at exit 0).
  std::filesystem::create_directories(dir.file("dir.toml"));
  test::expect_error([&] { io::load_run_config(dir.file("dir.toml")); }, {"dir.toml", "is a directory"});
  std::ofstream(dir.file("preset.toml")) << "[model]\npreset = \"vit-giant\"\n";
  test::expect_error([&] { io::load_run_config(dir.file("preset.toml")); }, {"vit-giant"});
  test::expect_error([&] { io::load_run_config(dir.file("missing.toml")); },
                     {"missing.toml", "cannot open"});
  io::RunConfig c;
  test::expect_error([&] { io::apply_override(c, "train.lr"); }, {"section.key=value"});
  test::expect_error([&] { io::apply_override(c, "moe.placement=last-2"); }, {"moe.placement"});
  test::expect_error([&] { io::apply_override(c, "model.moe=last-two"); }, {"last-two"});
  io::apply_override(c, "moe.router_logits=dot");
  test::expect_error([&] { moev::moe::validate(c.model.router); },
                     {"moe.router_logits", "dot", "linear or cosine"});
  io::apply_override(c, "moe.router_logits=cosine");
  io::apply_override(c, "model.precision=fp16");  // checked with the model, like every field
  test::expect_error([&] { models::validate(c.model); }, {"model.precision", "fp16", "bf16"});
}

// Every config the repository ships loads (other commands' sections aside), and
// its model passes validation and builds: an edited example fails here, not in
// a user's first run.
TEST(RunConfig, ResNeStCheckpointRecordedAsBf16ReadsAsFp32) {
  // Before ResNeSt refused bf16 it accepted it and ran fp32: its checkpoints still load.
  io::RunConfig c;
  c.model = models::preset("resnest-mb-tiny");
  auto j = io::to_json(c);
  j["model"]["precision"] = "bf16";
  const auto back = io::from_json_string(j.dump(), "old.pt");
  EXPECT_EQ(back.model.precision, "fp32");
  models::validate(back.model);
  c.model = models::preset("vit-tiny");  // others keep their bf16
  j = io::to_json(c);
  j["model"]["precision"] = "bf16";
  EXPECT_EQ(io::from_json_string(j.dump(), "vit.pt").model.precision, "bf16");
}

TEST(RunConfig, ShippedConfigsLoadAndBuild) {
  int n = 0;
  for (const auto& entry : std::filesystem::directory_iterator(std::string(MOEV_SOURCE_DIR) + "/configs")) {
    const auto path = entry.path().string();
    SCOPED_TRACE(path);
    io::RunConfig c;
    ASSERT_NO_THROW(c = io::load_run_config(path));
    ASSERT_NO_THROW(models::validate(c.model));
    EXPECT_NE(models::build_model(c.model), nullptr);
    ++n;
  }
  EXPECT_GE(n, 9);
}

// --help-config lists the keys section by section: model.moe and moe.router came after every train key.
TEST(RunConfig, KeysAreListedSectionBySection) {
  std::vector<std::string> sections;
  for (const auto& [key, help] : moev::io::config_keys()) {
    const std::string section = key.substr(0, key.find('.'));
    if (sections.empty() || sections.back() != section) sections.push_back(section);
  }
  const std::vector<std::string> want{"model", "moe", "data", "train"};
  EXPECT_EQ(sections, want);
}
