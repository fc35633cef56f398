// What a trained MoE model's routing says about its classes: per MoE layer the
// expert x class heatmap (the V-MoE paper's figure), expert load, dropped
// fraction and a one-number specialisation score, written as PNG, Markdown and
// JSON by `moev analyze`.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace moev::analysis {

using Counts = std::vector<std::vector<int64_t>>;  // [expert][class] placed assignments
using Weights = std::vector<std::vector<double>>;  // [expert][class] summed routing weights

// Mutual information, in bits, between the expert an assignment went to and the
// class of its image, under the empirical joint distribution `counts`.
double mutual_information_bits(const Counts& counts);
// The same normalised to [0, 1] by the smaller of H(expert) and H(class): 0 when
// routing ignores the class, 1 when one determines the other; NaN (undefined,
// "n/a" in reports) when the assignments come from fewer than two classes.
double specialisation(const Counts& counts);
// A score for people: `decimals` decimals, or "n/a" where it is undefined (NaN).
std::string score_text(double v, int decimals = 3);
// P(expert | class): each class's assignments split over the experts (columns
// sum to 1), [expert][class].
std::vector<std::vector<double>> expert_given_class(const Counts& counts);
// The same score with every placed assignment counted by its routing weight
// (gate) instead of 1: a token sent to an expert with a weight of 0.05 says
// less about that expert than one sent with 0.9.
double weighted_specialisation(const Weights& gate_sums);
// The V-MoE paper's heatmap (Riquelme et al. 2021, figure of routing weights
// against classes): the mean routing weight of expert e over all tokens of
// class c, gate_sums[e][c] / class_tokens[c], [expert][class].
Weights mean_routing_weight(const Weights& gate_sums, const std::vector<double>& class_tokens);

// How an image's assignments spread over the experts (Videau et al. saw fewer
// experts serve each image in deeper layers): the entropy of each image's
// expert histogram, weighted by its assignments and accumulated over images.
struct ImageSpread {
  double weighted_bits = 0;  // sum over images i of n_i * H(expert | image i)
  double assignments = 0;    // sum of n_i
  // by_image: [expert][image] placed assignments of one batch.
  void add(const Counts& by_image);
  void merge(const ImageSpread& other);
  double mean_bits() const;  // H(expert | image) in bits; 0 before any add
};

struct LayerRouting {
  std::string name;             // module path of the MoE layer
  Counts counts;                // [expert][class]
  std::vector<double> load;     // share of placed assignments per expert
  double dropped = 0;           // fraction of assignments past capacity (EC: of tokens no expert took)
  double unrouted = 0;          // fraction of tokens that got no expert (residual only)
  // H(expert | image) in bits, and the same with each position's tokens shuffled
  // over all the test images: a layer with few tokens per image shows few
  // experts per image by chance alone, so only the gap says routing is per image.
  double image_bits = 0, chance_image_bits = 0;
  Weights gate_sums;                 // [expert][class] routing weights of placed assignments (empty: not measured)
  std::vector<double> class_tokens;  // [class] tokens this layer saw from images of each class
};

// 1 - image_bits / chance_image_bits: 0 when an image's tokens spread over the
// experts as randomly drawn tokens would, 1 when each image keeps to one set,
// below 0 when an image's tokens spread wider than chance (experts split images
// by their parts).
double image_concentration(const LayerRouting& layer);

// Writes <dir>/routing_<i>.png per layer, routing.md and routing.json; returns the
// paths written. Throws moev::Error naming a file it cannot write.
std::vector<std::string> write_routing_report(const std::vector<LayerRouting>& layers,
                                              const std::vector<std::string>& class_names,
                                              const std::string& title, const std::string& dir);

// One point of an accuracy-against-capacity curve.
struct CapacityPoint {
  double capacity = 0;
  bool bpr = false;
  double top1 = 0;
  double dropped = 0;   // mean over MoE layers
  double unrouted = 0;  // tokens without an expert, mean over MoE layers
};
// capacity_curve.csv, .md and .png in dir; returns the paths written. expert_choice: the points are an
// Expert-Choice model's, one curve without a token priority (not "token order", and no BPR column value).
std::vector<std::string> write_capacity_curve(const std::vector<CapacityPoint>& points,
                                              const std::string& title, const std::string& dir,
                                              bool expert_choice = false);

}  // namespace moev::analysis
