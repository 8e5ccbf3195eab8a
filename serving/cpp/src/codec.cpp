#include "codec.hpp"

#include <algorithm>
#include <string>

namespace qdit4sr {

PixelUnshuffleCodec::PixelUnshuffleCodec(int factor, double scaling)
    : factor_(factor), scaling_(static_cast<float>(scaling)) {
  if (factor < 1) throw Error("pixel_unshuffle codec: factor must be >= 1, got " + std::to_string(factor));
  if (!(scaling > 0.0)) throw Error("pixel_unshuffle codec: scaling must be > 0, got " + std::to_string(scaling));
}

std::vector<float> PixelUnshuffleCodec::encode(const std::vector<float>& image, int height, int width) const {
  const int f = factor_, h = height / f, w = width / f;
  std::vector<float> out(static_cast<std::size_t>(3) * f * f * h * w);
  for (int c = 0; c < 3; ++c) {
    for (int i = 0; i < f; ++i) {
      for (int j = 0; j < f; ++j) {
        float* dst = out.data() + static_cast<std::size_t>((c * f + i) * f + j) * h * w;
        for (int y = 0; y < h; ++y) {
          const float* row = image.data() + (static_cast<std::size_t>(c) * height + y * f + i) * width;
          for (int x = 0; x < w; ++x) dst[y * w + x] = (row[x * f + j] * 2.0f - 1.0f) * scaling_;
        }
      }
    }
  }
  return out;
}

std::vector<float> PixelUnshuffleCodec::decode(const std::vector<float>& latent, int height, int width) const {
  const int f = factor_, oh = height * f, ow = width * f;
  std::vector<float> out(static_cast<std::size_t>(3) * oh * ow);
  for (int c = 0; c < 3; ++c) {
    for (int i = 0; i < f; ++i) {
      for (int j = 0; j < f; ++j) {
        const float* src = latent.data() + static_cast<std::size_t>((c * f + i) * f + j) * height * width;
        for (int y = 0; y < height; ++y) {
          float* row = out.data() + (static_cast<std::size_t>(c) * oh + y * f + i) * ow;
          for (int x = 0; x < width; ++x) {
            const float v = (src[y * width + x] / scaling_ + 1.0f) / 2.0f;
            row[x * f + j] = std::clamp(v, 0.0f, 1.0f);
          }
        }
      }
    }
  }
  return out;
}

std::unique_ptr<LatentCodec> make_codec(const Manifest& manifest) {
  const CodecSpec& spec = manifest.codec;
  if (spec.kind == "pixel_unshuffle") {
    auto codec = std::make_unique<PixelUnshuffleCodec>(spec.factor, spec.scaling);
    if (codec->latent_channels() != manifest.transformer.in_channels) {
      throw Error("pixel_unshuffle codec with factor " + std::to_string(spec.factor) + " gives " +
                  std::to_string(codec->latent_channels()) + " latent channels, the transformer takes " +
                  std::to_string(manifest.transformer.in_channels));
    }
    return codec;
  }
  if (spec.kind == "vae") {
    throw Error("unsupported codec 'vae': the C++ runtime runs only the pixel_unshuffle codec, not the exported VAE "
                "graphs (codec.encoder / codec.decoder); serve this folder from Python (qdit4sr-upscale or the "
                "Triton repository)");
  }
  throw Error("unknown codec kind '" + spec.kind + "'");
}

}  // namespace qdit4sr
