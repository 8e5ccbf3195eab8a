// manifest.json of an exported Q-DiT4SR folder: parsed, validated against the files beside it.
//
// Mirrors qdit4sr/artifacts/manifest.py (version 1): the same checks, the same one-line messages.
#pragma once

#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "qdit4sr/error.hpp"

namespace qdit4sr {

// A file inside the exported folder (relative path), its size and sha256 (lower-case hex).
struct FileRef {
  std::string path;
  std::string sha256;
  std::uint64_t size = 0;
};

struct TensorSpec {
  std::string name;
  std::vector<std::int64_t> shape;  // -1 marks the dynamic "batch" axis
  std::string dtype;
};

struct SegmentEntry {
  int index = 0;
  int step_begin = 0;  // [step_begin, step_end) sampler steps
  int step_end = 0;
  std::vector<double> timesteps;
  std::map<std::string, FileRef> graphs;  // flavour -> graph file
  std::optional<FileRef> engine;
};

// PipelineConfig of qdit4sr/models/pipeline.py (same defaults for absent keys).
struct SamplerSettings {
  int num_inference_steps = 40;
  double shift = 3.0;
  double guidance_scale = 8.0;
  int tile_size = 64;
  int tile_overlap = 24;
  int tile_batch = 16;
  int min_lr_side = 128;
  std::string color_fix = "adain";
};

struct TransformerSettings {
  int patch_size = 0;
  int in_channels = 0;
  int out_channels = 0;
  int joint_attention_dim = 0;
  int pooled_projection_dim = 0;
};

// "pixel_unshuffle" (factor, scaling) or "vae" (path; encoder/decoder graphs when exported).
struct CodecSpec {
  std::string kind;
  int factor = 0;
  double scaling = 0.0;
  std::string vae_path;
  std::optional<FileRef> vae_encoder;
  std::optional<FileRef> vae_decoder;
};

struct Manifest {
  int version = 0;
  std::string model_hash;
  std::string precision;
  FileRef plan;
  SamplerSettings sampler;
  CodecSpec codec;
  TransformerSettings transformer;
  int tile_latent = 0;
  int text_tokens = 0;
  std::vector<SegmentEntry> segments;
  std::vector<TensorSpec> inputs;
  std::vector<TensorSpec> outputs;
  std::optional<FileRef> shared_weights;
  std::optional<FileRef> prompt_embeds;

  static constexpr int kVersion = 1;

  // Parse `text` (the contents of manifest.json); throws Error on malformed JSON or fields.
  static Manifest parse(const std::string& text);
  // Read and validate folder/manifest.json against the files beside it (sizes, sha256 when
  // check_hashes, segment coverage, sampler settings, bit plan segments). Throws Error.
  static Manifest load(const std::string& folder, bool check_hashes = true);

  int num_steps() const { return segments.empty() ? 0 : segments.back().step_end; }
  int segment_of_step(int step) const;  // throws Error outside [0, num_steps)
  std::vector<std::string> flavours() const;
};

// folder + "/" + ref.path, after checking that the path stays inside the folder.
std::string resolve(const std::string& folder, const FileRef& ref);

}  // namespace qdit4sr
