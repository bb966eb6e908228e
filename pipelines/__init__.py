"""diffusers pipelines that load a medaug output folder (installed as `medaug.pipelines`).

    from medaug.pipelines import MedaugControlNetPipeline

    pipe = MedaugControlNetPipeline.from_medaug("outputs/busi-controlnet").to("cuda")
    image = pipe(prompt="breast ultrasound, benign lesion", control_image=edges).images[0]
"""

from .medaug_controlnet_pipeline import MedaugControlNetPipeline
from .medaug_generator_pipeline import MedaugGeneratorPipeline
from .medaug_mask_pipeline import MedaugMaskPipeline
from .medaug_pipeline import MedaugPipeline
from .medaug_pix2pix_pipeline import MedaugPix2PixPipeline

__all__ = ["MedaugControlNetPipeline", "MedaugGeneratorPipeline", "MedaugMaskPipeline", "MedaugPipeline",
           "MedaugPix2PixPipeline"]
