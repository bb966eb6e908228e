"""medaug: adapt latent Stable Diffusion to small labelled medical image sets, generate images with masks,
and measure on real held-out data whether they help a downstream model."""

__version__ = "0.1.0"


def __getattr__(name: str):
    # diffusers reloads a saved Medaug pipeline's condition encoder as `medaug.ConditionProjection` (its
    # model_index.json names the library "medaug"); imported on demand so `import medaug` stays light.
    if name == "ConditionProjection":
        from medaug.conditioning import ConditionProjection

        return ConditionProjection
    if name == "Pix2PixGenerator":
        from medaug.models.pix2pix import Pix2PixGenerator

        return Pix2PixGenerator
    if name in ("GanGenerator", "ConvVAE"):  # MedaugGeneratorPipeline's image_generator
        from medaug.models import autoencoder, gan

        return getattr(gan if name == "GanGenerator" else autoencoder, name)
    raise AttributeError(f"module 'medaug' has no attribute '{name}'")
