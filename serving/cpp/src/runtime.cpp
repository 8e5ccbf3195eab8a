// The sampler of qdit4sr/models/pipeline.py (DiT4SRPipeline.upscale) around a SegmentBackend.
//
// Every floating-point operation below is the one the Python pipeline performs, in the same order and
// precision (float32 elementwise ops, float64 resizes and colour statistics), and the library is built
// with -ffp-contract=off so that no multiply-add is fused: the result is the Python runtime's image.
#include "qdit4sr/runtime.hpp"

#include <algorithm>
#include <cmath>

#include "backends.hpp"
#include "codec.hpp"
#include "noise.hpp"
#include "resize.hpp"
#include "safetensors.hpp"
#include "sampler.hpp"

namespace qdit4sr {
namespace {

struct Prompt {
  std::vector<float> embeds, pooled;                    // [S, D], [P]
  std::vector<float> negative_embeds, negative_pooled;  // empty without negative embeddings
};

std::string shape_string(const std::vector<std::int64_t>& shape) {
  std::string s = "[";
  for (std::size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + (shape[i] < 0 ? "batch" : std::to_string(shape[i]));
  return s + "]";
}

void check_io(const Manifest& m) {
  const std::int64_t t = m.tile_latent;
  const auto& tr = m.transformer;
  const std::vector<std::vector<std::int64_t>> want_in = {
      {-1, tr.in_channels, t, t}, {-1, tr.in_channels, t, t}, {-1, m.text_tokens, tr.joint_attention_dim},
      {-1, tr.pooled_projection_dim}, {-1}};
  if (m.inputs.size() != want_in.size()) {
    throw Error("the manifest lists " + std::to_string(m.inputs.size()) +
                " graph inputs; the runtime feeds 5 (hidden_states, controlnet_image, encoder_hidden_states, "
                "pooled_projections, timestep)");
  }
  for (std::size_t i = 0; i < want_in.size(); ++i) {
    if (m.inputs[i].shape != want_in[i] || m.inputs[i].dtype != "float32") {
      throw Error("graph input " + m.inputs[i].name + " is " + shape_string(m.inputs[i].shape) + " " +
                  m.inputs[i].dtype + ", the sampler feeds " + shape_string(want_in[i]) + " float32");
    }
  }
  const std::vector<std::int64_t> want_out = {-1, tr.out_channels, t, t};
  if (m.outputs.size() != 1 || m.outputs[0].shape != want_out || tr.out_channels != tr.in_channels) {
    throw Error("the graphs must return one velocity " + shape_string(want_out) + " with as many channels as the latent");
  }
}

Prompt load_prompt(const Manifest& m, const std::string& folder) {
  const std::size_t s = m.text_tokens, d = m.transformer.joint_attention_dim, p = m.transformer.pooled_projection_dim;
  Prompt prompt;
  if (!m.prompt_embeds) {  // PromptEmbeddings.null: zeros
    prompt.embeds.assign(s * d, 0.0f);
    prompt.pooled.assign(p, 0.0f);
    return prompt;
  }
  const std::string path = resolve(folder, *m.prompt_embeds);
  auto tensors = read_safetensors(path);
  auto take = [&](const char* name, std::size_t count, std::vector<float>& out, bool required) {
    auto it = tensors.find(name);
    if (it == tensors.end()) {
      if (required) throw Error("prompt embeddings " + m.prompt_embeds->path + " lack " + name);
      return;
    }
    if (it->second.data.size() != count || it->second.shape.empty() || it->second.shape[0] != 1) {
      throw Error("prompt embeddings: " + std::string(name) + " has shape " + shape_string(it->second.shape) +
                  ", the graphs take " + std::to_string(count) + " values for one prompt");
    }
    out = std::move(it->second.data);
  };
  take("prompt_embeds", s * d, prompt.embeds, true);
  take("pooled_prompt_embeds", p, prompt.pooled, true);
  take("negative_prompt_embeds", s * d, prompt.negative_embeds, false);
  take("negative_pooled_prompt_embeds", p, prompt.negative_pooled, false);
  if (prompt.negative_embeds.empty() != prompt.negative_pooled.empty()) {
    throw Error("prompt embeddings hold only one of negative_prompt_embeds / negative_pooled_prompt_embeds");
  }
  return prompt;
}

void check_timesteps(const Manifest& m, const EulerSchedule& schedule) {
  for (const SegmentEntry& seg : m.segments) {
    for (int step = seg.step_begin; step < seg.step_end; ++step) {
      const float listed = static_cast<float>(seg.timesteps[step - seg.step_begin]);
      if (listed != schedule.timesteps[step]) {
        throw Error("segment " + std::to_string(seg.index) + " lists timestep " + std::to_string(listed) +
                    " for step " + std::to_string(step) + ", the sampler settings (shift " +
                    std::to_string(m.sampler.shift) + ") give " + std::to_string(schedule.timesteps[step]));
      }
    }
  }
}

// AdaIN statistics in float64, rounded to float32 (adain_color_fix): mean and unbiased std of a plane.
void plane_stats(const float* v, std::size_t n, float& mean, float& stddev) {
  double sum = 0.0;
  for (std::size_t i = 0; i < n; ++i) sum += v[i];
  const double mu = sum / static_cast<double>(n);
  double sq = 0.0;
  for (std::size_t i = 0; i < n; ++i) sq += (v[i] - mu) * (v[i] - mu);
  mean = static_cast<float>(mu);
  stddev = static_cast<float>(std::sqrt(sq / static_cast<double>(n - 1)));
}

}  // namespace

struct Runtime::Impl {
  std::string folder;
  Manifest manifest;
  std::unique_ptr<LatentCodec> codec;
  Prompt prompt;
  EulerSchedule schedule;
  std::vector<int> step_segment;
  std::unique_ptr<SegmentBackend> backend;

  bool use_cfg() const { return manifest.sampler.guidance_scale > 1.0 && !prompt.negative_embeds.empty(); }

  // _velocity: one backend call on b tiles [b, C, t, t] (x and lr), with CFG when configured.
  std::vector<float> velocity(int segment, int b, const std::vector<float>& x, const std::vector<float>& lr,
                              float timestep) const {
    const bool cfg = use_cfg();
    const int batch = cfg ? 2 * b : b;
    const std::size_t tile = x.size() / b;
    std::vector<float> hidden, control, text, pooled, times(batch, timestep);
    auto repeat = [](std::vector<float>& out, const std::vector<float>& v, int times_) {
      for (int i = 0; i < times_; ++i) out.insert(out.end(), v.begin(), v.end());
    };
    if (cfg) {
      hidden.reserve(2 * x.size());
      repeat(hidden, x, 2);
      repeat(control, lr, 2);
      repeat(text, prompt.negative_embeds, b);
      repeat(text, prompt.embeds, b);
      repeat(pooled, prompt.negative_pooled, b);
      repeat(pooled, prompt.pooled, b);
    } else {
      repeat(text, prompt.embeds, b);
      repeat(pooled, prompt.pooled, b);
    }
    const std::vector<const float*> inputs = {cfg ? hidden.data() : x.data(), cfg ? control.data() : lr.data(),
                                              text.data(), pooled.data(), times.data()};
    std::vector<float> v = backend->run(segment, batch, inputs);
    if (!cfg) return v;
    const float g = static_cast<float>(manifest.sampler.guidance_scale);
    std::vector<float> out(tile * b);
    for (std::size_t i = 0; i < out.size(); ++i) {
      const float uncond = v[i], cond = v[i + out.size()];
      out[i] = uncond + g * (cond - uncond);
    }
    return out;
  }

  // predict_velocity: the whole latent [C, h, w], blended over overlapping tiles when larger than one.
  std::vector<float> predict_velocity(int segment, const std::vector<float>& x, const std::vector<float>& lr,
                                      int channels, int h, int w, float timestep) const {
    const SamplerSettings& cfg = manifest.sampler;
    if (h <= cfg.tile_size && w <= cfg.tile_size) return velocity(segment, 1, x, lr, timestep);
    const std::vector<Window> windows = tile_windows(h, w, cfg.tile_size, cfg.tile_overlap);
    const int th = windows[0].height, tw = windows[0].width;
    const std::vector<float> weight = gaussian_weights(th, tw);
    std::vector<float> out(x.size(), 0.0f), norm(static_cast<std::size_t>(h) * w, 0.0f);
    const std::size_t tile_size = static_cast<std::size_t>(channels) * th * tw;
    for (std::size_t start = 0; start < windows.size(); start += cfg.tile_batch) {
      const std::size_t n = std::min(windows.size() - start, static_cast<std::size_t>(cfg.tile_batch));
      std::vector<float> xs(n * tile_size), ls(n * tile_size);
      for (std::size_t k = 0; k < n; ++k) {
        const Window& win = windows[start + k];
        for (int c = 0; c < channels; ++c) {
          for (int y = 0; y < th; ++y) {
            const std::size_t src = (static_cast<std::size_t>(c) * h + win.top + y) * w + win.left;
            const std::size_t dst = k * tile_size + (static_cast<std::size_t>(c) * th + y) * tw;
            std::copy_n(x.data() + src, tw, xs.data() + dst);
            std::copy_n(lr.data() + src, tw, ls.data() + dst);
          }
        }
      }
      const std::vector<float> vs = velocity(segment, static_cast<int>(n), xs, ls, timestep);
      for (std::size_t k = 0; k < n; ++k) {
        const Window& win = windows[start + k];
        for (int c = 0; c < channels; ++c) {
          for (int y = 0; y < th; ++y) {
            for (int xx = 0; xx < tw; ++xx) {
              const float wgt = weight[static_cast<std::size_t>(y) * tw + xx];
              out[(static_cast<std::size_t>(c) * h + win.top + y) * w + win.left + xx] +=
                  vs[k * tile_size + (static_cast<std::size_t>(c) * th + y) * tw + xx] * wgt;
            }
          }
        }
        for (int y = 0; y < th; ++y) {
          for (int xx = 0; xx < tw; ++xx) {
            norm[static_cast<std::size_t>(win.top + y) * w + win.left + xx] += weight[static_cast<std::size_t>(y) * tw + xx];
          }
        }
      }
    }
    const std::size_t plane = static_cast<std::size_t>(h) * w;
    for (std::size_t i = 0; i < out.size(); ++i) out[i] = out[i] / norm[i % plane];
    return out;
  }
};

std::vector<std::string> available_backends() {
#ifdef QDIT4SR_WITH_TENSORRT
  return {"onnxruntime", "tensorrt"};
#else
  return {"onnxruntime"};
#endif
}

std::unique_ptr<SegmentBackend> make_backend(const Manifest& manifest, const std::string& folder,
                                             const RuntimeOptions& options) {
  if (options.backend == "onnxruntime") return make_ort_backend(manifest, folder, options);
#ifdef QDIT4SR_WITH_TENSORRT
  if (options.backend == "tensorrt") return make_trt_backend(manifest, folder, options);
#else
  if (options.backend == "tensorrt") {
    throw Error("this build has no TensorRT backend; configure with -DTensorRT_INCLUDE_DIR=... -DTensorRT_LIBRARY=...");
  }
#endif
  throw Error("unknown runtime backend '" + options.backend + "'");
}

Runtime::Runtime(const std::string& folder, const RuntimeOptions& options) : impl_(std::make_unique<Impl>()) {
  Impl& m = *impl_;
  m.folder = folder;
  m.manifest = Manifest::load(folder, options.check_hashes);
  m.codec = make_codec(m.manifest);
  check_io(m.manifest);
  m.prompt = load_prompt(m.manifest, folder);
  m.schedule = flow_match_euler(m.manifest.sampler.num_inference_steps, m.manifest.sampler.shift);
  check_timesteps(m.manifest, m.schedule);
  for (const SegmentEntry& seg : m.manifest.segments) {
    for (int step = seg.step_begin; step < seg.step_end; ++step) m.step_segment.push_back(seg.index);
  }
  m.backend = make_backend(m.manifest, folder, options);
}

Runtime::~Runtime() = default;

const Manifest& Runtime::manifest() const { return impl_->manifest; }

Image Runtime::upscale(const Image& lr, std::uint64_t seed, int scale) const {
  const Impl& m = *impl_;
  const SamplerSettings& cfg = m.manifest.sampler;
  const int h = lr.height, w = lr.width;
  if (std::min(h, w) < 8) {
    throw Error("image " + std::to_string(w) + "x" + std::to_string(h) +
                " is too small; both sides must be at least 8 pixels");
  }
  if (lr.rgb.size() != static_cast<std::size_t>(h) * w * 3) throw Error("image buffer does not hold width*height*3 bytes");
  if (scale < 1) throw Error("scale must be >= 1");

  // to_tensor: uint8 HWC -> float32 CHW in [0, 1].
  std::vector<float> image(static_cast<std::size_t>(3) * h * w);
  for (int c = 0; c < 3; ++c) {
    for (std::size_t i = 0; i < static_cast<std::size_t>(h) * w; ++i) {
      image[c * static_cast<std::size_t>(h) * w + i] = static_cast<float>(lr.rgb[i * 3 + c]) / 255.0f;
    }
  }
  // Small inputs are enlarged first so the model sees at least its working resolution.
  const double enlarge = std::max(1.0, static_cast<double>(cfg.min_lr_side) / std::min(h, w));
  const int out_h = static_cast<int>(std::nearbyint(h * enlarge)) * scale;
  const int out_w = static_cast<int>(std::nearbyint(w * enlarge)) * scale;
  const std::vector<float> cond = resize_bicubic(image, 3, h, w, out_h, out_w);

  // Replicate-pad right and bottom to a multiple of codec downsample x patch size, then encode.
  const int align = m.codec->downsample() * m.manifest.transformer.patch_size;
  const int ph = out_h + (align - out_h % align) % align, pw = out_w + (align - out_w % align) % align;
  std::vector<float> padded(static_cast<std::size_t>(3) * ph * pw);
  for (int c = 0; c < 3; ++c) {
    for (int y = 0; y < ph; ++y) {
      const float* row = cond.data() + (static_cast<std::size_t>(c) * out_h + std::min(y, out_h - 1)) * out_w;
      float* dst = padded.data() + (static_cast<std::size_t>(c) * ph + y) * pw;
      for (int x = 0; x < pw; ++x) dst[x] = row[std::min(x, out_w - 1)];
    }
  }
  const int f = m.codec->downsample(), lh = ph / f, lw = pw / f, channels = m.codec->latent_channels();
  if (lh < cfg.tile_size || lw < cfg.tile_size) {
    throw Error("image " + std::to_string(w) + "x" + std::to_string(h) + " gives a " + std::to_string(lw) + "x" +
                std::to_string(lh) + " latent, smaller than the exported " + std::to_string(cfg.tile_size) + "x" +
                std::to_string(cfg.tile_size) + " tile");
  }
  const std::vector<float> lr_latent = m.codec->encode(padded, ph, pw);

  // Flow-matching Euler from the portable noise; each step on the segment that owns it.
  std::vector<float> x = gaussian_noise(lr_latent.size(), seed);
  for (int step = 0; step < cfg.num_inference_steps; ++step) {
    const std::vector<float> v = m.predict_velocity(m.step_segment[step], x, lr_latent, channels, lh, lw,
                                                    m.schedule.timesteps[step]);
    const float dt = m.schedule.sigmas[step + 1] - m.schedule.sigmas[step];
    for (std::size_t i = 0; i < x.size(); ++i) x[i] = x[i] + dt * v[i];
  }

  // Decode, crop the padding, colour-fix against the bicubic condition, shrink back if enlarged.
  const std::vector<float> decoded = m.codec->decode(x, lh, lw);
  std::vector<float> sr(static_cast<std::size_t>(3) * out_h * out_w);
  for (int c = 0; c < 3; ++c) {
    for (int y = 0; y < out_h; ++y) {
      std::copy_n(decoded.data() + (static_cast<std::size_t>(c) * ph + y) * pw, out_w,
                  sr.data() + (static_cast<std::size_t>(c) * out_h + y) * out_w);
    }
  }
  if (cfg.color_fix == "adain") {
    const std::size_t plane = static_cast<std::size_t>(out_h) * out_w;
    const float eps = 1e-5f;
    for (int c = 0; c < 3; ++c) {
      float mu_i, sd_i, mu_r, sd_r;
      plane_stats(sr.data() + c * plane, plane, mu_i, sd_i);
      plane_stats(cond.data() + c * plane, plane, mu_r, sd_r);
      const float denom = sd_i + eps;
      for (std::size_t i = c * plane; i < (c + 1) * plane; ++i) {
        sr[i] = std::clamp((sr[i] - mu_i) / denom * sd_r + mu_r, 0.0f, 1.0f);
      }
    }
  }
  int final_h = out_h, final_w = out_w;
  if (enlarge > 1.0) {
    final_h = h * scale;
    final_w = w * scale;
    sr = resize_bicubic(sr, 3, out_h, out_w, final_h, final_w);
  }
  // to_uint8: clamp, x255, round half to even.
  Image out;
  out.width = final_w;
  out.height = final_h;
  out.rgb.resize(static_cast<std::size_t>(final_h) * final_w * 3);
  const std::size_t plane = static_cast<std::size_t>(final_h) * final_w;
  for (int c = 0; c < 3; ++c) {
    for (std::size_t i = 0; i < plane; ++i) {
      const float v = std::clamp(sr[c * plane + i], 0.0f, 1.0f) * 255.0f;
      out.rgb[i * 3 + c] = static_cast<std::uint8_t>(std::nearbyint(v));
    }
  }
  return out;
}

}  // namespace qdit4sr
