#include "resize.hpp"

#include <algorithm>
#include <cmath>
#include <cstdint>

namespace qdit4sr {
namespace {

double cubic1(double x, double a) { return ((a + 2) * x - (a + 3)) * x * x + 1; }
double cubic2(double x, double a) { return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a; }

// Per output index: `count` input indices and weights (torch's index/weight tables for one axis).
struct Taps {
  std::vector<std::int64_t> start;   // offset of the output index's taps in idx/w
  std::vector<int> count;
  std::vector<std::int64_t> idx;
  std::vector<double> w;
};

// upsample_bicubic2d (HelperInterpCubic::compute_indices_weights with opmath double).
Taps cubic_taps(std::int64_t in, std::int64_t out) {
  Taps t;
  const double scale = static_cast<double>(in) / out;
  const double a = -0.75;
  for (std::int64_t i = 0; i < out; ++i) {
    const double real = scale * (i + 0.5) - 0.5;
    // torch's guard_index_and_lambda floors through floorf, i.e. after a float conversion.
    const std::int64_t index = std::min(static_cast<std::int64_t>(std::floor(static_cast<float>(real))), in - 1);
    const double lambda = std::min(std::max(real - index, 0.0), 1.0);
    const double x1 = lambda, x2 = 1.0 - lambda;
    const double c[4] = {cubic2(x1 + 1.0, a), cubic1(x1, a), cubic1(x2, a), cubic2(x2 + 1.0, a)};
    t.start.push_back(static_cast<std::int64_t>(t.idx.size()));
    t.count.push_back(4);
    for (int j = 0; j < 4; ++j) {
      t.idx.push_back(std::clamp<std::int64_t>(index + j - 1, 0, in - 1));
      t.w.push_back(c[j]);
    }
  }
  return t;
}

double keys_filter(double x) {  // HelperInterpCubic::aa_filter, a = -0.5
  const double a = -0.5;
  x = std::abs(x);
  if (x < 1.0) return cubic1(x, a);
  if (x < 2.0) return cubic2(x, a);
  return 0.0;
}

// _compute_indices_min_size_weights_aa (scalar_t double, interp_size 4).
Taps antialias_taps(std::int64_t in, std::int64_t out) {
  Taps t;
  const double scale = static_cast<double>(in) / out;
  const double support = (scale >= 1.0) ? (4 * 0.5) * scale : 4 * 0.5;
  const std::int64_t max_size = static_cast<std::int64_t>(std::ceil(support)) * 2 + 1;
  for (std::int64_t i = 0; i < out; ++i) {
    const double center = scale * (i + 0.5);
    const double invscale = (scale >= 1.0) ? 1.0 / scale : 1.0;
    const std::int64_t xmin = std::max(static_cast<std::int64_t>(center - support + 0.5), std::int64_t(0));
    std::int64_t xsize = std::min(static_cast<std::int64_t>(center + support + 0.5), in) - xmin;
    xsize = std::clamp(xsize, std::int64_t(0), max_size);
    std::vector<double> w(static_cast<std::size_t>(xsize));
    double total = 0.0;
    for (std::int64_t j = 0; j < xsize; ++j) {
      w[j] = keys_filter((j + xmin - center + 0.5) * invscale);
      total += w[j];
    }
    if (total != 0.0) {
      for (double& v : w) v /= total;
    }
    t.start.push_back(static_cast<std::int64_t>(t.idx.size()));
    t.count.push_back(static_cast<int>(xsize));
    for (std::int64_t j = 0; j < xsize; ++j) {
      t.idx.push_back(xmin + j);
      t.w.push_back(w[j]);
    }
  }
  return t;
}

// One separable pass along an axis of [outer, length, inner] data.
std::vector<double> pass(const std::vector<double>& src, std::int64_t outer, std::int64_t length,
                         std::int64_t inner, const Taps& taps, std::int64_t out_length) {
  std::vector<double> dst(static_cast<std::size_t>(outer * out_length * inner));
  for (std::int64_t o = 0; o < outer; ++o) {
    const double* s = src.data() + o * length * inner;
    double* d = dst.data() + o * out_length * inner;
    for (std::int64_t i = 0; i < out_length; ++i) {
      const std::int64_t* idx = taps.idx.data() + taps.start[i];
      const double* w = taps.w.data() + taps.start[i];
      const int n = taps.count[i];
      for (std::int64_t k = 0; k < inner; ++k) {
        double acc = n > 0 ? s[idx[0] * inner + k] * w[0] : 0.0;
        for (int j = 1; j < n; ++j) acc += s[idx[j] * inner + k] * w[j];
        d[i * inner + k] = acc;
      }
    }
  }
  return dst;
}

}  // namespace

std::vector<float> resize_bicubic(const std::vector<float>& src, int channels, int height, int width,
                                  int out_height, int out_width) {
  const std::int64_t c = channels, h = height, w = width, oh = out_height, ow = out_width;
  std::vector<double> out;
  if (oh < h || ow < w) {
    // Antialiased and separable: width first, then height; an unchanged side is not resampled.
    std::vector<double> cur(src.begin(), src.end());
    if (ow != w) cur = pass(cur, c * h, w, 1, antialias_taps(w, ow), ow);
    if (oh != h) cur = pass(cur, c, h, ow, antialias_taps(h, oh), oh);
    out = std::move(cur);
  } else {
    // Non-separable: out = sum_i wy_i * (sum_j wx_j * src[y_i, x_j]), in that order.
    const Taps ty = cubic_taps(h, oh), tx = cubic_taps(w, ow);
    out.resize(static_cast<std::size_t>(c * oh * ow));
    for (std::int64_t ch = 0; ch < c; ++ch) {
      const float* plane = src.data() + ch * h * w;
      for (std::int64_t y = 0; y < oh; ++y) {
        for (std::int64_t x = 0; x < ow; ++x) {
          double acc = 0.0;
          for (int i = 0; i < 4; ++i) {
            const float* row = plane + ty.idx[ty.start[y] + i] * w;
            const std::int64_t* xi = tx.idx.data() + tx.start[x];
            const double* xw = tx.w.data() + tx.start[x];
            double t = static_cast<double>(row[xi[0]]) * xw[0];
            for (int j = 1; j < 4; ++j) t += static_cast<double>(row[xi[j]]) * xw[j];
            const double wy = ty.w[ty.start[y] + i];
            acc = (i == 0) ? t * wy : acc + t * wy;
          }
          out[(ch * oh + y) * ow + x] = acc;
        }
      }
    }
  }
  std::vector<float> result(out.size());
  for (std::size_t i = 0; i < out.size(); ++i) result[i] = static_cast<float>(std::clamp(out[i], 0.0, 1.0));
  return result;
}

}  // namespace qdit4sr
