"""The embedded demo: data, VAE, AHPA training, samples and a measured check, on a laptop CPU."""
