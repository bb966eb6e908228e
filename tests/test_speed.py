"""medaug.speed: threads from the idle cores, precision from what the hardware computes natively, the cached
unconditional embedding, and generation at the precision chosen."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch

from medaug import speed

pytest_plugins = ["tests.model_folders"]  # the session's model_folder fixture


@pytest.fixture
def no_thread_variables(monkeypatch):
    for variable in speed.THREAD_VARIABLES:
        monkeypatch.delenv(variable, raising=False)


@pytest.mark.parametrize(("idle", "expected"), [(0.3, 1), (0.9, 1), (1.6, 2), (2.0, 2)])
def test_threads_follow_the_idle_cores(monkeypatch, no_thread_variables, idle, expected):
    monkeypatch.setattr(speed, "usable_cores", lambda: 2)
    monkeypatch.setattr(speed, "idle_cores", lambda: idle)
    threads, reason = speed.thread_choice()
    assert threads == expected and reason == f"{expected} of 2 cores idle"


def test_a_busy_machine_still_gets_one_thread_and_the_user_variables_win(monkeypatch, no_thread_variables):
    monkeypatch.setattr(speed, "idle_cores", lambda: 0.0)
    assert speed.thread_choice()[0] == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert speed.thread_choice() == (3, "OMP_NUM_THREADS=3")
    monkeypatch.setenv("MEDAUG_NUM_THREADS", "2")
    assert speed.thread_choice() == (2, "MEDAUG_NUM_THREADS=2")


@pytest.mark.parametrize("value", ["two", "0", "-1"])
def test_a_malformed_thread_variable_is_named(monkeypatch, no_thread_variables, value):
    monkeypatch.setenv("MEDAUG_NUM_THREADS", value)
    with pytest.raises(ValueError, match=f"MEDAUG_NUM_THREADS={value!r}"):
        speed.thread_choice()


def test_idle_cores_are_measured_between_zero_and_the_usable_cores():
    idle = speed.idle_cores(0.05)
    assert idle is None or 0.0 <= idle <= speed.usable_cores() + 1e-9


def test_choose_threads_sets_torch_once_per_process(monkeypatch, no_thread_variables):
    threads = torch.get_num_threads()
    monkeypatch.setattr(speed, "_chosen", None)
    monkeypatch.setattr(speed, "thread_choice", lambda: (1, "test"))
    try:
        assert speed.choose_threads() == (1, "test") and torch.get_num_threads() == 1
        monkeypatch.setattr(speed, "thread_choice", lambda: (2, "later"))
        assert speed.choose_threads() == (1, "test")  # a running process keeps its choice
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize(("flags", "expected"), [({"avx512f", "avx512_bf16"}, "bf16"), ({"amx_bf16"}, "bf16"),
                                                 ({"avx2", "avx512f", "avx512bw"}, "fp32"), (set(), "fp32")])
def test_auto_precision_is_bf16_only_where_the_cpu_computes_it_natively(monkeypatch, flags, expected):
    monkeypatch.setattr(speed, "cpu_flags", lambda: frozenset(flags))
    assert speed.resolve_precision("auto", "cpu") == expected
    assert speed.training_precision("auto", "cpu") == {"bf16": "bf16", "fp32": "no"}[expected]


def test_precision_refusals_and_what_wins_for_training(monkeypatch):
    with pytest.raises(ValueError, match="--precision: unknown precision 'half'"):
        speed.resolve_precision("half", "cpu")
    with pytest.raises(ValueError, match="--precision fp16: CPUs have no fast fp16"):
        speed.resolve_precision("fp16", "cpu")
    monkeypatch.setattr(speed, "cpu_flags", lambda: frozenset({"avx512_bf16"}))
    assert speed.training_precision("no", "cpu") == "no"  # given on the command line
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp16")  # set by `accelerate launch` from its config
    assert speed.training_precision("auto", "cpu") == "fp16"
    assert speed.training_precision(None, "cpu") == "fp16"


def count_text_encoder_calls(text_encoder) -> list:
    calls = []
    text_encoder.register_forward_hook(lambda *_: calls.append(1))
    return calls


def test_the_empty_prompt_is_encoded_once_while_the_text_encoder_is_frozen(tiny_model_dir):
    from transformers import CLIPTextModel, CLIPTokenizer

    from medaug.conditioning import TextCondition

    text_encoder = CLIPTextModel.from_pretrained(tiny_model_dir / "text_encoder").requires_grad_(False)
    condition = TextCondition(CLIPTokenizer.from_pretrained(tiny_model_dir / "tokenizer"), text_encoder)
    calls = count_text_encoder_calls(text_encoder)
    first, second = condition.unconditional_embedding(2), condition.unconditional_embedding(5)
    assert len(calls) == 1 and first.shape[0] == 2 and second.shape[0] == 5
    assert torch.equal(first[0], condition.features([""])[0])
    list(text_encoder.parameters())[-1].requires_grad_(True)  # it trains now: encode every time
    calls.clear()
    condition.unconditional_embedding(1), condition.unconditional_embedding(1)
    assert len(calls) == 2


def test_a_pipeline_encodes_its_negative_once_and_again_after_its_weights_change(model_folder):
    from medaug.pipelines import MedaugPipeline

    pipeline = MedaugPipeline.from_medaug(model_folder())
    pipeline.set_progress_bar_config(disable=True)
    calls = count_text_encoder_calls(pipeline.text_encoder)
    for _ in range(2):
        pipeline(prompt=["a", "b"], num_inference_steps=1, output_type="np")
    assert len(calls) == 2 + 1  # each call's prompts, and the empty prompt once
    weight = list(pipeline.text_encoder.parameters())[-1]
    weight.data = weight.data * 2 + 1  # as fusing a LoRA replaces a weight
    calls.clear()
    _, negative = pipeline.encode_condition(prompt="a")
    assert len(calls) == 2 and torch.allclose(negative[0], pipeline.condition().features([""])[0])


def test_generate_records_the_precision_and_bf16_stays_close_to_fp32(model_folder, phantom_dir, tmp_path,
                                                                       one_torch_thread):
    from PIL import Image

    from medaug.generate import generate
    from medaug.synthetic import ARGS_NAME

    images = {}
    for precision in ("fp32", "bf16"):
        summary = generate(model_folder(), tmp_path / precision, from_masks=phantom_dir, max_sources=2,
                           num_inference_steps=3, precision=precision, batch_size=2)
        settings = json.loads((tmp_path / precision / ARGS_NAME).read_text())
        assert summary["precision"] == settings["precision"] == precision
        assert settings["scheduler"] == speed.DEFAULT_SCHEDULER
        images[precision] = np.stack([np.asarray(Image.open(path), dtype=float)
                                      for path in sorted((tmp_path / precision / "images").glob("*.png"))])
    difference = np.abs(images["fp32"] - images["bf16"])
    assert 0 < difference.mean() < 4.0  # bf16 really ran, and changed the images by little


def test_fp16_on_a_cpu_is_refused_before_anything_is_written(model_folder, phantom_dir, tmp_path):
    from medaug.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["generate", "--model_dir", str(model_folder()), "--from_masks", str(phantom_dir), "--output_dir",
              str(tmp_path / "out"), "--precision", "fp16"])
    assert exit_info.value.code == 2 and not (tmp_path / "out").exists()


@pytest.mark.parametrize(("free_gib", "per_image_mib", "expected"),
                         [(None, 15, 8), (16, 15, 8), (0.2, 15, 4), (0.05, 15, 1), (1, 10_000, 1)])
def test_auto_batch_is_the_largest_power_of_two_that_fits_half_the_free_memory(free_gib, per_image_mib, expected):
    free = None if free_gib is None else int(free_gib * 2**30)
    batch, reason = speed.auto_batch_size(per_image_mib * 2**20, "cpu", free_bytes=free)
    assert batch == expected and reason.startswith(f"auto: {expected}")


def test_sampling_memory_grows_with_the_latent_the_model_and_fp32():
    bf16 = speed.sampling_bytes_per_image(32 * 32, 256, "bf16")
    assert speed.sampling_bytes_per_image(64 * 64, 256, "bf16") == 4 * bf16
    assert speed.sampling_bytes_per_image(32 * 32, 256, "fp32") == 2 * bf16
    assert 8 * 2**20 < bf16 < 64 * 2**20  # the small preset at 128 px: measured 15-24 MiB an image
    assert speed.free_memory_bytes("cpu") > 0


@pytest.mark.parametrize("value", ["0", "-2", "two", "2.5", 0])
def test_a_bad_batch_size_is_refused_by_name(value):
    from medaug.generate import parse_batch_size

    with pytest.raises(ValueError, match="--batch_size"):
        parse_batch_size(value)
    assert parse_batch_size("8") == parse_batch_size(8) == 8 and parse_batch_size("AUTO") == "auto"


def test_generate_chooses_its_batch_from_free_memory_and_says_so(model_folder, phantom_dir, tmp_path, monkeypatch,
                                                                one_torch_thread):
    from medaug import generate as generate_module

    monkeypatch.setattr(speed, "free_memory_bytes", lambda device: 2**20)  # 1 MiB free: one image at a time
    summary = generate_module.generate(model_folder(), tmp_path / "out", from_masks=phantom_dir, max_sources=3,
                                       num_inference_steps=2)
    assert summary["written"] == 3 and summary["batch_size"] == 1
    assert summary["batch_size_reason"].startswith("auto: 1 (")
    monkeypatch.setattr(speed, "free_memory_bytes", lambda device: 2**40)
    summary = generate_module.generate(model_folder(), tmp_path / "more", from_masks=phantom_dir, max_sources=3,
                                       num_inference_steps=2)
    assert summary["batch_size"] == speed.AUTO_BATCH_CAP["cpu"]


def test_an_unreadable_batch_size_fails_before_anything_is_written(model_folder, phantom_dir, tmp_path):
    from medaug.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["generate", "--model_dir", str(model_folder()), "--from_masks", str(phantom_dir), "--output_dir",
              str(tmp_path / "out"), "--batch_size", "lots"])
    assert exit_info.value.code == 2 and not (tmp_path / "out").exists()


@pytest.mark.slow
def test_compiled_generation_makes_the_eager_images_and_runs_a_short_last_batch_eager(model_folder, phantom_dir,
                                                                                     tmp_path, monkeypatch):
    """torch.compile for real (inductor, most of a minute for the tiny UNet on a CPU): same images as eager
    within a grey level, and the last batch of one image runs on the eager modules rather than compiling again."""
    from PIL import Image

    from medaug import generate as generate_module

    calls = []
    original = generate_module.compiled_denoisers
    monkeypatch.setattr(generate_module, "compiled_denoisers", lambda pipeline: calls.append(
        pipeline) or original(pipeline))
    model = model_folder()
    options = {"from_masks": phantom_dir, "max_sources": 3, "num_inference_steps": 2, "batch_size": 2,
               "precision": "fp32"}
    summaries = {mode: generate_module.generate(model, tmp_path / mode, compile_model=mode == "compiled", **options)
                 for mode in ("eager", "compiled")}
    assert [summaries[mode]["compiled"] for mode in ("eager", "compiled")] == [False, True]
    pipeline = calls[0]
    assert type(pipeline.unet).__name__ != "OptimizedModule"  # the last batch, one image, ran eager
    images = {mode: np.stack([np.asarray(Image.open(path), dtype=float)
                              for path in sorted((tmp_path / mode / "images").glob("*.png"))]) for mode in summaries}
    assert images["compiled"].shape == images["eager"].shape == (3, 64, 64)
    assert np.abs(images["compiled"] - images["eager"]).max() <= 2.0


@pytest.mark.parametrize("script", ["finetune", "train_controlnet"])
def test_bf16_training_runs_on_a_cpu_and_keeps_fp32_weights(script, tiny_model_dir, phantom_dir, tmp_path,
                                                          one_torch_thread, fresh_accelerate_state, caplog):
    """bf16 autocast on the CPU (emulated where the CPU has no bf16 instructions): a ControlNet residual meets the
    frozen UNet, attention trains through the matmul backward, validation samples, and what is saved is fp32."""
    from safetensors.torch import load_file

    from medaug.scripts import finetune, train_controlnet

    caplog.set_level(logging.INFO, logger="medaug")

    module = {"finetune": finetune, "train_controlnet": train_controlnet}[script]
    output_dir = tmp_path / "out"
    extra = ["--edge_method", "mask_boundary"] if script == "train_controlnet" else ["--train_mode", "lora"]
    summary = module.main(module.parse_args([
        "--pretrained_model_name_or_path", str(tiny_model_dir), "--train_data_dir", str(phantom_dir),
        "--output_dir", str(output_dir), "--latent_cache_dir", str(tmp_path / "cache"), "--report_to", "none",
        "--max_train_steps", "2", "--train_batch_size", "2", "--mixed_precision", "bf16", "--validation_steps", "2",
        "--num_validation_images", "1", "--validation_inference_steps", "2", *extra]))
    assert summary["global_step"] == 2 and np.isfinite(summary["losses"]).all()
    assert json.loads((output_dir / "medaug_args.json").read_text())["mixed_precision"] == "bf16"
    weights = next(output_dir.glob("controlnet/*.safetensors" if script == "train_controlnet" else "*.safetensors"))
    assert {tensor.dtype for tensor in load_file(weights).values()} == {torch.float32}
    assert (output_dir / "validation" / "step-000002.png").is_file()
    assert "attention: SDPA forward, matmul backward" in caplog.text


@pytest.mark.parametrize(("xformers", "precision", "device", "expected"),
                         [(False, "bf16", "cpu", "SDPA forward, matmul backward (bf16 on a CPU)"),
                          (False, "no", "cpu", "SDPA"), (False, "bf16", "cuda", "SDPA"),
                          (True, "bf16", "cpu", "xformers")])
def test_training_takes_the_matmul_backward_only_for_bf16_on_a_cpu(xformers, precision, device, expected):
    from medaug.training.base_model import training_attention

    assert training_attention(xformers, precision, device) == expected


def attention_inputs(unet, batch: int = 2):
    generator = torch.Generator().manual_seed(0)
    size, tokens = unet.config.sample_size, 5
    latents = torch.randn(batch, unet.config.in_channels, size, size, generator=generator)
    hidden = torch.randn(batch, tokens, unet.config.cross_attention_dim, generator=generator)
    keep = torch.ones(batch, tokens)
    keep[:, -2:] = 0  # the last two tokens masked out: the mask reaches the cross-attention
    return latents, torch.tensor([10, 500]), hidden, keep


def test_matmul_backward_processor_computes_what_diffusers_default_does(tiny_model_dir):
    from diffusers import UNet2DConditionModel

    from medaug.models.attention import MatmulBackwardAttention, use_matmul_backward_attention

    unet = UNet2DConditionModel.from_pretrained(tiny_model_dir / "unet").eval()
    latents, timesteps, hidden, keep = attention_inputs(unet)
    with torch.no_grad():
        default = unet(latents, timesteps, hidden, encoder_attention_mask=keep).sample
        unmasked = unet(latents, timesteps, hidden).sample
        use_matmul_backward_attention(unet)
        ours = unet(latents, timesteps, hidden, encoder_attention_mask=keep).sample
    assert {type(processor) for processor in unet.attn_processors.values()} == {MatmulBackwardAttention}
    assert torch.allclose(ours, default, atol=1e-5)
    assert not torch.allclose(ours, unmasked, atol=1e-3)  # the mask mattered, and was applied alike


@pytest.mark.parametrize("mask_kind", ["none", "additive", "boolean"])
def test_recomputed_attention_has_pytorchs_gradients(mask_kind):
    from medaug.models.attention import recomputed_attention

    generator = torch.Generator().manual_seed(1)
    query, key, value = (torch.randn(2, 3, length, 8, generator=generator, dtype=torch.float64)
                         for length in (6, 5, 5))
    keep = torch.ones(2, 1, 1, 5, dtype=torch.bool)
    keep[0, ..., -2:] = False
    mask = {"none": None, "boolean": keep,
            "additive": torch.zeros(2, 1, 1, 5, dtype=torch.float64).masked_fill(~keep, -1e4)}[mask_kind]
    weights = torch.randn(2, 3, 6, 8, generator=generator, dtype=torch.float64)
    results = []
    for attention in (recomputed_attention, torch.nn.functional.scaled_dot_product_attention):
        inputs = [tensor.clone().requires_grad_(True) for tensor in (query, key, value)]
        output = attention(*inputs, attn_mask=mask) if attention is not recomputed_attention else attention(
            *inputs, mask)
        (output * weights).sum().backward()
        results.append([output.detach(), *(tensor.grad for tensor in inputs)])
    for ours, pytorchs in zip(*results):
        assert torch.allclose(ours, pytorchs, atol=1e-10)
    if mask_kind != "none":
        assert results[0][2][0, :, -2:].abs().max() < 1e-8  # masked keys get no gradient


def test_only_the_inputs_that_need_it_get_a_gradient():
    from medaug.models.attention import recomputed_attention

    query, key, value = torch.randn(1, 2, 4, 8), torch.randn(1, 2, 3, 8), torch.randn(1, 2, 3, 8)
    value.requires_grad_(True)
    recomputed_attention(query, key, value).sum().backward()
    assert value.grad is not None and query.grad is None and key.grad is None


def test_a_bf16_lora_step_through_the_matmul_backward_matches_the_default(tiny_model_dir):
    """The same LoRA gradients under bf16 autocast as diffusers' default attention, to bf16's precision."""
    import copy

    from diffusers import UNet2DConditionModel

    from medaug.models.attention import use_matmul_backward_attention
    from medaug.training.lora import UNET_TARGETS, add_lora

    unet = UNet2DConditionModel.from_pretrained(tiny_model_dir / "unet").requires_grad_(False)
    add_lora(unet, 4, UNET_TARGETS)
    for name, parameter in unet.named_parameters():
        if "lora_B" in name:  # B starts at zero; a nonzero B lets A's gradients be compared too
            torch.nn.init.normal_(parameter, std=0.1)
    latents, timesteps, hidden, _ = attention_inputs(unet)
    gradients = []
    for model in (unet, copy.deepcopy(unet)):
        if gradients:
            use_matmul_backward_attention(model)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            prediction = model(latents, timesteps, hidden).sample
        torch.nn.functional.mse_loss(prediction.float(), latents).backward()
        gradients.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad]))
    default, ours = gradients
    assert torch.isfinite(ours).all() and default.abs().max() > 0
    assert torch.nn.functional.cosine_similarity(ours, default, dim=0) > 0.999
