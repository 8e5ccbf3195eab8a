// PNG in and out through libpng's low-level API (the transforms say exactly what happens to each
// colour type). libpng reports errors by longjmp, so every function that calls it keeps only plain C
// objects alive across the setjmp and turns the message into a qdit4sr::Error afterwards.
#include <png.h>

#include <cerrno>
#include <csetjmp>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <string>
#include <unistd.h>

#include "qdit4sr/runtime.hpp"

namespace qdit4sr {
namespace {

struct PngErrors {
  char message[256] = {0};
};

void on_error(png_structp png, png_const_charp message) {
  auto* errors = static_cast<PngErrors*>(png_get_error_ptr(png));
  std::snprintf(errors->message, sizeof(errors->message), "%s", message);
  png_longjmp(png, 1);
}

void on_warning(png_structp, png_const_charp) {}

// Reads the header and sets the transforms to 8-bit RGB (alpha stripped, not composited). false on error.
bool read_header(png_structp png, png_infop info, FILE* file, png_uint_32* width, png_uint_32* height) {
  if (setjmp(png_jmpbuf(png))) return false;
  png_init_io(png, file);
  png_read_info(png, info);
  const int color = png_get_color_type(png, info);
  const int depth = png_get_bit_depth(png, info);
  if (color == PNG_COLOR_TYPE_PALETTE) png_set_palette_to_rgb(png);
  if (color == PNG_COLOR_TYPE_GRAY && depth < 8) png_set_expand_gray_1_2_4_to_8(png);
  if (depth == 16) png_set_strip_16(png);
  if (color == PNG_COLOR_TYPE_GRAY || color == PNG_COLOR_TYPE_GRAY_ALPHA) png_set_gray_to_rgb(png);
  png_set_strip_alpha(png);  // also drops a tRNS chunk: transparency is ignored, as convert("RGB") does
  png_set_interlace_handling(png);
  png_read_update_info(png, info);
  *width = png_get_image_width(png, info);
  *height = png_get_image_height(png, info);
  return png_get_channels(png, info) == 3 && png_get_bit_depth(png, info) == 8;
}

bool read_rows(png_structp png, png_bytepp rows) {
  if (setjmp(png_jmpbuf(png))) return false;
  png_read_image(png, rows);
  png_read_end(png, nullptr);
  return true;
}

bool write_rows(png_structp png, png_infop info, FILE* file, png_uint_32 width, png_uint_32 height, png_bytepp rows) {
  if (setjmp(png_jmpbuf(png))) return false;
  png_init_io(png, file);
  png_set_IHDR(png, info, width, height, 8, PNG_COLOR_TYPE_RGB, PNG_INTERLACE_NONE, PNG_COMPRESSION_TYPE_DEFAULT,
               PNG_FILTER_TYPE_DEFAULT);
  png_write_info(png, info);
  png_write_image(png, rows);
  png_write_end(png, nullptr);
  return true;
}

}  // namespace

Image read_png(const std::string& path) {
  FILE* file = std::fopen(path.c_str(), "rb");
  if (!file) throw Error("cannot open image " + path + ": " + std::strerror(errno));
  unsigned char signature[8] = {0};
  const bool is_png = std::fread(signature, 1, 8, file) == 8 && png_sig_cmp(signature, 0, 8) == 0;
  if (!is_png) {
    std::fclose(file);
    throw Error(path + " is not a PNG file");
  }
  PngErrors errors;
  png_structp png = png_create_read_struct(PNG_LIBPNG_VER_STRING, &errors, on_error, on_warning);
  png_infop info = png ? png_create_info_struct(png) : nullptr;
  if (!info) {
    png_destroy_read_struct(&png, nullptr, nullptr);
    std::fclose(file);
    throw Error("libpng could not allocate a reader");
  }
  png_set_sig_bytes(png, 8);
  png_uint_32 width = 0, height = 0;
  Image image;
  bool ok = read_header(png, info, file, &width, &height);
  if (ok) {
    image.width = static_cast<int>(width);
    image.height = static_cast<int>(height);
    image.rgb.resize(static_cast<std::size_t>(width) * height * 3);
    std::vector<png_bytep> rows(height);
    for (png_uint_32 y = 0; y < height; ++y) rows[y] = image.rgb.data() + static_cast<std::size_t>(y) * width * 3;
    ok = read_rows(png, rows.data());
  }
  png_destroy_read_struct(&png, &info, nullptr);
  std::fclose(file);
  if (!ok) throw Error(path + " is not a readable PNG (" + (errors.message[0] ? errors.message : "unsupported layout") + ")");
  return image;
}

void write_png(const std::string& path, const Image& image) {
  if (image.width <= 0 || image.height <= 0 ||
      image.rgb.size() != static_cast<std::size_t>(image.width) * image.height * 3) {
    throw Error("cannot write " + path + ": the image buffer does not hold width*height*3 bytes");
  }
  // A temporary file beside the target, renamed over it once complete: readers never see half a PNG.
  const std::filesystem::path target(path);
  const std::filesystem::path dir = target.has_parent_path() ? target.parent_path() : std::filesystem::path(".");
  std::string temp = (dir / ("." + target.filename().string() + ".XXXXXX")).string();
  const int fd = mkstemp(temp.data());
  if (fd < 0) throw Error("cannot create a temporary file beside " + path + ": " + std::strerror(errno));
  FILE* file = fdopen(fd, "wb");
  if (!file) {
    close(fd);
    std::remove(temp.c_str());
    throw Error("cannot write " + temp);
  }
  PngErrors errors;
  png_structp png = png_create_write_struct(PNG_LIBPNG_VER_STRING, &errors, on_error, on_warning);
  png_infop info = png ? png_create_info_struct(png) : nullptr;
  bool ok = info != nullptr;
  if (ok) {
    std::vector<png_bytep> rows(image.height);
    for (int y = 0; y < image.height; ++y) {
      rows[y] = const_cast<png_bytep>(image.rgb.data() + static_cast<std::size_t>(y) * image.width * 3);
    }
    ok = write_rows(png, info, file, image.width, image.height, rows.data());
  }
  png_destroy_write_struct(&png, &info);
  ok = (std::fflush(file) == 0) && (fsync(fileno(file)) == 0) && ok;
  ok = (std::fclose(file) == 0) && ok;
  if (ok) {
    std::error_code ec;
    std::filesystem::permissions(temp, std::filesystem::perms(0644), ec);  // mkstemp makes it 0600
    if (std::rename(temp.c_str(), path.c_str()) != 0) {
      const std::string why = std::strerror(errno);
      std::remove(temp.c_str());
      throw Error("cannot rename " + temp + " to " + path + ": " + why);
    }
    return;
  }
  std::remove(temp.c_str());
  throw Error("cannot write " + path + (errors.message[0] ? std::string(": ") + errors.message : std::string()));
}

}  // namespace qdit4sr
