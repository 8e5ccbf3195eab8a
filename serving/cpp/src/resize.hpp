// Bicubic resize as qdit4sr.models.images.resize_bicubic computes it: torch's upsample_bicubic2d
// (A = -0.75, align_corners=False) when no side shrinks, its antialiased variant (Keys A = -0.5, support
// scaled by the shrink factor, horizontal pass first) when one does; in float64, clamped to [0, 1] and
// rounded to float32 once at the end, so the result does not depend on FMA or summation details.
#pragma once

#include <vector>

namespace qdit4sr {

// src: float32 planes [channels, height, width]; returns [channels, out_height, out_width].
std::vector<float> resize_bicubic(const std::vector<float>& src, int channels, int height, int width,
                                  int out_height, int out_width);

}  // namespace qdit4sr
