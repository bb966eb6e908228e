"""medaug: adapt latent Stable Diffusion to small labelled medical image sets, generate images with masks,
and measure on real held-out data whether they help a downstream model."""

__version__ = "0.1.0"
