"""Built-in rewards on tiny random models of the real classes: tensor path vs the reference preprocessing,
gradient to the input image, local loading, corrupt files, the relative reward's formula."""

import pytest
import torch
from reward_fixtures import (
    TINY_CLASSIFIER_LABELS,
    TinyConvClassifier,
    image_to_tensor,
    reference_image,
    save_tiny_aesthetic_head,
    save_tiny_clip,
    save_tiny_open_clip,
    save_tiny_vit_classifier,
)

from diffusers_dmdr.rewards import (
    AestheticReward,
    CLIPReward,
    HPSReward,
    PickScoreReward,
    RelativeReward,
    RewardLoadError,
    load_rewards,
    parse_reward_spec,
)
from diffusers_dmdr.rewards.classifier import LabelMatcher


# Reference-path tolerances on the tiny models: uint8 rounding plus PIL vs torch antialiased bicubic (see
# test_rewards.py); scores below are compared in their own units.
SCORE_ATOL = 2e-3


def _assert_gradient_reaches_images(reward, prompts):
    images = torch.rand(len(prompts), 3, 40, 52, requires_grad=True)
    scores = reward(images, prompts)
    assert scores.shape == (len(prompts),) and scores.dtype == torch.float32
    (image_grad,) = torch.autograd.grad(scores.sum(), images)
    assert torch.isfinite(image_grad).all() and image_grad.abs().sum() > 0


@pytest.fixture(scope="module")
def tiny_clip_dir(tmp_path_factory):
    return save_tiny_clip(tmp_path_factory.mktemp("tiny-clip"))


def _clip_reference(folder, image, prompts):
    """Image and text embeddings through the processor's numpy/PIL path, and the model's logit scale."""
    from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

    model = CLIPModel.from_pretrained(folder).eval()
    pixel_values = AutoImageProcessor.from_pretrained(folder)(images=image, return_tensors="pt").pixel_values
    text_inputs = AutoTokenizer.from_pretrained(folder)(prompts, padding=True, truncation=True, return_tensors="pt")
    with torch.no_grad():
        image_embeds = model.get_image_features(pixel_values=pixel_values).pooler_output
        text_embeds = model.get_text_features(**text_inputs).pooler_output
    image_embeds = torch.nn.functional.normalize(image_embeds, dim=-1)
    text_embeds = torch.nn.functional.normalize(text_embeds, dim=-1)
    return image_embeds, text_embeds, model.logit_scale.exp().item()


# --- PickScore ---------------------------------------------------------------------------------------------------


def test_pickscore_matches_reference_and_trains(tiny_clip_dir):
    image, prompts = reference_image(), ["a red square"]
    image_embeds, text_embeds, logit_scale = _clip_reference(tiny_clip_dir, image, prompts)
    reference_score = logit_scale * (image_embeds * text_embeds).sum(-1)
    (reward,) = load_rewards([f"pickscore:model={tiny_clip_dir}:processor={tiny_clip_dir}"], "cpu")
    assert reward.hinge is None
    with torch.no_grad():
        score = reward.fn(image_to_tensor(image), prompts)
    # PickScore multiplies the cosine by exp(logit_scale) (14.3 at init), so the tolerance scales with it.
    torch.testing.assert_close(score, reference_score, atol=SCORE_ATOL * logit_scale, rtol=0)
    _assert_gradient_reaches_images(reward.fn, ["a cat", "a dog"])


def test_pickscore_missing_processor_fails_clearly(tiny_clip_dir, tmp_path):
    with pytest.raises(RewardLoadError, match="CLIP tokenizer"):
        PickScoreReward(model=str(tiny_clip_dir), processor=str(tmp_path))


# --- aesthetic ---------------------------------------------------------------------------------------------------


def test_aesthetic_matches_reference_and_trains(tiny_clip_dir, tmp_path):
    head_path = save_tiny_aesthetic_head(tmp_path / "aesthetic-model.pth")
    image = reference_image()
    image_embeds, _, _ = _clip_reference(tiny_clip_dir, image, ["unused"])
    reward = AestheticReward(model=str(tmp_path), clip_model=str(tiny_clip_dir))
    with torch.no_grad():
        reference_score = reward.head(image_embeds).squeeze(-1)
        score = reward(image_to_tensor(image), ["unused"])
    torch.testing.assert_close(score, reference_score, atol=SCORE_ATOL, rtol=0)
    # The single-file form loads the same head.
    (loaded,) = load_rewards([f"aesthetic:model={head_path}:clip_model={tiny_clip_dir}"], "cpu")
    assert loaded.hinge is None
    torch.testing.assert_close(loaded.fn(image_to_tensor(image), ["x"]).detach(), score)
    _assert_gradient_reaches_images(loaded.fn, ["a", "b"])


def test_aesthetic_bad_head_files(tiny_clip_dir, tmp_path):
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(b"\x80\x02garbage")
    with pytest.raises(RewardLoadError, match="corrupt or truncated"):
        AestheticReward(model=str(corrupt), clip_model=str(tiny_clip_dir))
    with pytest.raises(RewardLoadError, match="not found in the folder"):
        AestheticReward(model=str(tmp_path), filename="missing.pth", clip_model=str(tiny_clip_dir))
    wrong_width = save_tiny_aesthetic_head(tmp_path / "wide.pth", embed_dim=24)
    with pytest.raises(RewardLoadError, match="takes 24-d embeddings"):
        AestheticReward(model=str(wrong_width), clip_model=str(tiny_clip_dir))


# --- classifier --------------------------------------------------------------------------------------------------


def test_label_matching():
    matcher = LabelMatcher(TINY_CLASSIFIER_LABELS + ["white shark"])
    assert matcher("a photo of a goldfish") == 1
    assert matcher("Tinca tinca in a pond") == 0  # a synonym
    assert matcher("a great white shark at sea") == 2  # the longest name wins over "white shark"
    assert matcher("2") == 2  # class index
    with pytest.raises(ValueError, match="No class label"):
        matcher("a goldfishbowl")
    with pytest.raises(ValueError, match="out of range"):
        matcher("7")


def test_transformers_classifier_matches_reference_and_trains(tmp_path):
    from transformers import AutoImageProcessor, ViTForImageClassification

    folder = save_tiny_vit_classifier(tmp_path / "vit")
    image, prompts = reference_image(), ["a goldfish"]
    model = ViTForImageClassification.from_pretrained(folder).eval()
    pixel_values = AutoImageProcessor.from_pretrained(folder)(images=image, return_tensors="pt").pixel_values
    with torch.no_grad():
        reference_score = torch.log_softmax(model(pixel_values=pixel_values).logits, -1)[:, 1]
    (reward,) = load_rewards([{"name": "classifier", "model": str(folder)}], "cpu")
    assert reward.hinge is None
    with torch.no_grad():
        score = reward.fn(image_to_tensor(image), prompts)
    torch.testing.assert_close(score, reference_score, atol=SCORE_ATOL, rtol=0)
    _assert_gradient_reaches_images(reward.fn, ["tench", "great white shark"])


def test_module_classifier_by_import_path(tmp_path):
    from safetensors.torch import save_file

    checkpoint = tmp_path / "classifier.safetensors"
    trained = TinyConvClassifier(seed=1)
    save_file(trained.state_dict(), checkpoint)
    labels_file = tmp_path / "labels.txt"
    labels_file.write_text("\n".join(TINY_CLASSIFIER_LABELS))
    spec = {
        "name": "classifier",
        "module": "reward_fixtures.TinyConvClassifier",
        "checkpoint": str(checkpoint),
        "labels": str(labels_file),
        "image_size": 16,
    }
    (reward,) = load_rewards([spec], "cpu")
    images = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        pixel_values = (images - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor(
            [0.229, 0.224, 0.225]
        ).view(1, 3, 1, 1)
        expected = torch.log_softmax(trained(pixel_values), -1)[[0, 1], [2, 0]]
        torch.testing.assert_close(reward.fn(images, ["great white shark", "a tench"]), expected)
    _assert_gradient_reaches_images(reward.fn, ["goldfish", "tench"])

    checkpoint.write_bytes(checkpoint.read_bytes()[:40])
    with pytest.raises(RewardLoadError, match="Could not read reward weights"):
        load_rewards([spec], "cpu")


# --- relative (SRPO-style) ---------------------------------------------------------------------------------------


def test_relative_reward_equals_its_formula(tiny_clip_dir):
    clip = CLIPReward(model=str(tiny_clip_dir)).eval()
    relative = RelativeReward(clip, k=0.1, positive="Realistic", negative="CG Render")
    images, prompts = torch.rand(2, 3, 32, 32), ["a cat", "a dog"]
    with torch.no_grad():
        expected = 1.1 * clip(images, ["Realistic. a cat", "Realistic. a dog"]) - clip(
            images, ["CG Render. a cat", "CG Render. a dog"]
        )
        torch.testing.assert_close(relative(images, prompts), expected)
    _assert_gradient_reaches_images(relative, prompts)


def test_relative_reward_spec_and_control_words(tiny_clip_dir):
    spec = parse_reward_spec(f"relative:5:reward=clip:model={tiny_clip_dir}:k=0.2:positive=Detailed|Realistic")
    rng_state = torch.get_rng_state()
    (reward,) = load_rewards([spec], "cpu")
    # The load-time gradient probe draws control words, but must leave the training RNG stream untouched.
    assert torch.equal(torch.get_rng_state(), rng_state)
    relative = reward.fn.reward
    assert isinstance(relative.reward, CLIPReward) and relative.k == 0.2
    assert relative.positive == ("Detailed", "Realistic")
    # Released behaviour: one control word per batch; per sample stays an option.
    assert relative.control_sampling == "batch"
    per_call = [
        {p.split(". ")[0] for p in relative.controlled_prompts(["a cat"] * 8, relative.positive)} for _ in "x" * 32
    ]
    assert all(len(words) == 1 for words in per_call) and set().union(*per_call) == {"Detailed", "Realistic"}
    relative.control_sampling = "sample"
    drawn = {prompt.split(". ")[0] for prompt in relative.controlled_prompts(["a cat"] * 64, relative.positive)}
    assert drawn == {"Detailed", "Realistic"}
    with pytest.raises(ValueError, match="text-image reward"):
        RelativeReward(reward=TinyConvClassifier())


def test_relative_reward_draws_resume_exactly(tiny_clip_dir):
    """The words are a function of (seed, step, call in the step): a resumed run (a fresh reward told the step)
    draws what the uninterrupted one drew, and the global RNG is not used."""
    words = ("A", "B", "C", "D", "E", "F")

    def draws(reward, steps):
        out = []
        for step in steps:
            reward.set_step(step)
            out.append([reward.controlled_prompts(["p"], reward.positive)[0] for _ in range(2)])
        return out

    clip = CLIPReward(model=str(tiny_clip_dir))
    uninterrupted = draws(RelativeReward(clip, positive=list(words), seed=3), range(6))
    rng_state = torch.get_rng_state()
    resumed = draws(RelativeReward(clip, positive=list(words), seed=3), range(3, 6))
    assert resumed == uninterrupted[3:] and torch.equal(torch.get_rng_state(), rng_state)
    assert len({tuple(row) for row in uninterrupted}) > 1  # the steps draw different words
    assert draws(RelativeReward(clip, positive=list(words), seed=4), range(6)) != uninterrupted


# --- open_clip: CLIP (DFN5B-style) and HPS v2.1 -----------------------------------------------------------------


@pytest.fixture(scope="module")
def open_clip():
    return pytest.importorskip("open_clip", reason="open_clip comes with pip install 'diffusers-dmdr[rewards]'")


def _open_clip_reference(open_clip, model_name, image, prompts, checkpoint_state=None):
    from PIL import Image

    model, _, preprocess = open_clip.create_model_and_transforms(model_name)
    if checkpoint_state is not None:
        model.load_state_dict(checkpoint_state)
    tokenizer = open_clip.get_tokenizer(model_name)
    with torch.no_grad():
        image_embeds = model.encode_image(preprocess(Image.fromarray(image))[None], normalize=True)
        text_embeds = model.encode_text(tokenizer(prompts), normalize=True)
    return (image_embeds * text_embeds).sum(-1)


def test_open_clip_clip_reward_matches_reference(open_clip, tmp_path):
    folder = save_tiny_open_clip(tmp_path / "dfn-tiny")
    image, prompts = reference_image(), ["a red square"]
    reference_score = _open_clip_reference(open_clip, f"local-dir:{folder}", image, prompts)
    (reward,) = load_rewards([f"clip:model={folder}"], "cpu")  # a folder with open_clip_config.json
    with torch.no_grad():
        score = reward.fn(image_to_tensor(image), prompts)
    torch.testing.assert_close(score, reference_score, atol=SCORE_ATOL, rtol=0)
    _assert_gradient_reaches_images(reward.fn, ["a cat", "a dog"])
    (folder / "open_clip_model.safetensors").write_bytes(b"broken")
    with pytest.raises(RewardLoadError, match="Could not build the open_clip model"):
        CLIPReward(model=f"local-dir:{folder}")


def test_hps_reward_loads_a_full_checkpoint(open_clip, tmp_path):
    architecture = save_tiny_open_clip(tmp_path / "arch", seed=0)
    # An HPS-style checkpoint: a different model's full state dict, wrapped and DataParallel-prefixed.
    trained = open_clip.create_model(f"local-dir:{save_tiny_open_clip(tmp_path / 'trained', seed=3)}")
    state_dict = {f"module.{key}": value for key, value in trained.state_dict().items()}
    torch.save({"state_dict": state_dict, "epoch": 1}, tmp_path / "HPS_v2.1_compressed.pt")
    image, prompts = reference_image(), ["Realistic photo a red square"]
    reference_score = _open_clip_reference(
        open_clip, f"local-dir:{architecture}", image, prompts, checkpoint_state=trained.state_dict()
    )
    (reward,) = load_rewards(
        [f"hpsv2.1:model={tmp_path}:architecture=local-dir:{architecture}:prompt_prefix=Realistic photo "], "cpu"
    )
    with torch.no_grad():
        score = reward.fn(image_to_tensor(image), ["a red square"])
    torch.testing.assert_close(score, reference_score, atol=SCORE_ATOL, rtol=0)
    _assert_gradient_reaches_images(reward.fn, ["a cat", "a dog"])

    (tmp_path / "HPS_v2.1_compressed.pt").write_bytes(b"PK\x03\x04truncated")
    with pytest.raises(RewardLoadError, match="corrupt or truncated"):
        HPSReward(model=str(tmp_path), architecture=f"local-dir:{architecture}")
    with pytest.raises(RewardLoadError, match="not found in the folder"):
        HPSReward(model=str(tmp_path), filename="HPS_v2_compressed.pt", architecture=f"local-dir:{architecture}")


def test_dfn5b_clip_builds_the_released_gelu_towers_by_default(monkeypatch):
    """open_clip is not installed here: a stand-in module records how the towers are built. The released code builds
    `ViT-H-14` (GELU) for DFN5B, open_clip's DFN5B config says QuickGELU; both are offered, GELU is the default. The
    keyword semantics (`quick_gelu` overriding the config, `force_quick_gelu`) are open_clip's `create_model`'s."""
    import sys
    import types

    calls = []

    def create_model(name, **kwargs):
        calls.append((name, kwargs))
        model = torch.nn.Module()
        model.visual = torch.nn.Module()
        model.visual.preprocess_cfg = {"size": 224}
        return model

    fake = types.ModuleType("open_clip")
    fake.create_model = create_model
    fake.get_tokenizer = lambda name: lambda prompts: torch.zeros(len(prompts), 77, dtype=torch.long)
    monkeypatch.setitem(sys.modules, "open_clip", fake)

    CLIPReward()
    CLIPReward(activation="quickgelu")
    CLIPReward(model="hf-hub:other/clip")
    CLIPReward(model="hf-hub:other/clip", activation="gelu")
    activation_kwargs = [{k: v for k, v in kwargs.items() if "gelu" in k} for _, kwargs in calls]
    assert [name for name, _ in calls] == ["hf-hub:apple/DFN5B-CLIP-ViT-H-14"] * 2 + ["hf-hub:other/clip"] * 2
    assert activation_kwargs == [{"quick_gelu": False}, {"force_quick_gelu": True}, {}, {"quick_gelu": False}]
    with pytest.raises(ValueError, match="activation must be one of"):
        CLIPReward(activation="relu")
    with pytest.raises(ValueError, match="applies to open_clip models"):
        CLIPReward(model="openai/clip-vit-base-patch32", activation="gelu")
