// Latent codecs named by the manifest: the tiny default's pixel-unshuffle (exact, no weights).
// A "vae" codec (exported VAE encoder/decoder graphs, run by the Python runtime) is refused with a clear error.
#pragma once

#include <memory>
#include <vector>

#include "qdit4sr/manifest.hpp"

namespace qdit4sr {

class LatentCodec {
 public:
  virtual ~LatentCodec() = default;
  virtual int downsample() const = 0;
  virtual int latent_channels() const = 0;
  // image [3, h, w] in [0, 1] -> latent [latent_channels, h / downsample, w / downsample]
  virtual std::vector<float> encode(const std::vector<float>& image, int height, int width) const = 0;
  // latent [latent_channels, h, w] -> image [3, h * downsample, w * downsample] in [0, 1]
  virtual std::vector<float> decode(const std::vector<float>& latent, int height, int width) const = 0;
};

// latent = scaling * pixel_unshuffle(2x - 1), decode = clamp((pixel_shuffle(latent / scaling) + 1) / 2, 0, 1).
class PixelUnshuffleCodec : public LatentCodec {
 public:
  PixelUnshuffleCodec(int factor, double scaling);
  int downsample() const override { return factor_; }
  int latent_channels() const override { return 3 * factor_ * factor_; }
  std::vector<float> encode(const std::vector<float>& image, int height, int width) const override;
  std::vector<float> decode(const std::vector<float>& latent, int height, int width) const override;

 private:
  int factor_;
  float scaling_;
};

// The codec of `manifest`; throws Error for a codec this runtime cannot run.
std::unique_ptr<LatentCodec> make_codec(const Manifest& manifest);

}  // namespace qdit4sr
