#include "qdit4sr/manifest.hpp"

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <set>
#include <sstream>

#include <nlohmann/json.hpp>

#include "sha256.hpp"

namespace qdit4sr {
namespace {

namespace fs = std::filesystem;
using nlohmann::json;

constexpr const char* kManifestFile = "manifest.json";

// Raised while reading fields; turned into "manifest has malformed fields: ..." like the Python reader.
struct Malformed : std::runtime_error {
  using std::runtime_error::runtime_error;
};

const json& field(const json& j, const char* key) {
  auto it = j.find(key);
  if (it == j.end()) throw Malformed(std::string("missing key '") + key + "'");
  return *it;
}

std::int64_t as_int(const json& j, const std::string& what) {
  if (j.is_number_integer()) return j.get<std::int64_t>();
  if (j.is_number_float()) {
    double v = j.get<double>();
    if (std::floor(v) == v && std::abs(v) < 9.0e15) return static_cast<std::int64_t>(v);
  }
  throw Malformed(what + " must be an integer, got " + j.dump());
}

double as_number(const json& j, const std::string& what) {
  if (!j.is_number()) throw Malformed(what + " must be a number, got " + j.dump());
  return j.get<double>();
}

std::string as_string(const json& j, const std::string& what) {
  if (!j.is_string()) throw Malformed(what + " must be a string, got " + j.dump());
  return j.get<std::string>();
}

FileRef file_ref(const json& j, const std::string& what) {
  if (!j.is_object()) throw Malformed(what + " must be {path, sha256, size}, got " + j.dump());
  return FileRef{as_string(field(j, "path"), what + ".path"), as_string(field(j, "sha256"), what + ".sha256"),
                 static_cast<std::uint64_t>(as_int(field(j, "size"), what + ".size"))};
}

std::optional<FileRef> optional_ref(const json& j, const char* key, const std::string& what) {
  auto it = j.find(key);
  if (it == j.end() || it->is_null()) return std::nullopt;
  return file_ref(*it, what);
}

TensorSpec tensor_spec(const json& j) {
  TensorSpec t;
  t.name = as_string(field(j, "name"), "tensor name");
  t.dtype = as_string(field(j, "dtype"), t.name + ".dtype");
  const json& shape = field(j, "shape");
  if (!shape.is_array()) throw Malformed(t.name + ".shape must be a list");
  for (const json& d : shape) {
    if (d.is_string()) {
      if (d.get<std::string>() != "batch") throw Malformed(t.name + ": unknown symbolic axis " + d.dump());
      t.shape.push_back(-1);
    } else {
      t.shape.push_back(as_int(d, t.name + ".shape"));
    }
  }
  return t;
}

SamplerSettings sampler_settings(const json& j) {
  // Same keys and defaults as PipelineConfig; an unknown key is an error there too.
  if (!j.is_object()) throw Error("sampler settings are invalid: expected an object, got " + j.dump());
  SamplerSettings s;
  static const std::set<std::string> known = {"num_inference_steps", "shift", "guidance_scale", "tile_size",
                                              "tile_overlap", "tile_batch", "min_lr_side", "color_fix"};
  try {
    for (auto it = j.begin(); it != j.end(); ++it) {
      if (!known.count(it.key())) throw Malformed("unexpected key '" + it.key() + "'");
    }
    auto get_int = [&](const char* key, int& out) {
      if (j.contains(key)) out = static_cast<int>(as_int(j.at(key), key));
    };
    auto get_num = [&](const char* key, double& out) {
      if (j.contains(key)) out = as_number(j.at(key), key);
    };
    get_int("num_inference_steps", s.num_inference_steps);
    get_num("shift", s.shift);
    get_num("guidance_scale", s.guidance_scale);
    get_int("tile_size", s.tile_size);
    get_int("tile_overlap", s.tile_overlap);
    get_int("tile_batch", s.tile_batch);
    get_int("min_lr_side", s.min_lr_side);
    if (j.contains("color_fix")) s.color_fix = as_string(j.at("color_fix"), "color_fix");
  } catch (const Malformed& e) {
    throw Error(std::string("sampler settings are invalid: ") + e.what());
  }
  if (s.num_inference_steps < 1) throw Error("sampler settings are invalid: num_inference_steps must be >= 1");
  if (s.color_fix != "adain" && s.color_fix != "none") {
    throw Error("sampler settings are invalid: color_fix must be 'adain' or 'none', got '" + s.color_fix + "'");
  }
  if (!(0 <= s.tile_overlap && s.tile_overlap < s.tile_size)) {
    throw Error("sampler settings are invalid: need 0 <= tile_overlap < tile_size");
  }
  if (s.tile_batch < 1) throw Error("sampler settings are invalid: tile_batch must be >= 1");
  if (!(s.shift > 0.0)) throw Error("sampler settings are invalid: shift must be > 0");
  return s;
}

CodecSpec codec_spec(const json& j) {
  CodecSpec c;
  if (!j.is_object()) throw Malformed("codec must be an object");
  auto kind = j.find("kind");
  c.kind = (kind != j.end() && kind->is_string()) ? kind->get<std::string>() : (kind == j.end() ? "" : kind->dump());
  if (c.kind == "pixel_unshuffle") {
    c.factor = static_cast<int>(as_int(field(j, "factor"), "codec.factor"));
    c.scaling = as_number(field(j, "scaling"), "codec.scaling");
  } else if (c.kind == "vae") {
    if (j.contains("path") && j.at("path").is_string()) c.vae_path = j.at("path").get<std::string>();
    c.vae_encoder = optional_ref(j, "encoder", "codec.encoder");
    c.vae_decoder = optional_ref(j, "decoder", "codec.decoder");
  }
  return c;
}

std::string read_text(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw Error("cannot read " + path);
  std::ostringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

std::string steps_list(const std::vector<std::pair<int, int>>& steps) {
  std::string s = "[";
  for (std::size_t i = 0; i < steps.size(); ++i) {
    if (i) s += ", ";
    s += "[" + std::to_string(steps[i].first) + ", " + std::to_string(steps[i].second) + "]";
  }
  return s + "]";
}

std::string names_list(const std::vector<std::string>& names) {
  std::string s = "[";
  for (std::size_t i = 0; i < names.size(); ++i) s += (i ? ", '" : "'") + names[i] + "'";
  return s + "]";
}

void verify(const std::string& folder, const FileRef& ref, const std::string& what, bool check_hash) {
  const std::string full = resolve(folder, ref);  // throws for paths leaving the folder
  std::error_code ec;
  if (!fs::is_regular_file(full, ec)) throw Error(what + ": file " + ref.path + " is missing");
  const auto size = fs::file_size(full, ec);
  if (ec) throw Error(what + ": cannot stat " + ref.path + " (" + ec.message() + ")");
  if (size != ref.size) {
    throw Error(what + ": " + ref.path + " has " + std::to_string(size) + " bytes, the manifest says " +
                std::to_string(ref.size));
  }
  if (check_hash && sha256_file(full) != ref.sha256) {
    throw Error(what + ": sha256 of " + ref.path + " does not match the manifest (file changed)");
  }
}

void validate_segments(const Manifest& m) {
  if (m.segments.empty()) throw Error("manifest lists no segments");
  int expected_start = 0;
  std::vector<std::string> flavours0;
  for (const auto& [flavour, ref] : m.segments[0].graphs) flavours0.push_back(flavour);
  for (std::size_t i = 0; i < m.segments.size(); ++i) {
    const SegmentEntry& seg = m.segments[i];
    const std::string n = std::to_string(i);
    if (seg.index != static_cast<int>(i)) {
      throw Error("segment at position " + n + " has index " + std::to_string(seg.index) +
                  "; indices must run 0..K-1");
    }
    if (seg.step_begin != expected_start) {
      throw Error("segments are not contiguous: segment " + n + " starts at step " + std::to_string(seg.step_begin) +
                  ", expected " + std::to_string(expected_start));
    }
    if (seg.step_end <= seg.step_begin) {
      throw Error("segment " + n + " is empty or reversed: steps [" + std::to_string(seg.step_begin) + ", " +
                  std::to_string(seg.step_end) + ")");
    }
    if (static_cast<int>(seg.timesteps.size()) != seg.step_end - seg.step_begin) {
      throw Error("segment " + n + ": " + std::to_string(seg.timesteps.size()) + " timesteps for " +
                  std::to_string(seg.step_end - seg.step_begin) + " steps");
    }
    if (seg.graphs.empty()) throw Error("segment " + n + " has no graph file");
    std::vector<std::string> flavours;
    for (const auto& [flavour, ref] : seg.graphs) flavours.push_back(flavour);
    if (flavours != flavours0) {
      throw Error("segment " + n + " has flavours " + names_list(flavours) + ", segment 0 has " +
                  names_list(flavours0));
    }
    expected_start = seg.step_end;
  }
  if (m.sampler.num_inference_steps != expected_start) {
    throw Error("segments cover steps 0.." + std::to_string(expected_start) + " but the sampler runs " +
                std::to_string(m.sampler.num_inference_steps) + " steps");
  }
}

void validate_settings(const Manifest& m) {
  if (m.sampler.tile_size != m.tile_latent) {
    throw Error("sampler tile_size " + std::to_string(m.sampler.tile_size) + " differs from the exported tile " +
                std::to_string(m.tile_latent) + "; the graphs take exactly " + std::to_string(m.tile_latent) + "x" +
                std::to_string(m.tile_latent));
  }
  if (m.codec.kind != "pixel_unshuffle" && m.codec.kind != "vae") {
    throw Error("unknown codec kind '" + m.codec.kind + "'");
  }
}

std::vector<std::pair<int, int>> plan_segments(const std::string& path) {
  json plan;
  try {
    plan = json::parse(read_text(path));
    std::vector<std::pair<int, int>> out;
    for (const json& s : plan.at("segments")) {
      out.emplace_back(static_cast<int>(as_int(s.at(0), "segment start")), static_cast<int>(as_int(s.at(1), "end")));
    }
    return out;
  } catch (const json::exception& e) {
    throw Error("bit plan " + path + " is not a valid bit plan: " + e.what());
  } catch (const Malformed& e) {
    throw Error("bit plan " + path + " is not a valid bit plan: " + e.what());
  }
}

}  // namespace

std::string resolve(const std::string& folder, const FileRef& ref) {
  const fs::path rel(ref.path);
  bool escapes = rel.is_absolute() || rel.has_root_name();
  for (const auto& part : rel) escapes = escapes || part == "..";
  if (escapes || ref.path.empty()) throw Error("path '" + ref.path + "' in the manifest must stay inside the folder");
  return (fs::path(folder) / rel).string();
}

Manifest Manifest::parse(const std::string& text) {
  json raw;
  try {
    raw = json::parse(text);
  } catch (const json::parse_error& e) {
    throw Error(std::string(kManifestFile) + " is not valid JSON (truncated or corrupted?): " + e.what());
  }
  if (!raw.is_object()) throw Error(std::string(kManifestFile) + " must hold a JSON object");
  auto version = raw.find("version");
  if (version == raw.end() || !version->is_number_integer() || version->get<std::int64_t>() != kVersion) {
    throw Error("manifest version " + (version == raw.end() ? std::string("None") : version->dump()) +
                " is not supported (this runtime reads version " + std::to_string(kVersion) + ")");
  }
  std::vector<std::string> missing;
  for (const char* key : {"codec", "inputs", "model_hash", "outputs", "plan", "precision", "sampler", "segments",
                          "text_tokens", "tile_latent", "transformer"}) {
    if (!raw.contains(key)) missing.push_back(key);
  }
  if (!missing.empty()) throw Error("manifest lacks the fields " + names_list(missing));

  Manifest m;
  m.version = kVersion;
  try {
    m.model_hash = as_string(raw.at("model_hash"), "model_hash");
    m.precision = as_string(raw.at("precision"), "precision");
    m.plan = file_ref(raw.at("plan"), "plan");
    m.codec = codec_spec(raw.at("codec"));
    const json& tr = raw.at("transformer");
    std::vector<std::string> lack;
    for (const char* key : {"patch_size", "in_channels", "out_channels", "joint_attention_dim",
                            "pooled_projection_dim"}) {
      if (!tr.is_object() || !tr.contains(key)) lack.push_back(key);
    }
    if (!lack.empty()) throw Error("transformer settings lack " + names_list(lack));
    m.transformer.patch_size = static_cast<int>(as_int(tr.at("patch_size"), "patch_size"));
    m.transformer.in_channels = static_cast<int>(as_int(tr.at("in_channels"), "in_channels"));
    m.transformer.out_channels = static_cast<int>(as_int(tr.at("out_channels"), "out_channels"));
    m.transformer.joint_attention_dim = static_cast<int>(as_int(tr.at("joint_attention_dim"), "joint_attention_dim"));
    m.transformer.pooled_projection_dim =
        static_cast<int>(as_int(tr.at("pooled_projection_dim"), "pooled_projection_dim"));
    m.tile_latent = static_cast<int>(as_int(raw.at("tile_latent"), "tile_latent"));
    m.text_tokens = static_cast<int>(as_int(raw.at("text_tokens"), "text_tokens"));
    if (!raw.at("segments").is_array()) throw Malformed("segments must be a list");
    for (const json& s : raw.at("segments")) {
      SegmentEntry seg;
      seg.index = static_cast<int>(as_int(field(s, "index"), "segment index"));
      const json& steps = field(s, "steps");
      if (!steps.is_array()) throw Malformed("segment steps must be a list");
      if (steps.size() != 2) {
        throw Error("segment " + std::to_string(seg.index) + ": steps must be [start, end), got " + steps.dump());
      }
      seg.step_begin = static_cast<int>(as_int(steps.at(0), "steps"));
      seg.step_end = static_cast<int>(as_int(steps.at(1), "steps"));
      for (const json& t : field(s, "timesteps")) seg.timesteps.push_back(as_number(t, "timesteps"));
      const json& graphs = field(s, "graphs");
      if (!graphs.is_object()) throw Malformed("segment graphs must be an object");
      for (auto it = graphs.begin(); it != graphs.end(); ++it) {
        seg.graphs[it.key()] = file_ref(it.value(), "segment graph");
      }
      seg.engine = optional_ref(s, "engine", "segment engine");
      m.segments.push_back(std::move(seg));
    }
    for (const json& t : raw.at("inputs")) m.inputs.push_back(tensor_spec(t));
    for (const json& t : raw.at("outputs")) m.outputs.push_back(tensor_spec(t));
    m.shared_weights = optional_ref(raw, "shared_weights", "shared_weights");
    m.prompt_embeds = optional_ref(raw, "prompt_embeds", "prompt_embeds");
  } catch (const Malformed& e) {
    throw Error(std::string("manifest has malformed fields: ") + e.what());
  } catch (const json::exception& e) {
    throw Error(std::string("manifest has malformed fields: ") + e.what());
  }
  m.sampler = sampler_settings(raw.at("sampler"));
  return m;
}

Manifest Manifest::load(const std::string& folder, bool check_hashes) {
  const std::string path = (fs::path(folder) / kManifestFile).string();
  std::error_code ec;
  if (!fs::is_regular_file(path, ec)) throw Error(std::string("no ") + kManifestFile + " in " + folder);
  Manifest m = parse(read_text(path));
  validate_segments(m);
  validate_settings(m);
  verify(folder, m.plan, "bit plan", check_hashes);
  if (m.shared_weights) verify(folder, *m.shared_weights, "shared weights", check_hashes);
  if (m.prompt_embeds) verify(folder, *m.prompt_embeds, "prompt embeddings", check_hashes);
  for (const SegmentEntry& seg : m.segments) {
    for (const auto& [flavour, ref] : seg.graphs) {
      verify(folder, ref, "segment " + std::to_string(seg.index) + " " + flavour + " graph", check_hashes);
    }
    if (seg.engine) verify(folder, *seg.engine, "segment " + std::to_string(seg.index) + " engine", check_hashes);
  }
  if (m.codec.vae_encoder) verify(folder, *m.codec.vae_encoder, "VAE encoder graph", check_hashes);
  if (m.codec.vae_decoder) verify(folder, *m.codec.vae_decoder, "VAE decoder graph", check_hashes);
  if (check_hashes) {
    std::vector<std::pair<int, int>> ours;
    for (const SegmentEntry& seg : m.segments) ours.emplace_back(seg.step_begin, seg.step_end);
    const auto theirs = plan_segments(resolve(folder, m.plan));
    if (theirs != ours) {
      throw Error("segments " + steps_list(ours) + " differ from the bit plan's " + steps_list(theirs));
    }
  }
  return m;
}

int Manifest::segment_of_step(int step) const {
  for (const SegmentEntry& seg : segments) {
    if (seg.step_begin <= step && step < seg.step_end) return seg.index;
  }
  throw Error("sampler step " + std::to_string(step) + " is outside the " + std::to_string(num_steps()) +
              " exported steps");
}

std::vector<std::string> Manifest::flavours() const {
  std::vector<std::string> out;
  if (!segments.empty()) {
    for (const auto& [flavour, ref] : segments[0].graphs) out.push_back(flavour);
  }
  return out;
}

}  // namespace qdit4sr
