"""ahpa: Adaptive Hierarchical Prior Alignment for Diffusion Transformers.

Time convention (stated once, used everywhere): t=0 is data, t=1 is noise,
x_t = alpha(t) * x + sigma(t) * eps, and the network predicts the velocity d/dt x_t.
"""

__version__ = "0.1.0"
