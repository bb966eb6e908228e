"""medaug.pipelines on output folders of short runs on the tiny base: each condition kind, guidance from the
condition's unconditional embedding, the ControlNet following its edge map, and errors for wrong input."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medaug.pipelines import MedaugControlNetPipeline, MedaugPipeline
from tests.model_folders import EMBEDDING_SHAPE

pytest_plugins = ["tests.model_folders"]  # the session's model_folder fixture

PROMPT = "phantom ultrasound, round lesion"


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def condition_for(kind: str, phantom_dir, count: int = 1) -> dict:
    if kind == "text":
        return {"prompt": [PROMPT] * count}
    if kind == "clip_image":
        return {"reference_image": [phantom_dir / "images" / "round_0000.png"] * count}
    return {"embeddings": np.random.default_rng(0).normal(size=(count, *EMBEDDING_SHAPE)).astype(np.float32)}


def sample(pipe, **kwargs) -> np.ndarray:
    options = {"num_inference_steps": 2, "output_type": "np", "generator": seeded()} | kwargs
    return pipe(**options).images


@pytest.fixture(scope="module")
def edges() -> np.ndarray:
    edge_map = np.zeros((64, 64), dtype=np.float32)
    edge_map[16:48, 16] = edge_map[16:48, 47] = edge_map[16, 16:48] = edge_map[47, 16:48] = 1.0
    return edge_map


@pytest.mark.parametrize("kind", ["text", "clip_image", "embedding"])
def test_each_kind_generates_a_batch_at_the_run_resolution(kind, model_folder, phantom_dir, one_torch_thread):
    pipe = MedaugPipeline.from_medaug(model_folder(kind))
    assert pipe.config.conditioning == kind and pipe.config.resolution == 64
    images = sample(pipe, **condition_for(kind, phantom_dir, count=2), num_images_per_prompt=2)
    assert images.shape == (4, 64, 64, 3) and np.isfinite(images).all()
    single = {key: value[0] for key, value in condition_for(kind, phantom_dir).items()}  # one, not a list
    (image,) = pipe(**single, num_inference_steps=2, generator=seeded()).images
    assert image.size == (64, 64)


def test_text_pipeline_equals_stock_pipeline_with_the_run_applied(model_folder, tiny_model_dir, one_torch_thread):
    from diffusers import StableDiffusionPipeline

    stock = StableDiffusionPipeline.from_pretrained(tiny_model_dir, safety_checker=None, requires_safety_checker=False)
    stock.load_lora_weights(str(model_folder("text")))  # LoRA as adapters; MedaugPipeline fuses it
    expected = stock(prompt=PROMPT, num_inference_steps=2, output_type="np", guidance_scale=3.0, height=64,
                     width=64, generator=seeded()).images  # stock guides with the empty prompt
    ours = sample(MedaugPipeline.from_medaug(model_folder("text")), prompt=PROMPT, guidance_scale=3.0)
    np.testing.assert_allclose(ours, expected, atol=1e-4)
    unfused = sample(MedaugPipeline.from_medaug(model_folder("text"), fuse_lora=False), prompt=PROMPT)
    np.testing.assert_allclose(unfused, ours, atol=1e-4)


@pytest.mark.parametrize("kind", ["clip_image", "embedding"])
def test_guidance_uses_the_learned_unconditional_embedding(kind, model_folder, phantom_dir, one_torch_thread):
    pipe = MedaugPipeline.from_medaug(model_folder(kind))
    condition = condition_for(kind, phantom_dir)
    guided, unguided = sample(pipe, **condition, guidance_scale=4.0), sample(pipe, **condition, guidance_scale=1.0)
    prompt_embeds, negative = pipe.encode_condition(**condition)
    torch.testing.assert_close(negative, pipe.condition_encoder.unconditional_embedding(1))
    assert negative.shape == prompt_embeds.shape == (1, pipe.condition_encoder.tokens, 32)
    with torch.no_grad():
        pipe.condition_encoder.unconditional.add_(0.5)
    assert np.abs(sample(pipe, **condition, guidance_scale=4.0) - guided).max() > 1e-3
    np.testing.assert_array_equal(sample(pipe, **condition, guidance_scale=1.0), unguided)


def test_text_guidance_uses_the_empty_prompt_or_a_negative_prompt(model_folder):
    pipe = MedaugPipeline.from_medaug(model_folder("text"))
    _, negative = pipe.encode_condition(prompt=[PROMPT, PROMPT])
    empty, _ = pipe.encode_condition(prompt="")
    torch.testing.assert_close(negative, empty.expand(2, -1, -1))
    _, other = pipe.encode_condition(prompt=PROMPT, negative_prompt="irregular lesion")
    assert not torch.allclose(other, empty)


def test_controlnet_follows_the_control_image(model_folder, edges, one_torch_thread):
    folder = model_folder("text", controlnet=True)
    pipe = MedaugControlNetPipeline.from_medaug(folder)
    assert pipe.config.edge_method == "mask_boundary"
    square = sample(pipe, prompt=PROMPT, control_image=edges)
    assert square.shape == (1, 64, 64, 3)
    np.testing.assert_array_equal(sample(pipe, prompt=PROMPT, control_image=edges), square)
    shifted = np.roll(edges, 8, axis=1)
    assert np.abs(sample(pipe, prompt=PROMPT, control_image=shifted) - square).max() > 1e-3
    rgb = np.repeat(edges[:, :, None], 3, axis=2)  # the same edge map with 3 channels, as PNGs hold it
    np.testing.assert_array_equal(sample(pipe, prompt=PROMPT, control_image=rgb), square)
    pair = sample(pipe, prompt=[PROMPT, PROMPT], control_image=[edges, shifted], generator=[seeded(), seeded()])
    assert np.abs(pair[0] - pair[1]).max() > 1e-3  # one edge map per condition
    # Scale 0 silences the ControlNet: the plain pipeline of the same folder gives the same image.
    silenced = sample(pipe, prompt=PROMPT, control_image=edges, controlnet_conditioning_scale=0.0)
    np.testing.assert_allclose(silenced, sample(MedaugPipeline.from_medaug(folder), prompt=PROMPT), atol=1e-5)


def test_wrong_input_is_named(model_folder, phantom_dir, edges):
    embedding = MedaugPipeline.from_medaug(model_folder("embedding"))
    with pytest.raises(ValueError, match=r"embeddings: expected shape \(8, 16\) or \(B, 8, 16\).*got \(16,\)"):
        embedding(embeddings=np.zeros(16))
    with pytest.raises(ValueError, match=r"embeddings: expected shape .* got \(2, 8, 15\)"):
        embedding(embeddings=np.zeros((2, 8, 15)))
    with pytest.raises(ValueError, match="embeddings: contain NaN"):
        embedding(embeddings=np.full(EMBEDDING_SHAPE, np.nan))
    with pytest.raises(ValueError, match=r"prompt: this model is conditioned on embedding; pass embeddings of "
                                         r"shape \(8, 16\)"):
        embedding(prompt=PROMPT)
    with pytest.raises(ValueError, match="embeddings: this model is conditioned on embedding"):
        embedding()
    with pytest.raises(ValueError, match="negative_prompt: only text models"):
        embedding(embeddings=np.zeros(EMBEDDING_SHAPE), negative_prompt="x")
    with pytest.raises(ValueError, match="prompt_embeds: set by the pipeline"):
        embedding(embeddings=np.zeros(EMBEDDING_SHAPE), prompt_embeds=torch.zeros(1, 8, 32))
    text = MedaugPipeline.from_medaug(model_folder("text"))
    with pytest.raises(ValueError, match="reference_image: this model is conditioned on text; pass prompt"):
        text(prompt=PROMPT, reference_image=phantom_dir / "images" / "round_0000.png")
    clip = MedaugPipeline.from_medaug(model_folder("clip_image"))
    with pytest.raises(ValueError, match=r"reference_image: expected an image of shape .* got an array of shape "
                                         r"\(2, 3, 4, 5, 6\)"):
        clip(reference_image=np.zeros((2, 3, 4, 5, 6)))
    with pytest.raises(FileNotFoundError, match="no controlnet/ in this output folder"):
        MedaugControlNetPipeline.from_medaug(model_folder("text"))
    controlled = MedaugControlNetPipeline.from_medaug(model_folder("text", controlnet=True))
    with pytest.raises(ValueError, match="control_image: a ControlNet model needs an edge map"):
        controlled(prompt=PROMPT)
    with pytest.raises(ValueError, match="control_image: size 32x48 differs from the output size 64x64"):
        controlled(prompt=PROMPT, control_image=np.zeros((48, 32)))
    with pytest.raises(ValueError, match="control_image: 3 edge maps for 2 conditions"):
        controlled(prompt=[PROMPT, PROMPT], control_image=[edges] * 3)
    with pytest.raises(ValueError, match=r"control_image: float images must be in \[0, 1\]"):
        controlled(prompt=PROMPT, control_image=edges * 255.0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_controlnet_pipeline_on_cuda(model_folder, edges):
    pipe = MedaugControlNetPipeline.from_medaug(model_folder("text", controlnet=True)).to("cuda")
    images = pipe(prompt=PROMPT, control_image=edges, num_inference_steps=2, output_type="np").images
    assert images.shape == (1, 64, 64, 3) and np.isfinite(images).all()
