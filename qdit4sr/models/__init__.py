"""DiT4SR transformer, configs, checkpoint loading, the full-precision SR pipeline and the embedded tiny default."""
