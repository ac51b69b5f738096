"""gsae-jax: Global Sinkhorn Autoencoders and a chunked, differentiable Sinkhorn divergence."""

__version__ = "0.1.0"
