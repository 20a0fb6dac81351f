"""Reward protocol, specs, registry, validation, loading, the weighted loss and the transformers CLIP reward."""

import sys

import pytest
import torch
from reward_fixtures import TINY_CLIP_CROP, image_to_tensor, reference_image, save_tiny_clip
from safetensors.torch import load_file, save_file

from diffusers_dmdr.method.losses import reward_loss
from diffusers_dmdr.rewards import (
    REWARD_REGISTRY,
    CLIPReward,
    LoadedReward,
    RewardLoadError,
    RewardSpec,
    compute_reward_loss,
    load_rewards,
    parse_reward_spec,
    validate_reward_specs,
)
from diffusers_dmdr.rewards.preprocessing import OPENAI_CLIP_MEAN


@pytest.fixture(scope="module")
def tiny_clip_dir(tmp_path_factory):
    return save_tiny_clip(tmp_path_factory.mktemp("tiny-clip"))


# --- spec parsing -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ("clip", RewardSpec("clip", 1.0, 0.7, {})),
        ("clip:0.3", RewardSpec("clip", 0.3, 0.7, {})),
        ("clip:0.3:hinge=none:model=/tmp/clip", RewardSpec("clip", 0.3, None, {"model": "/tmp/clip"})),
        ("clip:hinge=0.5", RewardSpec("clip", 1.0, 0.5, {})),
        ("my_pkg.rewards.MyReward:1.0", RewardSpec("my_pkg.rewards.MyReward", 1.0, 0.7, {})),
        # A value keeps its colons (open_clip Hub ids) and the prompt prefix keeps its trailing space.
        (
            "clip:0.3:model=hf-hub:apple/DFN5B-CLIP-ViT-H-14",
            RewardSpec("clip", 0.3, 0.7, {"model": "hf-hub:apple/DFN5B-CLIP-ViT-H-14"}),
        ),
        (
            "hpsv2.1:0.3:prompt_prefix=Realistic photo ",
            RewardSpec("hpsv2.1", 0.3, 0.7, {"prompt_prefix": "Realistic photo "}),
        ),
        ("clip:2:offload=true:precision=bf16", RewardSpec("clip", 2.0, 0.7, {"offload": True, "precision": "bf16"})),
        # Rewards whose scores are not cosines default to the linear loss.
        ("pickscore:0.5", RewardSpec("pickscore", 0.5, None, {})),
        ("aesthetic", RewardSpec("aesthetic", 1.0, None, {})),
    ],
)
def test_parse_reward_spec_text(text, expected):
    assert parse_reward_spec(text) == expected


def test_parse_reward_spec_mapping_and_round_trip():
    spec = parse_reward_spec({"name": "hpsv2.1", "weight": 0.3, "prompt_prefix": "Realistic photo ", "model": "/m"})
    assert spec == RewardSpec("hpsv2.1", 0.3, 0.7, {"prompt_prefix": "Realistic photo ", "model": "/m"})
    assert parse_reward_spec({"name": "clip", "hinge": None}).hinge is None
    assert parse_reward_spec({"name": "clip", "hinge": "none"}).hinge is None
    specs = [
        spec,
        RewardSpec("clip", 0.1, None, {"model": "hf-hub:apple/DFN5B-CLIP-ViT-H-14", "offload": True}),
        RewardSpec("relative", 5.0, 0.7, {"reward": "hpsv2.1", "k": 0.1}),
        RewardSpec("pkg.mod.Reward", 0.25, -1.5, {}),
    ]
    for spec in specs:
        assert parse_reward_spec(spec.to_text()) == spec
        assert parse_reward_spec(spec.to_dict()) == spec
        assert parse_reward_spec(spec) == spec


@pytest.mark.parametrize(
    "bad",
    ["", ":0.3", "clip:abc", "clip:0.3:0.5", "clip:hinge=abc", "clip:weight=x", "clip:-1", "clip:inf",
     "clip:model=a:model=b", "clip:=3", {"weight": 1.0}, 3],
)  # fmt: skip
def test_parse_reward_spec_errors(bad):
    with pytest.raises(ValueError, match=r"name|weight|hinge|key|mapping|string"):
        parse_reward_spec(bad)


def test_parse_error_shows_syntax():
    with pytest.raises(ValueError, match=r"name\[:weight\]\[:key=value\]"):
        parse_reward_spec("clip:abc")


# --- validation (no weights) -------------------------------------------------------------------------------------


def test_validate_unknown_name_lists_registry():
    with pytest.raises(ValueError, match="Unknown reward 'clpi'") as error:
        validate_reward_specs([parse_reward_spec("clpi:0.3")])
    assert all(name in str(error.value) for name in REWARD_REGISTRY)


@pytest.mark.parametrize(
    "spec, message",
    [
        ("not_a_package_xyz.rewards.MyReward", "does not import"),
        ("reward_fixtures.NoSuchReward", "no attribute"),
        ("clip:model=/nonexistent/clip-folder", "not an existing local path"),
        ("clip:model=./missing/model.safetensors", "not an existing local path"),
        ("clip:modle=openai/clip-vit-base-patch32", r"Unknown option\(s\) \['modle'\]"),
        ("clip:model=openai/clip-vit-base-patch32:precision=fp8", "precision"),
        ("clip:model=openai/clip-vit-base-patch32:offload=maybe", "offload"),
        ("reward_fixtures.sum_of_pixels_reward:model=/x", "takes no options"),
        ("relative:reward=clpi", "Unknown reward 'clpi'"),
        ("relative:reward=clip:model=/nonexistent/clip", "not an existing local path"),
        ("classifier", "exactly one of model"),
        ("classifier:module=reward_fixtures.TinyConvClassifier", "needs labels"),
    ],
)
def test_validate_rejects_bad_specs(spec, message):
    with pytest.raises(ValueError, match=message):
        validate_reward_specs([spec])


def test_validate_names_the_rewards_extra_when_open_clip_is_missing(monkeypatch):
    monkeypatch.setitem(sys.modules, "open_clip", None)  # makes `import open_clip` raise ImportError
    for spec in ("clip", "clip:model=hf-hub:apple/DFN5B-CLIP-ViT-H-14", "hpsv2.1:model=/tmp"):
        with pytest.raises(ValueError, match=r"pip install 'diffusers-dmdr\[rewards\]'"):
            validate_reward_specs([spec])


def test_validate_loads_no_weights(tmp_path, tiny_clip_dir):
    # A folder with a corrupt weight file passes validation (nothing is read) and fails at load time.
    broken_dir = save_tiny_clip(tmp_path / "broken")
    (broken_dir / "model.safetensors").write_bytes(b"not a safetensors file")
    specs = [f"clip:model={broken_dir}", f"clip:0.3:model={tiny_clip_dir}", "reward_fixtures.sum_of_pixels_reward"]
    validate_reward_specs(specs)
    with pytest.raises(RewardLoadError, match="Could not load the CLIP reward model"):
        load_rewards(specs[:1], "cpu")


# --- the transformers CLIP reward --------------------------------------------------------------------------------


def _reference_clip_score(folder, image, prompt):
    """CLIP cosine through the model's own processor (numpy/PIL path), as the model card computes it."""
    from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

    model = CLIPModel.from_pretrained(folder).eval()
    pixel_values = AutoImageProcessor.from_pretrained(folder)(images=image, return_tensors="pt").pixel_values
    text_inputs = AutoTokenizer.from_pretrained(folder)([prompt], padding=True, truncation=True, return_tensors="pt")
    with torch.no_grad():
        image_embeds = model.get_image_features(pixel_values=pixel_values).pooler_output
        text_embeds = model.get_text_features(**text_inputs).pooler_output
    return torch.cosine_similarity(image_embeds, text_embeds).item(), pixel_values


def test_clip_tensor_path_matches_processor(tiny_clip_dir):
    image, prompt = reference_image(), "a red square on a gradient"
    reference_score, reference_pixels = _reference_clip_score(tiny_clip_dir, image, prompt)
    reward = CLIPReward(model=str(tiny_clip_dir))
    pixel_values = reward.towers.preprocessing(image_to_tensor(image))
    assert pixel_values.shape == reference_pixels.shape == (1, 3, TINY_CLIP_CROP, TINY_CLIP_CROP)
    # Tolerance: the processor rounds the resized image to uint8 (0.5/255) and PIL's bicubic kernel differs from
    # torch's antialiased one by about 1/255 at edges; divided by CLIP's std (~0.27) that is up to ~0.02 here
    # (measured 0.015-0.022 max, 0.0045 mean over three images), and 1e-4-2e-4 on the cosine score.
    pixel_error = (pixel_values - reference_pixels).abs()
    assert pixel_error.max() < 0.04 and pixel_error.mean() < 0.008
    with torch.no_grad():
        score = reward(image_to_tensor(image), [prompt]).item()
    assert abs(score - reference_score) < 1e-3


def test_clip_defaults_without_processor_config(tmp_path):
    reward = CLIPReward(model=str(save_tiny_clip(tmp_path, processor_config=False)))
    preprocessing = reward.towers.preprocessing
    # CLIPProcessor's defaults at the model's own 32 px resolution.
    assert (preprocessing.size, preprocessing.crop_size, preprocessing.mean) == (32, (32, 32), OPENAI_CLIP_MEAN)


def test_clip_gradient_reaches_images_and_weights_stay_frozen(tiny_clip_dir):
    (reward,) = load_rewards([f"clip:model={tiny_clip_dir}"], "cpu")
    images = torch.rand(2, 3, 40, 56, requires_grad=True)
    scores = reward.fn(images, ["a cat", "a dog"])
    assert scores.shape == (2,) and scores.dtype == torch.float32
    scores.sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0 and torch.isfinite(images.grad).all()
    assert all(param.grad is None and not param.requires_grad for param in reward.fn.parameters())
    reward.fn.train()
    assert not any(module.training for module in reward.fn.modules())


def test_load_rewards_from_local_folder(tiny_clip_dir):
    rewards = load_rewards(
        [f"clip:0.3:model={tiny_clip_dir}", f"clip:0.5:hinge=none:model={tiny_clip_dir}:prompt_prefix=a photo of "],
        "cpu",
    )
    assert [(r.name, r.weight, r.hinge) for r in rewards] == [("clip", 0.3, 0.7), ("clip_2", 0.5, None)]
    assert all(isinstance(r, LoadedReward) for r in rewards)
    images = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        prefixed = rewards[1].fn(images, ["cat", "dog"])
        expected = rewards[0].fn(images, ["a photo of cat", "a photo of dog"])
    torch.testing.assert_close(prefixed, expected)


def test_offload_and_precision_options(tiny_clip_dir):
    plain, offloaded, half = load_rewards(
        [
            f"clip:model={tiny_clip_dir}",
            f"clip:model={tiny_clip_dir}:offload=true",
            f"clip:model={tiny_clip_dir}:precision=bf16",
        ],
        "cpu",
    )
    images = torch.rand(2, 3, 32, 32, requires_grad=True)
    offloaded_scores = offloaded.fn(images, ["a cat", "a dog"])
    (offloaded_grad,) = torch.autograd.grad(offloaded_scores.sum(), images)
    plain_scores = plain.fn(images, ["a cat", "a dog"])
    (plain_grad,) = torch.autograd.grad(plain_scores.sum(), images)
    torch.testing.assert_close(offloaded_scores, plain_scores)
    torch.testing.assert_close(offloaded_grad, plain_grad)
    offloaded.fn.to("meta")  # a trainer's `.to(device)` must not move offloaded weights
    assert all(param.device.type == "cpu" for param in offloaded.fn.parameters())
    assert {param.dtype for param in half.fn.parameters()} == {torch.bfloat16}
    half_scores = half.fn(images, ["a cat", "a dog"])
    assert half_scores.dtype == torch.float32
    torch.testing.assert_close(half_scores, plain_scores, atol=3e-2, rtol=0)


def test_missing_and_corrupt_weights_fail_clearly(tmp_path):
    missing_dir = save_tiny_clip(tmp_path / "missing")
    (missing_dir / "model.safetensors").unlink()
    with pytest.raises(RewardLoadError, match=rf"CLIP reward model from '{missing_dir}'"):
        CLIPReward(model=str(missing_dir))
    truncated_dir = save_tiny_clip(tmp_path / "truncated")
    weights = truncated_dir / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(RewardLoadError, match="weight files are complete"):
        load_rewards([f"clip:model={truncated_dir}"], "cpu")
    # transformers would fill a missing tensor with random values and only log it; a reward refuses.
    partial_dir = save_tiny_clip(tmp_path / "partial")
    state_dict = load_file(partial_dir / "model.safetensors")
    del state_dict["visual_projection.weight"]
    save_file(state_dict, partial_dir / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(RewardLoadError, match=r"lacks 1 weight\(s\) \(e.g. \['visual_projection.weight'\]\)"):
        CLIPReward(model=str(partial_dir))


# --- refusing rewards that cannot train ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec, message",
    [
        ("reward_fixtures.DeclaredNonDifferentiableReward", "declares differentiable = False"),
        ("reward_fixtures.detached_reward", "without a graph"),
    ],
)
def test_non_differentiable_rewards_are_refused_for_training(spec, message):
    with pytest.raises(ValueError, match=message):
        load_rewards([spec], "cpu")
    (reward,) = load_rewards([spec], "cpu", for_training=False)
    assert reward.fn(torch.ones(2, 3, 8, 8), ["a", "b"]).tolist() == [1.0, 1.0]


def test_bad_score_shape_is_reported():
    (reward,) = load_rewards(["reward_fixtures.sum_of_pixels_reward"], "cpu")
    reward.fn.reward = lambda images, prompts: images.mean()
    with pytest.raises(ValueError, match=r"must return scores of shape \(2,\)"):
        reward.fn(torch.rand(2, 3, 8, 8), ["a", "b"])


# --- the weighted loss -------------------------------------------------------------------------------------------


def test_compute_reward_loss_matches_hand_computation():
    # Brightness rewards on two flat images: scores are exactly 0.2 and 0.9.
    rewards = load_rewards(
        [
            "reward_fixtures.sum_of_pixels_reward:0.3",  # hinge 0.7
            "reward_fixtures.sum_of_pixels_reward:2:hinge=none",  # linear
            "reward_fixtures.sum_of_pixels_reward:0:hinge=none",  # monitor only
        ],
        "cpu",
    )
    assert [reward.name for reward in rewards] == [
        "sum_of_pixels_reward",
        "sum_of_pixels_reward_2",
        "sum_of_pixels_reward_3",
    ]
    images = torch.stack([torch.full((3, 4, 4), 0.2), torch.full((3, 4, 4), 0.9)]).requires_grad_(True)
    total_loss, mean_scores = compute_reward_loss(rewards, images, ["a", "b"])
    # hinge: 0.3 * mean(relu(0.7 - [0.2, 0.9])) = 0.3 * 0.25; linear: 2 * -mean([0.2, 0.9]) = -1.1.
    torch.testing.assert_close(total_loss, torch.tensor(0.3 * 0.25 - 1.1))
    assert set(mean_scores) == {"sum_of_pixels_reward", "sum_of_pixels_reward_2", "sum_of_pixels_reward_3"}
    assert all(abs(value.item() - 0.55) < 1e-6 and not value.requires_grad for value in mean_scores.values())
    # d/dx of the mean-brightness score is 1/48 per pixel: hinge part only on the first image (score under 0.7).
    total_loss.backward()
    per_pixel = 1 / images[0].numel()
    expected_grad = torch.stack(
        [torch.full((3, 4, 4), (-0.3 * 0.5 - 2 * 0.5) * per_pixel), torch.full((3, 4, 4), -2 * 0.5 * per_pixel)]
    )
    torch.testing.assert_close(images.grad, expected_grad)
    assert reward_loss(torch.tensor([0.2, 0.9]), 0.7).item() == pytest.approx(0.25)


def test_compute_reward_loss_without_rewards():
    total_loss, mean_scores = compute_reward_loss([], torch.rand(1, 3, 8, 8), ["a"])
    assert total_loss.item() == 0.0 and mean_scores == {}


def test_reward_resize_keeps_the_gradient_at_overshooting_pixels():
    """A clamp after the bicubic resize zeroes the gradient where the kernel overshoots [0, 1] (a sharp edge); the
    training preprocessing has none (the released code normalises the resized image directly)."""
    from diffusers_dmdr.rewards import ImagePreprocessing

    images = torch.zeros(1, 3, 64, 64)
    images[..., :, 32:] = 1.0  # a step edge: bicubic rings above 1 and below 0 next to it
    images.requires_grad_(True)
    resized = torch.nn.functional.interpolate(
        images.detach(), size=(24, 24), mode="bicubic", align_corners=False, antialias=True
    )
    overshoot = (resized > 1) | (resized < 0)
    assert overshoot.any()
    for clamp, expect_gradient in ((False, True), (True, False)):
        pixel_values = ImagePreprocessing(size=24, crop_size=(24, 24), clamp_resized=clamp)(images)
        (gradient,) = torch.autograd.grad(pixel_values[overshoot].sum(), images)
        assert bool(gradient.abs().sum() > 0) is expect_gradient
